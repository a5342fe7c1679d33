"""Held-out evaluation of a drafter against its verifier; written as JSON and a plot.

- top-1 agreement: on the verifier's held-out text, how often the drafter's argmax equals the
  verifier's (teacher-forced), overall and per prompt set;
- acceptance by position: real greedy speculation rounds from random points of the held-out
  text: the drafter drafts γ = 8 tokens on its own, the verifier checks them in one forward;
  P(the first j drafts are all accepted) for j = 1..8, and the expected tokens per round for
  each draft length γ (1 + Σ_{j≤γ} P(accepted ≥ j));
- greedy-text agreement: the same top-1 agreement on the verifier's *greedy* continuations (what
  greedy serving drafts on) of held-out chat prompts and of the `specmesh bench` chat prompts,
  which are worded unlike any training prompt (the test of phrasing the drafter has not seen);
- calibration: expected calibration error (10 equal-width bins) of the confidence head against
  the soft survival label 1 − ½‖q − p‖₁, next to that of the default confidence (the draft
  probability of the top token); and how well the head predicts greedy acceptance (Pearson r).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from specmesh.drafter_training.batches import logits_at, make_batch, plan_batches
from specmesh.drafter_training.data import Sample
from specmesh.drafter_training.losses import distillation_terms, survival_label
from specmesh.drafter_training.model import ConfidenceHead, draft_token_ids, text_config

MAX_GAMMA = 8
NUM_BINS = 10


def calibration(predicted: torch.Tensor, observed: torch.Tensor, num_bins: int = NUM_BINS) -> dict[str, Any]:
    """predicted, observed: [N] in [0, 1]. ECE and the reliability table (non-empty bins)."""
    predicted = predicted.double().clamp(0, 1)
    observed = observed.double()
    bins = torch.clamp((predicted * num_bins).long(), max=num_bins - 1)
    table = []
    ece = 0.0
    for b in range(num_bins):
        member = bins == b
        count = int(member.sum())
        if count == 0:
            continue
        mean_pred = float(predicted[member].mean())
        mean_obs = float(observed[member].mean())
        ece += count / max(len(predicted), 1) * abs(mean_pred - mean_obs)
        table.append({"bin": [b / num_bins, (b + 1) / num_bins], "count": count,
                      "mean_predicted": round(mean_pred, 4), "mean_observed": round(mean_obs, 4)})
    return {"ece": round(ece, 4), "bins": table}


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    if len(x) < 2 or float(x.std()) == 0 or float(y.std()) == 0:
        return 0.0
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def teacher_forced_metrics(drafter: Any, verifier: Any, samples: Sequence[Sample], pad_token_id: int,
                           head: ConfidenceHead | None = None, batch_tokens: int = 8192) -> dict[str, Any]:
    """Agreement, soft survival and calibration over every completion position of `samples`."""
    device = next(drafter.parameters()).device
    draft_ids = draft_token_ids(drafter)
    agree, tv, head_conf, top_prob, sets = [], [], [], [], []
    for indices in plan_batches(samples, batch_tokens, seed=0):
        batch = make_batch([samples[i] for i in indices], pad_token_id, device)
        with _autocast(device):
            student = logits_at(drafter, batch).float()
            teacher = logits_at(verifier, batch).float()
        terms = distillation_terms(student, teacher, draft_ids)
        agree.append(terms.agree.cpu())
        tv.append(terms.tv.cpu())
        top_prob.append(student.softmax(dim=-1).max(dim=-1).values.cpu())
        if head is not None:
            head_conf.append(head(student).cpu())
        sets += batch.prompt_sets
    if not agree:
        return {"num_positions": 0}
    agree_t, tv_t, top_t = torch.cat(agree), torch.cat(tv), torch.cat(top_prob)
    label = survival_label(tv_t)
    by_set: dict[str, float] = {}
    for name in sorted(set(sets)):
        member = torch.tensor([s == name for s in sets])
        by_set[name or "all"] = round(float(agree_t[member].float().mean()), 4)
    metrics: dict[str, Any] = {
        "num_positions": int(agree_t.numel()),
        "top1_agreement": round(float(agree_t.float().mean()), 4),
        "top1_agreement_by_set": by_set,
        "mean_soft_survival": round(float(label.mean()), 4),
        "calibration_draft_probability": calibration(top_t, label),
    }
    if head is not None:
        head_t = torch.cat(head_conf)
        metrics["calibration_head"] = calibration(head_t, label)
        metrics["calibration_head_vs_greedy_acceptance"] = calibration(head_t, agree_t.float())
        metrics["head_pearson_with_greedy_acceptance"] = round(_pearson(head_t, agree_t.float()), 4)
        metrics["head_pearson_with_soft_survival"] = round(_pearson(head_t, label), 4)
        metrics["confidence_range"] = [round(float(head_t.min()), 4), round(float(head_t.max()), 4)]
    return metrics


def greedy_text_agreement(drafter: Any, verifier: Any, prompt_sets: dict[str, list[list[int]]], *,
                          max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int,
                          batch_size: int = 32) -> dict[str, dict[str, Any]]:
    """Per named list of encoded prompts: the verifier's greedy continuations, and the drafter's
    teacher-forced top-1 agreement on them."""
    from specmesh.drafter_training.data import sample_generations

    out: dict[str, dict[str, Any]] = {}
    for name, prompts in prompt_sets.items():
        if not prompts:
            continue
        samples = sample_generations(verifier, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                                     batch_size=batch_size, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                                     seed=0)
        metrics = teacher_forced_metrics(drafter, verifier, samples, pad_token_id)
        out[name] = {"prompts": len(prompts), "positions": metrics.get("num_positions", 0),
                     "top1_agreement": metrics.get("top1_agreement"),
                     "with_context_copy": context_copy_agreement(drafter, samples)}
    return out


@torch.no_grad()
def context_copy_agreement(drafter: Any, samples: Sequence[Sample], rule: Any = None) -> dict[str, float]:
    """What a served drafter with context copying (drafter/context_copy.py; default rule) agrees
    on: teacher-forced top-1 against the next token of each sample's text (for the verifier's
    greedy text, its argmax), with the copy in place of the model's token wherever the rule
    fires; plus the share of positions copied and how often a copy was right."""
    from drafter.context_copy import ContextCopyRule, NgramIndex

    rule = rule or ContextCopyRule()
    device = next(drafter.parameters()).device
    ids = draft_token_ids(drafter)
    agree = copied = copies_right = total = 0
    for sample in samples:
        if sample.num_completion_tokens <= 0:
            continue
        with _autocast(device):
            logits = drafter(torch.tensor([sample.tokens], device=device)).logits[0].float()
        top, best = logits.softmax(dim=-1).max(dim=-1)
        top, best = top.tolist(), best.tolist()
        tokens = list(sample.tokens)
        index = NgramIndex()
        for t in range(sample.prompt_length, len(tokens)):
            proposal = int(ids[best[t - 1]]) if ids is not None else best[t - 1]
            match = rule.match(index, tokens[:t])
            if match is not None and rule.copies(top[t - 1]):
                proposal = match[0]
                copied += 1
                copies_right += proposal == tokens[t]
            agree += proposal == tokens[t]
            total += 1
    return {"top1_agreement": round(agree / max(total, 1), 4), "copied_share": round(copied / max(total, 1), 4),
            "copies_right": round(copies_right / max(copied, 1), 4)}


def _last_hidden_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                        count: int) -> torch.Tensor:
    """Logits [B, count, V] at the last `count` positions of a left-padded batch."""
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, -count:])
    softcap = getattr(text_config(model.config), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


@torch.no_grad()
def greedy_acceptance(drafter: Any, verifier: Any, samples: Sequence[Sample], pad_token_id: int,
                      gamma: int = MAX_GAMMA, max_rounds: int = 256, batch_size: int = 32,
                      seed: int = 0) -> dict[str, Any]:
    """Greedy speculation rounds from random completion positions of `samples`."""
    device = next(drafter.parameters()).device
    rng = random.Random(seed)
    starts: list[tuple[int, int]] = []  # (sample index, context length)
    eligible = [i for i, s in enumerate(samples) if s.num_completion_tokens > 1]
    per_sample = max(1, max_rounds // max(len(eligible), 1))
    for i in eligible:
        s = samples[i]
        picks = rng.sample(range(s.prompt_length, len(s.tokens)), min(per_sample, s.num_completion_tokens))
        starts += [(i, t) for t in picks]
    rng.shuffle(starts)
    starts = starts[:max_rounds]
    draft_ids = draft_token_ids(drafter)
    accepted: list[int] = []
    for begin in range(0, len(starts), batch_size):
        chunk = starts[begin:begin + batch_size]
        contexts = [list(samples[i].tokens[:t]) for i, t in chunk]
        width = max(len(c) for c in contexts)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, context in enumerate(contexts):
            ids[row, width - len(context):] = torch.tensor(context)
            mask[row, width - len(context):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with _autocast(device):
            for _ in range(gamma):
                token = _last_hidden_logits(drafter, ids, mask, positions, 1)[:, -1].argmax(dim=-1, keepdim=True)
                if draft_ids is not None:
                    token = draft_ids[token]  # a row of the draft vocabulary -> its token id
                ids = torch.cat([ids, token], dim=1)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            # The verifier's choice at each draft position: logits of the token before it.
            target = _last_hidden_logits(verifier, ids, mask, positions, gamma + 1)[:, :gamma].argmax(dim=-1)
        drafts = ids[:, -gamma:]
        match = (drafts == target).long().cumprod(dim=1)  # [B, gamma]: 1 while all so far match
        accepted += match.sum(dim=1).tolist()
    if not accepted:
        return {"num_rounds": 0}
    counts = torch.tensor(accepted)
    at_least = [round(float((counts >= j).float().mean()), 4) for j in range(1, gamma + 1)]
    tokens_per_round = [round(1.0 + sum(at_least[:g]), 4) for g in range(1, gamma + 1)]
    conditional = [round(at_least[0], 4)] + [
        round(at_least[j] / at_least[j - 1], 4) if at_least[j - 1] > 0 else 0.0 for j in range(1, gamma)]
    return {
        "num_rounds": len(accepted),
        "gamma": list(range(1, gamma + 1)),
        "p_accepted_at_least": at_least,  # P(first j drafts all accepted), j = 1..gamma
        "p_accept_given_previous": conditional,  # per-position acceptance rate
        "tokens_per_round": tokens_per_round,  # expected committed tokens per round, draft length γ
        "mean_accepted_of_8": round(float(counts.float().mean()), 4),
    }


def write_report(report: dict[str, Any], directory: Path | str) -> tuple[Path, Path | None]:
    """Write report as eval.json, and eval.png when matplotlib is available."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "eval.json"
    json_path.write_text(json.dumps(report, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return json_path, None
    evaluation = report.get("evaluation", {})
    acceptance = evaluation.get("acceptance", {})
    tf = evaluation.get("teacher_forced", {})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if acceptance.get("num_rounds"):
        gammas = acceptance["gamma"]
        left.bar(gammas, acceptance["p_accepted_at_least"], color="#4c72b0", label="P(first j accepted)")
        left.plot(gammas, acceptance["p_accept_given_previous"], "o-", color="#dd8452",
                  label="acceptance at position j")
        left.set_xlabel("draft position j")
        left.set_ylim(0, 1)
        left.set_title(f"greedy acceptance ({acceptance['num_rounds']} rounds); "
                       f"top-1 agreement {tf.get('top1_agreement', 0):.1%}")
        left.legend(loc="upper right")
    right.plot([0, 1], [0, 1], ":", color="gray")
    for key, label, colour in (("calibration_head", "confidence head", "#55a868"),
                               ("calibration_draft_probability", "draft probability", "#c44e52")):
        table = tf.get(key)
        if table:
            xs = [b["mean_predicted"] for b in table["bins"]]
            ys = [b["mean_observed"] for b in table["bins"]]
            right.plot(xs, ys, "o-", color=colour, label=f"{label} (ECE {table['ece']:.3f})")
    right.set_xlabel("predicted survival")
    right.set_ylabel("observed 1 − ½‖q − p‖₁")
    right.set_title("calibration on held-out positions")
    right.legend(loc="upper left")
    fig.tight_layout()
    png_path = directory / "eval.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path

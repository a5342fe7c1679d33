"""Distil a drafter for a verifier within a time budget.

Timeline of one run (the budget is --minutes, model loading excluded):
1. data (a share of the budget): the verifier samples continuations of held-out prompts
   first (a few), then of the training prompts, round after round (each round a new sample
   per prompt), until the share is used or the token cap is reached;
2. training (the rest): teacher-forced distillation with the verifier computed online (no
   logits are stored), a time-based warm-up + cosine learning-rate schedule, the confidence
   head trained alongside on detached features and labels;
3. evaluation on the held-out samples (before and after training), see evaluate.py.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from specmesh.drafter_training.batches import logits_at, make_batch, plan_batches, trim
from specmesh.drafter_training.data import (
    Sample,
    builtin_prompts,
    context_prompts,
    encode_request,
    load_prompt_file,
    sample_generations,
    split_held_out,
)
from specmesh.drafter_training.evaluate import greedy_acceptance, greedy_text_agreement, teacher_forced_metrics
from specmesh.drafter_training.losses import confidence_loss, distillation_loss, distillation_terms
from specmesh.drafter_training.model import (
    ConfidenceHead,
    SharedTensors,
    build_drafter_model,
    draft_token_ids,
    frequency_ranked_vocabulary,
    restrict_vocabulary,
)
from specmesh.model_loading import eos_token_ids

log = logging.getLogger(__name__)

# progress(stage, completed, total): stage is "data", "training" or "evaluation".
Progress = Callable[[str, float, float], None]


@dataclass(frozen=True)
class TrainOptions:
    num_layers: int = 2
    hidden_size: int | None = None  # None: the verifier's (and then share its embedding/LM head)
    minutes: float = 10.0
    device: str = "cpu"
    prompts_file: str | None = None  # JSONL; None: the built-in prompt sets
    data_share: float = 0.5  # of the budget spent generating data (on an H200 ~2k tokens/s with HF generate)
    max_data_tokens: int | None = None  # stop generating after this many completion tokens
    samples_per_prompt: int = 16  # most sampled continuations per training prompt
    max_new_tokens: int = 256
    max_prompt_tokens: int = 256
    temperature: float = 0.7  # of the sampled data
    # The first pass over the training prompts is the verifier's greedy text: greedy serving
    # drafts on exactly that text, and sampled text alone under-represents it (the greedy-text
    # agreement the evaluation reports is what a greedy deployment accepts).
    greedy_pass: bool = True
    # Requests carrying a passage to summarise or rewrite (data.context_prompts), made from the
    # greedy pass's answers; None: a third as many as training prompts; 0: none. Needs greedy_pass.
    context_prompts: int | None = None
    held_out_fraction: float = 0.05
    max_held_out_samples: int = 48
    generation_batch_size: int | None = None  # None: 1536 on CUDA, 8 on CPU
    batch_tokens: int | None = None  # padded tokens per training batch; None: 16384 CUDA, 2048 CPU
    learning_rate: float = 1e-3
    head_learning_rate: float = 3e-3
    tv_weight: float = 1.0
    max_steps: int | None = None  # stop training after this many steps (tests)
    acceptance_rounds: int | None = None  # None: 512 on CUDA, 64 on CPU
    greedy_eval_prompts: int = 32  # held-out prompts whose greedy continuations are evaluated
    greedy_eval_tokens: int = 128  # length of those continuations (and of the bench prompts')
    seed: int = 0
    # Output vocabulary of the drafter: the K tokens the verifier generates most often (in the
    # training data). None: DEFAULT_DRAFT_VOCAB for vocabularies of at least
    # MIN_VOCAB_TO_RESTRICT tokens, else the whole vocabulary; 0: the whole vocabulary.
    draft_vocab: int | None = None

    def validate(self) -> "TrainOptions":
        problems = []
        if self.num_layers <= 0:
            problems.append(f"--layers must be positive, got {self.num_layers}")
        if self.hidden_size is not None and self.hidden_size <= 0:
            problems.append(f"--hidden must be positive, got {self.hidden_size}")
        if not self.minutes > 0:
            problems.append(f"--minutes must be positive, got {self.minutes}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            problems.append(f"--device must be cpu or cuda, got {self.device!r}")
        if self.draft_vocab is not None and self.draft_vocab < 0:
            problems.append(f"--draft-vocab must be >= 0 (0: the whole vocabulary), got {self.draft_vocab}")
        if self.generation_batch_size is not None and self.generation_batch_size <= 0:
            problems.append(f"--generation-batch must be positive, got {self.generation_batch_size}")
        if self.context_prompts is not None and self.context_prompts < 0:
            problems.append(f"--context-prompts must be >= 0, got {self.context_prompts}")
        if not 0 < self.data_share < 1:
            problems.append(f"data_share must be in (0, 1), got {self.data_share}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# 8192 rows of a small drafter's LM head fit in a CPU's last-level cache (576 x 8192 float32 is
# 19 MB; the full 49k-row head of SmolLM2 is 113 MB, 6.5 ms of a 9.4 ms drafter step, against
# 0.3 ms for 8192 rows on a 2-core EPYC), and on the verifier's own text they cover nearly
# every token (see eval.json: draft_vocabulary.coverage).
DEFAULT_DRAFT_VOCAB = 8192
MIN_VOCAB_TO_RESTRICT = 32768


def draft_vocab_size(options: TrainOptions, vocab_rows: int) -> int:
    """How many tokens the drafter drafts from; 0: the whole vocabulary."""
    if options.draft_vocab is None:
        return DEFAULT_DRAFT_VOCAB if vocab_rows >= MIN_VOCAB_TO_RESTRICT else 0
    return 0 if options.draft_vocab >= vocab_rows else options.draft_vocab


def _coverage(samples: list[Sample], ids: set[int]) -> float:
    tokens = [t for s in samples for t in s.tokens[s.prompt_length:]]
    return round(sum(t in ids for t in tokens) / max(len(tokens), 1), 4)


@dataclass
class TrainedDrafter:
    model: Any  # LlamaForCausalLM, eval mode
    head: ConfidenceHead
    shared: SharedTensors | None
    report: dict[str, Any] = field(default_factory=dict)


def _cuda(options: TrainOptions) -> bool:
    return options.device.startswith("cuda")


def _pad_id(tokenizer: Any, eos_ids: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return int(pad)


def _split_requests(options: TrainOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(all requests, training requests, held-out requests): a seeded split, the same every call."""
    requests = load_prompt_file(options.prompts_file) if options.prompts_file else builtin_prompts()
    train_requests, held_requests = split_held_out(requests, options.held_out_fraction, options.seed)
    return requests, train_requests, held_requests


def greedy_eval_prompts(tokenizer: Any, options: TrainOptions) -> dict[str, list[list[int]]]:
    """Encoded prompts for the greedy-text evaluation: held-out chat prompts (held-out prompts of
    the user's file when there is one) and the `specmesh bench` prompts (chat, code and
    summarisation with context), never trained on."""
    from specmesh.workloads import load_workload

    _, _, held = _split_requests(options)
    chat = [r for r in held if r["set"] in ("chat", "file")][:options.greedy_eval_prompts]
    encode = lambda r: encode_request(tokenizer, r, options.max_prompt_tokens)  # noqa: E731
    return {"held_out_chat": [encode(r) for r in chat],
            **{f"bench_{name}": [encode(r) for r in load_workload(name)] for name in ("chat", "code", "summarisation")}}


def _context_count(options: TrainOptions, train_requests: list[dict[str, Any]]) -> int:
    """How many context requests (see data.context_prompts) join the training prompts."""
    if options.context_prompts is not None:
        return options.context_prompts
    return len(train_requests) // 3


def _context_passages(tokenizer: Any, samples: list[Sample], eos: list[int]) -> list[str]:
    """Greedy answers of 30-160 tokens to chat prompts (long enough to summarise; short enough
    that a request carrying one stays within max_prompt_tokens), as text without the end token."""
    ends = set(eos)
    passages = []
    for sample in samples:
        completion = [t for t in sample.tokens[sample.prompt_length:] if t not in ends]
        if sample.prompt_set in ("chat", "file") and 30 <= len(completion) <= 160:
            passages.append(tokenizer.decode(completion, skip_special_tokens=True))
    return passages


def gather_data(verifier: Any, tokenizer: Any, options: TrainOptions, deadline: float,
                progress: Progress | None = None) -> tuple[list[Sample], list[Sample], dict[str, Any]]:
    """(train samples, held-out samples, data statistics)."""
    requests, train_requests, held_requests = _split_requests(options)
    held_requests = held_requests[:options.max_held_out_samples]
    encode = lambda r: encode_request(tokenizer, r, options.max_prompt_tokens)  # noqa: E731
    eos = eos_token_ids(verifier, tokenizer)
    pad = _pad_id(tokenizer, eos)
    # HF generate's step time on a small model is largely per-step overhead, so a wide batch is
    # cheap tokens on a GPU, up to a point: on an H200, SmolLM2 generated 11.5k tokens/s at 1536
    # sequences and 9.1k at 3072 (README, "The shipped SmolLM2 drafter").
    batch_size = options.generation_batch_size or (1536 if _cuda(options) else 8)
    rng = random.Random(options.seed)
    rounds = options.samples_per_prompt  # every prompt once per round, in a new order each round
    target = options.max_data_tokens or rounds * len(train_requests) * options.max_new_tokens // 2
    done = [0.0]

    def on_tokens(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress("data", done[0], target)

    common = dict(max_new_tokens=options.max_new_tokens, batch_size=batch_size, eos_token_ids=eos,
                  pad_token_id=pad, on_tokens=on_tokens)
    started = time.monotonic()
    held = sample_generations(verifier, [encode(r) for r in held_requests], prompt_sets=[r["set"] for r in held_requests],
                              seed=options.seed + 1, temperature=options.temperature, **common)
    train: list[Sample] = []
    context: list[dict[str, Any]] = []

    def generate(part: list[dict[str, Any]], temperature: float) -> None:
        remaining = None if options.max_data_tokens is None else options.max_data_tokens - sum(
            s.num_completion_tokens for s in train)
        if not part or (train and time.monotonic() >= deadline) or (remaining is not None and remaining <= 0):
            return
        train.extend(sample_generations(verifier, [encode(r) for r in part], prompt_sets=[r["set"] for r in part],
                                        seed=options.seed + 2 + len(train), deadline=deadline, max_tokens=remaining,
                                        temperature=temperature, **common))

    first_round = list(train_requests)
    rng.shuffle(first_round)
    if options.greedy_pass:
        generate(first_round, 0.0)
        # Passages for the context set: the verifier's own greedy answers, then one greedy pass
        # over the context requests too (greedy serving drafts on exactly that text).
        context = context_prompts(_context_passages(tokenizer, train, eos), _context_count(options, train_requests),
                                  options.seed + 3)
        generate(context, 0.0)
    sampled: list[dict[str, Any]] = [] if options.greedy_pass else first_round
    for _ in range(rounds - 1):
        round_requests = list(train_requests) + context
        rng.shuffle(round_requests)
        sampled += round_requests
    generate(sampled, options.temperature)
    seconds = time.monotonic() - started
    completion = sum(s.num_completion_tokens for s in train)
    stats = {
        "prompts": len(requests), "train_prompts": len(train_requests), "held_out_prompts": len(held_requests),
        "train_samples": len(train), "held_out_samples": len(held), "train_completion_tokens": completion,
        "held_out_completion_tokens": sum(s.num_completion_tokens for s in held),
        "generation_seconds": round(seconds, 1),
        "generation_tokens_per_s": round((completion + sum(s.num_completion_tokens for s in held)) / max(seconds, 1e-9), 1),
        "temperature": options.temperature,
        "greedy_pass_samples": min(len(train_requests) if options.greedy_pass else 0, len(train)),
        "context_prompts": len(context),
        "samples_by_set": {name: sum(s.prompt_set == name for s in train) for name in sorted({s.prompt_set for s in train})},
        "prompt_source": options.prompts_file or "built-in (chat, code, structured)",
    }
    return train, held, stats


def _learning_rate_factor(elapsed: float, total: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up over the first steps, then cosine decay to 10% by the end of the time budget."""
    warm = min(1.0, (step + 1) / warmup_steps)
    fraction = min(max(elapsed / max(total, 1e-9), 0.0), 1.0)
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * fraction)))


def train_loop(drafter: Any, head: ConfidenceHead, verifier: Any, samples: list[Sample], pad_token_id: int,
               options: TrainOptions, deadline: float, progress: Progress | None = None) -> dict[str, Any]:
    """Train until the deadline (or max_steps). Returns statistics, with a loss/agreement curve."""
    device = next(drafter.parameters()).device
    cuda = device.type == "cuda"
    batch_tokens = options.batch_tokens or (16384 if cuda else 2048)
    groups = [{"params": [p for p in drafter.parameters() if p.requires_grad], "lr": options.learning_rate,
               "base_lr": options.learning_rate},
              {"params": list(head.parameters()), "lr": options.head_learning_rate,
               "base_lr": options.head_learning_rate}]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    start = time.monotonic()
    total = max(deadline - start, 1e-3)
    step = epoch = positions = 0
    curve: list[dict[str, float]] = []
    window: list[tuple[float, float, float]] = []
    draft_ids = draft_token_ids(drafter)
    drafter.train()
    head.train()
    while True:
        plan = plan_batches(samples, batch_tokens, seed=options.seed + epoch)
        for indices in plan:
            now = time.monotonic()
            if now >= deadline or (options.max_steps is not None and step >= options.max_steps):
                break
            factor = _learning_rate_factor(now - start, total, step, warmup_steps=20)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            batch = make_batch([samples[i] for i in indices], pad_token_id, device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False):
                with torch.no_grad():
                    teacher = logits_at(verifier, batch)
                student = logits_at(drafter, batch)
            terms = distillation_terms(student, teacher, draft_ids)
            loss = distillation_loss(terms, options.tv_weight)
            head_loss = confidence_loss(head(student.detach().float()), terms.tv)
            optimizer.zero_grad(set_to_none=True)
            (loss + head_loss).backward()
            torch.nn.utils.clip_grad_norm_(groups[0]["params"], 1.0)
            optimizer.step()
            step += 1
            positions += batch.num_positions
            window.append((float(loss.detach()), float(terms.agree.float().mean()), float(head_loss.detach())))
            if step % 25 == 0:
                loss_avg, agree_avg, head_avg = (sum(v) / len(window) for v in zip(*window))
                curve.append({"step": step, "seconds": round(time.monotonic() - start, 1), "loss": round(loss_avg, 4),
                              "train_top1_agreement": round(agree_avg, 4), "head_loss": round(head_avg, 4)})
                window = []
                log.info("step %d: loss %.4f, agreement %.3f", step, loss_avg, agree_avg)
            if progress is not None:
                progress("training", min(time.monotonic() - start, total), total)
        else:
            epoch += 1
            continue
        break
    drafter.eval()
    head.eval()
    return {"steps": step, "completed_epochs": epoch, "scored_positions": positions,
            "training_seconds": round(time.monotonic() - start, 1), "batch_tokens": batch_tokens, "curve": curve}


def train_drafter(verifier: Any, tokenizer: Any, options: TrainOptions,
                  progress: Progress | None = None) -> TrainedDrafter:
    """Generate data with `verifier`, distil a drafter, evaluate it. The verifier must already be
    on options.device (bfloat16 on CUDA is fine) and frozen."""
    options.validate()
    started = time.monotonic()
    budget = options.minutes * 60.0
    data_deadline = started + budget * options.data_share
    train, held, data_stats = gather_data(verifier, tokenizer, options, data_deadline, progress)
    if not train:
        raise ValueError("no training data was generated: raise --minutes or check the prompts")
    eos = eos_token_ids(verifier, tokenizer)
    pad = _pad_id(tokenizer, eos)
    max_len = options.max_prompt_tokens + options.max_new_tokens
    train, held = trim(train, max_len), trim(held, max_len)
    drafter, shared, init_layers = build_drafter_model(verifier, options.num_layers, options.hidden_size,
                                                       seed=options.seed)
    vocab_rows = int(drafter.get_input_embeddings().num_embeddings)
    vocab_size = draft_vocab_size(options, vocab_rows)
    full_head = drafter.get_output_embeddings()
    vocabulary: dict[str, Any] = {"size": vocab_size or vocab_rows, "restricted": bool(vocab_size)}
    if vocab_size:
        ids = frequency_ranked_vocabulary([s.tokens[s.prompt_length:] for s in train], vocab_rows, vocab_size,
                                          always=eos)
        restrict_vocabulary(drafter, ids)
        chosen = set(ids)
        vocabulary.update({"train_coverage": _coverage(train, chosen), "held_out_coverage": _coverage(held, chosen)})
    head = ConfidenceHead().to(next(drafter.parameters()).device)
    drafter.eval()
    before = teacher_forced_metrics(drafter, verifier, held, pad) if held else {}
    training_deadline = started + budget
    training = train_loop(drafter, head, verifier, train, pad, options, training_deadline, progress)
    if progress is not None:
        progress("evaluation", 0, 2)
    rounds = options.acceptance_rounds or (512 if _cuda(options) else 64)
    after = teacher_forced_metrics(drafter, verifier, held, pad, head=head) if held else {}
    if vocab_size and held:
        # The cost of the restriction: the same trained layers scored with the full LM head.
        reduced_head = drafter.get_output_embeddings()
        drafter.set_output_embeddings(full_head)
        full = teacher_forced_metrics(drafter, verifier, held, pad)
        drafter.set_output_embeddings(reduced_head)
        vocabulary["top1_agreement_full_vocabulary_head"] = full.get("top1_agreement")
    if progress is not None:
        progress("evaluation", 1, 2)
    acceptance = greedy_acceptance(drafter, verifier, held, pad, max_rounds=rounds,
                                   batch_size=64 if _cuda(options) else 16) if held else {}
    greedy_text = greedy_text_agreement(drafter, verifier, greedy_eval_prompts(tokenizer, options),
                                        max_new_tokens=options.greedy_eval_tokens, eos_token_ids=eos,
                                        pad_token_id=pad, batch_size=64 if _cuda(options) else 8)
    if progress is not None:
        progress("evaluation", 2, 2)
    trainable = sum(p.numel() for p in drafter.parameters() if p.requires_grad)
    report = {
        "options": asdict(options),
        "device": str(next(drafter.parameters()).device),
        "drafter": {"num_layers": options.num_layers, "hidden_size": drafter.config.hidden_size,
                    "shares_verifier_embedding": shared is not None, "initialised_from_verifier_layers": init_layers,
                    "trainable_parameters": trainable},
        "data": data_stats,
        "training": training,
        "draft_vocabulary": vocabulary,
        "evaluation": {"untrained_top1_agreement": before.get("top1_agreement"),
                       "teacher_forced": after, "acceptance": acceptance,
                       # top-1 agreement on the verifier's greedy continuations (teacher_forced is on sampled text)
                       "greedy_text": greedy_text},
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    for p in drafter.parameters():
        p.requires_grad_(False)
    return TrainedDrafter(drafter, head, shared, report)

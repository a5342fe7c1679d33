"""Compare trained drafters for one verifier on the same greedy text, on CPU.

    OMP_WAIT_POLICY=PASSIVE python scripts/compare_drafters_cpu.py DIR_OR_REF [DIR_OR_REF ...] \\
        [--verifier smollm2-135m] [--eval-prompts 32] [--eval-tokens 128] [--out results.json]

The verifier's greedy continuations of held-out built-in chat prompts and of each `specmesh
bench` prompt set (chat, code, summarisation) are generated once; every drafter is then scored
on exactly those tokens (teacher-forced top-1 agreement with the verifier), so differences come
from the drafters alone: once for the model alone and once with context copying
(drafter/context_copy.py: where the text so far repeats and the model's top probability is below
the rule's threshold, the proposal is the token that followed the match). Prints one table row
per drafter and mode, with the share of tokens copied and how often a copy was right.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from drafter.context_copy import ContextCopyRule, NgramIndex
from specmesh.drafter_refs import parse_drafter_ref
from specmesh.drafter_training.data import sample_generations
from specmesh.drafter_training.evaluate import teacher_forced_metrics
from specmesh.drafter_training.export import load_trained_drafter
from specmesh.drafter_training.model import draft_token_ids
from specmesh.drafter_training.train import TrainOptions, greedy_eval_prompts
from specmesh.model_loading import eos_token_ids, load_causal_lm


@torch.no_grad()
def copy_agreement(model, samples, rule: ContextCopyRule) -> dict[str, float]:
    """Teacher-forced top-1 agreement of model + context copying with greedy text (whose next
    token is the verifier's argmax), the share of positions copied and the copies' accuracy."""
    ids = draft_token_ids(model)
    agree = copied = copies_right = total = 0
    for sample in samples:
        probs = model(torch.tensor([sample.tokens])).logits[0].float().softmax(dim=-1)
        top, best = probs.max(dim=-1)
        tokens = list(sample.tokens)
        index = NgramIndex()
        for t in range(sample.prompt_length, len(tokens)):
            proposal = int(best[t - 1])
            proposal = int(ids[proposal]) if ids is not None else proposal
            history = tokens[:t]
            index.extend(history)
            match = index.continuation(history, rule.max_ngram, rule.min_ngram)
            if match is not None and float(top[t - 1]) < rule.below_probability:
                proposal = match[0]
                copied += 1
                copies_right += proposal == tokens[t]
            agree += proposal == tokens[t]
            total += 1
    return {"top1_agreement": round(agree / max(total, 1), 4), "copied_share": round(copied / max(total, 1), 4),
            "copies_right": round(copies_right / max(copied, 1), 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("drafters", nargs="+")
    parser.add_argument("--verifier", default="smollm2-135m")
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args()
    verifier = load_causal_lm(args.verifier)
    model, tokenizer = verifier.model, verifier.tokenizer
    eos = eos_token_ids(model, tokenizer)
    prompts = greedy_eval_prompts(tokenizer, TrainOptions(greedy_eval_prompts=args.eval_prompts))
    greedy = {name: sample_generations(model, encoded, max_new_tokens=args.eval_tokens, temperature=0.0, batch_size=8,
                                       eos_token_ids=eos, pad_token_id=eos[0], seed=0)
              for name, encoded in prompts.items()}
    rule = ContextCopyRule()
    results, copying = {}, {}
    for ref in args.drafters:
        directory = Path(parse_drafter_ref(ref).model_ref)
        drafter = load_trained_drafter(directory, verifier_model=model)
        results[ref] = {name: round(teacher_forced_metrics(drafter.model, model, samples, eos[0])["top1_agreement"], 4)
                        for name, samples in greedy.items()}
        copying[ref] = {name: copy_agreement(drafter.model, samples, rule) for name, samples in greedy.items()}
    names = list(greedy)
    print("| drafter | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for ref, row in results.items():
        print(f"| {ref} | " + " | ".join(f"{row[n]:.1%}" for n in names) + " |")
        print(f"| {ref} + context copying | " + " | ".join(
            f"{copying[ref][n]['top1_agreement']:.1%} (copied {copying[ref][n]['copied_share']:.0%}, "
            f"right {copying[ref][n]['copies_right']:.0%})" for n in names) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"prompts": {k: len(v) for k, v in prompts.items()},
                                              "eval_tokens": args.eval_tokens, "agreement": results,
                                              "with_context_copying": copying, "rule": vars(rule)}, indent=2))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

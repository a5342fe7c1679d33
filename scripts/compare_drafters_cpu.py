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

from drafter.context_copy import ContextCopyRule
from specmesh.drafter_refs import parse_drafter_ref
from specmesh.drafter_training.data import sample_generations
from specmesh.drafter_training.evaluate import context_copy_agreement, teacher_forced_metrics
from specmesh.drafter_training.export import load_trained_drafter
from specmesh.drafter_training.train import TrainOptions, greedy_eval_prompts
from specmesh.model_loading import eos_token_ids, load_causal_lm


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
        copying[ref] = {name: context_copy_agreement(drafter.model, samples, rule) for name, samples in greedy.items()}
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

"""Give a trained (full-vocabulary) drafter a frequency-ranked draft vocabulary without
retraining, and measure what it costs in agreement and saves in drafter step time, on CPU.

    OMP_WAIT_POLICY=PASSIVE python scripts/drafter_vocab_cpu.py --samples SAMPLES.json \\
        [--drafter smollm2-135m-drafter] [--verifier smollm2-135m] [--sizes 4096 8192 16384] [--write 8192]

SAMPLES.json: the verifier's sampled continuations of built-in *training* prompts, a list of
{"tokens": [...], "prompt_length": n, "set": name} (what train-drafter's data stage makes); the
ranking counts their completion tokens only. Agreement is teacher-forced top-1 on the verifier's
greedy continuations of held-out built-in chat prompts and of the `specmesh bench` chat prompts,
for the full head and for each size. --write K stores the K-token vocabulary in the drafter
directory (draft_vocab.safetensors + specmesh_drafter.json) and the measurements in eval.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from specmesh.drafter_refs import parse_drafter_ref
from specmesh.drafter_training.data import sample_generations
from specmesh.drafter_training.evaluate import teacher_forced_metrics
from specmesh.drafter_training.export import load_trained_drafter, set_draft_vocabulary
from specmesh.drafter_training.model import frequency_ranked_vocabulary, restrict_vocabulary
from specmesh.drafter_training.train import TrainOptions, greedy_eval_prompts
from specmesh.engine import EngineConfig, build_drafter
from specmesh.model_loading import eos_token_ids, load_causal_lm
from specmesh.model_runner import ForwardRequest


def step_ms(drafter, context: int = 200, repeats: int = 30) -> float:
    """Median time of one single-session drafter step (forward + LM head) after `context` tokens."""
    runner = drafter.runner
    slot = runner.cache.allocate()
    runner.forward_flat([ForwardRequest(slot, [100 + i for i in range(context)], logits_from=context - 1)])
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        runner.forward_flat([ForwardRequest(slot, [200])])
        times.append((time.perf_counter() - started) * 1e3)
        runner.cache.truncate(slot, context)
    runner.cache.free(slot)
    return round(statistics.median(times[1:]), 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--verifier", default="smollm2-135m")
    parser.add_argument("--drafter", default="smollm2-135m-drafter")
    parser.add_argument("--samples", required=True)
    parser.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192, 16384])
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=96)
    parser.add_argument("--write", type=int, default=0)
    args = parser.parse_args()
    target = Path(parse_drafter_ref(args.drafter).model_ref)
    # Measured on a copy: the drafter directory changes only at the end, and only with --write.
    directory = Path(tempfile.mkdtemp()) / target.name
    shutil.copytree(target, directory)
    verifier = load_causal_lm(args.verifier)
    model, tokenizer = verifier.model, verifier.tokenizer
    eos = eos_token_ids(model, tokenizer)
    vocab_rows = int(model.get_input_embeddings().num_embeddings)
    raw = json.loads(Path(args.samples).read_text())
    completions = [x["tokens"][x["prompt_length"]:] for x in raw]
    prompts = greedy_eval_prompts(tokenizer, TrainOptions(greedy_eval_prompts=args.eval_prompts))
    greedy = {name: sample_generations(model, encoded, max_new_tokens=args.eval_tokens, temperature=0.0, batch_size=8,
                                       eos_token_ids=eos, pad_token_id=eos[0], seed=0)
              for name, encoded in prompts.items()}
    greedy_tokens = [t for samples in greedy.values() for s in samples for t in s.tokens[s.prompt_length:]]

    def agreement(drafter_model) -> dict[str, float]:
        return {name: teacher_forced_metrics(drafter_model, model, samples, eos[0])["top1_agreement"]
                for name, samples in greedy.items()}

    config = EngineConfig(num_slots=2, max_context=1024)
    result = {"samples": len(raw), "completion_tokens": sum(map(len, completions)),
              "eval_prompts": {k: len(v) for k, v in prompts.items()}, "eval_tokens": args.eval_tokens}
    set_draft_vocabulary(directory, None)  # measure the full head first, whatever the directory held
    full = load_trained_drafter(directory, verifier_model=model)
    result["full"] = {"vocabulary": vocab_rows, "greedy_text_top1_agreement": agreement(full.model),
                      "drafter_step_ms": step_ms(build_drafter(str(directory), model, tokenizer, config))}
    chosen: list[int] = []
    for size in args.sizes:
        ids = frequency_ranked_vocabulary(completions, vocab_rows, size, always=eos)
        set_draft_vocabulary(directory, None)
        loaded = load_trained_drafter(directory, verifier_model=model)
        restrict_vocabulary(loaded.model, ids)
        kept = set(ids)
        result[str(size)] = {"greedy_text_top1_agreement": agreement(loaded.model),
                             "coverage_of_greedy_eval_text": round(sum(t in kept for t in greedy_tokens)
                                                                   / max(len(greedy_tokens), 1), 4)}
        set_draft_vocabulary(directory, ids)
        result[str(size)]["drafter_step_ms"] = step_ms(build_drafter(str(directory), model, tokenizer, config))
        if size == args.write:
            chosen = ids
    print(json.dumps(result, indent=2))
    if chosen:
        set_draft_vocabulary(target, chosen)
        report_path = target / "eval.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        report["draft_vocabulary_cpu"] = result | {"written": args.write}
        report_path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

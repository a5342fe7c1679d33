"""What `specmesh train-drafter` does, end to end: check the inputs, load the verifier, train
with a progress bar on stderr, export the drafter directory with its evaluation (JSON + plot),
and return a one-screen summary for stdout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from specmesh.drafter_training.data import load_prompt_file
from specmesh.drafter_training.evaluate import write_report
from specmesh.drafter_training.export import export_drafter
from specmesh.drafter_training.train import TrainOptions, train_drafter
from specmesh.model_loading import load_causal_lm, tokenizer_fingerprint

STAGE_LABELS = {"data": "generating data (tokens)", "training": "training (seconds)", "evaluation": "evaluating"}


def run_train_drafter(verifier_ref: str, out: str | Path, options: TrainOptions, show_progress: bool = True
                      ) -> dict[str, Any]:
    """Train and export; returns the report. Raises SpecmeshError / ValueError on bad input
    (checked before the verifier is loaded where possible)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    options.validate()
    if options.prompts_file:
        load_prompt_file(options.prompts_file)  # a bad file fails now, not after loading the model
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    out = Path(out)
    started = time.monotonic()
    dtype = torch.bfloat16 if options.device.startswith("cuda") else torch.float32
    loaded = load_causal_lm(verifier_ref, dtype=dtype, device=options.device)
    load_seconds = time.monotonic() - started
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not show_progress) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, completed: float, total: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(STAGE_LABELS.get(stage, stage), total=total)
            bar.update(tasks[stage], completed=int(completed), total=int(max(total, completed)))

        trained = train_drafter(loaded.model, loaded.tokenizer, options, progress)
    report = trained.report
    report["verifier"] = {"ref": verifier_ref, "name": loaded.name, "load_seconds": round(load_seconds, 1)}
    evaluation = report["evaluation"]
    summary = {
        "top1_agreement": evaluation["teacher_forced"].get("top1_agreement"),
        "untrained_top1_agreement": evaluation.get("untrained_top1_agreement"),
        "tokens_per_round": evaluation["acceptance"].get("tokens_per_round"),
        "greedy_text_top1_agreement": {k: v.get("top1_agreement") for k, v in evaluation.get("greedy_text", {}).items()},
        "head_ece": evaluation["teacher_forced"].get("calibration_head", {}).get("ece"),
        "train_completion_tokens": report["data"]["train_completion_tokens"],
        "training_seconds": report["training"]["training_seconds"],
        "device": report["device"],
        "draft_vocabulary": report["draft_vocabulary"]["size"] if report["draft_vocabulary"]["restricted"] else None,
    }
    export_drafter(out, trained.model, loaded.tokenizer, shared=trained.shared, head=trained.head,
                   verifier_name=loaded.name, verifier_fingerprint=tokenizer_fingerprint(loaded.tokenizer),
                   summary=summary)
    report["wall_seconds_total"] = round(time.monotonic() - started, 1)
    write_report(report, out)
    return report


def format_summary(report: dict[str, Any], out: str | Path) -> str:
    evaluation = report["evaluation"]
    tf, acceptance = evaluation["teacher_forced"], evaluation["acceptance"]
    lines = [f"drafter written to {out} ({report['drafter']['num_layers']} layers, "
             f"{report['drafter']['trainable_parameters'] / 1e6:.2f}M trained parameters, "
             f"embedding shared: {report['drafter']['shares_verifier_embedding']})",
             f"data: {report['data']['train_completion_tokens']} tokens from {report['data']['train_samples']} "
             f"samples in {report['data']['generation_seconds']} s; training: {report['training']['steps']} steps "
             f"in {report['training']['training_seconds']} s"]
    vocabulary = report.get("draft_vocabulary", {})
    if vocabulary.get("restricted"):
        lines.append(f"draft vocabulary: {vocabulary['size']} tokens, covering {vocabulary['train_coverage']:.1%} of the "
                     f"training text and {vocabulary['held_out_coverage']:.1%} of the held-out text")
    if tf.get("num_positions"):
        lines.append(f"held-out top-1 agreement: {tf['top1_agreement']:.1%} "
                     f"(untrained {evaluation['untrained_top1_agreement']:.1%}); by set: {tf['top1_agreement_by_set']}")
    for name, label in (("held_out_chat", "held-out chat prompts"), ("bench_chat", "`specmesh bench` chat prompts"),
                        ("bench_code", "`specmesh bench` code prompts"),
                        ("bench_summarisation", "`specmesh bench` summarisation prompts")):
        greedy = evaluation.get("greedy_text", {}).get(name)
        if greedy and greedy.get("top1_agreement") is not None:
            copy = greedy.get("with_context_copy") or {}
            with_copy = (f" ({copy['top1_agreement']:.1%} with context copying)"
                         if copy.get("top1_agreement") is not None else "")
            lines.append(f"top-1 agreement on greedy text of {greedy['prompts']} {label}: "
                         f"{greedy['top1_agreement']:.1%}{with_copy}")
    if acceptance.get("num_rounds"):
        lines.append("greedy acceptance P(first j accepted), j=1..8: "
                     + " ".join(f"{p:.2f}" for p in acceptance["p_accepted_at_least"]))
        lines.append("expected tokens per round for draft length 1..8: "
                     + " ".join(f"{t:.2f}" for t in acceptance["tokens_per_round"]))
    if "calibration_head" in tf:
        lines.append(f"confidence head calibration error (ECE): {tf['calibration_head']['ece']:.3f} "
                     f"(draft probability: {tf['calibration_draft_probability']['ece']:.3f})")
    lines.append(f"report: {Path(out) / 'eval.json'}, plot: {Path(out) / 'eval.png'}")
    return "\n".join(lines)

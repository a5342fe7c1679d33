"""The `specmesh` command line. Generated text goes to stdout; everything else to stderr."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

import typer

from specmesh.errors import SpecmeshError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="specmesh: speculative decoding split across a cluster.")

@app.callback()
def _root() -> None:
    """specmesh: speculative decoding split across a cluster."""


DEFAULT_VERIFIER = "smollm2-135m"
DEFAULT_DRAFTER = "auto"  # see specmesh/local_defaults.py
DTYPE_HELP = ("float32, bfloat16 or float16; auto: bfloat16 on CUDA, or on a CPU that computes it natively for a "
              "verifier with a shipped drafter; else float32.")
DRAFTER_HELP = ("Drafter REF, or 'prompt-lookup', 'layers:N' (verifier's first N layers), 'none'; auto: the drafter "
                "shipped for the verifier when running in bfloat16, else prompt-lookup.")


def _local_choice(verifier: str, drafter: str, dtype: str) -> tuple[str, str]:
    # Imported here: local_defaults loads torch, which commands that need no model should not.
    from specmesh.local_defaults import local_choice

    return local_choice(verifier, drafter, dtype)


def _cluster_env(dtype: str) -> dict[str, str]:
    return {"SPECMESH_VERIFIER_DTYPE": dtype, "SPECMESH_DRAFTER_DTYPE": os.environ.get("SPECMESH_DRAFTER_DTYPE", dtype)}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=2)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt text."),
    target: str | None = typer.Option(None, help="host:port of a running gateway; without it, run in-process."),
    verifier: str = typer.Option(DEFAULT_VERIFIER, help="Verifier model REF (hub id, directory, GGUF, short name)."),
    drafter: str = typer.Option(DEFAULT_DRAFTER, help=DRAFTER_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    seed: int | None = typer.Option(None, help="Makes sampling reproducible."),
    policy: str = typer.Option("adaptive", help="adaptive: draft and verify what the calibration and the "
                                                "verifier's measured costs say pays; fixed: --draft-length every round."),
    draft_length: int = typer.Option(4, "--draft-length", help="Tokens drafted and verified per round (--policy fixed)."),
    context_copy: bool = typer.Option(True, "--context-copy/--no-context-copy",
                                      help="Model drafters copy from the context where it repeats and they are unsure."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Wrap the prompt as a user message in the chat template."),
    stats: bool = typer.Option(False, "--stats", help="Print acceptance and speed to stderr."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Generate text for PROMPT: through a running gateway (--target) or in this process."""
    _setup_logging(verbose)
    if target is not None:
        _generate_remote(target, prompt, chat, max_tokens, temperature, top_p, top_k, seed, stats)
        return
    from scheduler.draft_policy import check_policy_name
    from specmesh.detokenize import IncrementalDetokenizer
    from specmesh.engine import Engine, EngineConfig
    from specmesh.sampling_params import SamplingParams

    try:
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed).validate()
        drafter, dtype = _local_choice(verifier, drafter, dtype)
        check_policy_name(policy, "--policy")  # before loading the model: fail fast
        engine = Engine.from_refs(verifier, drafter, EngineConfig(draft_length=draft_length, policy=policy,
                                                                      context_copy=context_copy),
                                  dtype=_torch_dtype(dtype))
        use_chat = chat and getattr(engine.tokenizer, "chat_template", None)
        prompt_ids = engine.encode(messages=[{"role": "user", "content": prompt}]) if use_chat else engine.encode(prompt)
        session = engine.make_session(prompt_ids, params, max_tokens)
    except (SpecmeshError, ValueError) as error:
        _fail(error)

    async def run() -> None:
        detokenizer = IncrementalDetokenizer(engine.tokenizer)
        async for commit in engine.stream(session):
            sys.stdout.write(detokenizer.add(commit.token_ids))
            sys.stdout.flush()
        sys.stdout.write(detokenizer.flush() + "\n")

    start = time.perf_counter()
    asyncio.run(run())
    elapsed = time.perf_counter() - start
    if stats:
        s = session.stats
        generated = session.num_generated
        rate = s.accepted_tokens / s.drafted_tokens if s.drafted_tokens else 0.0
        typer.echo(
            f"[specmesh] {generated} tokens in {elapsed:.2f} s ({generated / elapsed:.1f} tokens/s); "
            f"rounds {s.rounds}, drafted {s.drafted_tokens}, accepted {s.accepted_tokens} "
            f"(acceptance {rate:.1%}, {generated / max(s.rounds, 1):.2f} tokens/round); "
            f"drafter {engine.drafter.name if engine.drafter else 'none'}; {dtype}; finish {session.finish_reason}",
            err=True,
        )


def _torch_dtype(name: str):
    import torch

    from specmesh.replica_options import DTYPES

    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def _generate_remote(target: str, prompt: str, chat: bool, max_tokens: int, temperature: float, top_p: float,
                     top_k: int, seed: int | None, stats: bool) -> None:
    from specmesh.client import SpecmeshClient, SpecmeshClientError

    start = time.perf_counter()
    request = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    last = None
    try:
        with SpecmeshClient(target, api_key=os.environ.get("SPECMESH_API_KEY")) as client:
            for delta in client.stream(**request, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                       top_k=top_k, seed=seed):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                last = delta
    except SpecmeshClientError as error:
        _fail(error)
    sys.stdout.write("\n")
    if stats and last is not None:
        elapsed = time.perf_counter() - start
        s = last.speculation
        generated = last.usage.completion_tokens
        typer.echo(f"[specmesh] {generated} tokens in {elapsed:.2f} s ({generated / elapsed:.1f} tokens/s); "
                   f"rounds {s.rounds}, drafted {s.drafted_tokens}, accepted {s.accepted_tokens}; "
                   f"finish {last.finish_reason}", err=True)


SERVICES = ("gateway", "scheduler", "drafter", "verifier")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def serve(ctx: typer.Context, service: str = typer.Argument(..., help="gateway | scheduler | drafter | verifier")) -> None:
    """Run one service (what a Kubernetes pod runs). `specmesh serve SERVICE --help` lists its options."""
    if service not in SERVICES:
        typer.echo(f"error: unknown service {service!r}; choose one of {', '.join(SERVICES)}", err=True)
        raise typer.Exit(code=2)
    import importlib

    # Each service owns its flags (and SPECMESH_<SERVICE>_* env vars) in its own __main__.
    module = importlib.import_module(f"{service}.__main__")
    module.app(args=list(ctx.args), prog_name=f"specmesh serve {service}")


@app.command()
def up(
    verifier: str = typer.Option(DEFAULT_VERIFIER, help="Verifier model REF."),
    drafter: str = typer.Option(DEFAULT_DRAFTER, help=DRAFTER_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    port: int = typer.Option(50051, help="Gateway gRPC port."),
    http_port: int = typer.Option(8000, "--http-port", help="Gateway OpenAI-compatible HTTP port (0: off)."),
    redis_url: str | None = typer.Option(None, "--redis-url",
                                         help="Share scheduler calibration and gateway rate limits through Redis "
                                              "(default: in-memory)."),
    api_keys_file: str | None = typer.Option(None, "--api-keys-file",
                                             help="Require one of these API keys (one per line, or sha256:<hex>)."),
    policy: str = typer.Option("adaptive", help="Scheduler policy: adaptive or fixed."),
    draft_length: int = typer.Option(4, "--draft-length", help="Draft length of the fixed policy."),
    log_dir: str | None = typer.Option(None, "--log-dir", help="Write each service's log to DIR/<service>.log."),
    trace_file: str | None = typer.Option(None, "--trace-file",
                                          help="Every service appends its spans here (OTLP JSON lines) for "
                                               "`specmesh tune`."),
) -> None:
    """Start gateway, scheduler, drafter and verifier as separate processes on loopback."""
    from pathlib import Path

    from specmesh.local_cluster import ClusterStartError, LocalCluster

    try:
        drafter, dtype = _local_choice(verifier, drafter, dtype)
        _torch_dtype(dtype)
    except ValueError as error:
        _fail(error)
    cluster = LocalCluster(verifier=verifier, drafter=drafter, port=port, draft_length=draft_length,
                           policy=policy, redis_url=redis_url, http_port=http_port or None,
                           api_keys_file=api_keys_file, log_dir=Path(log_dir) if log_dir else None,
                           trace_file=Path(trace_file) if trace_file else None, extra_env=_cluster_env(dtype))
    typer.echo(f"specmesh up: starting verifier, drafter ({drafter}, {dtype}), scheduler, gateway ...", err=True)
    try:
        cluster.start()
    except ClusterStartError as error:
        _fail(error)
    typer.echo(f"specmesh gateway listening on {cluster.gateway_address} (gRPC)"
               + (f" and http://127.0.0.1:{http_port}/v1 (OpenAI-compatible HTTP)" if http_port else ""))
    typer.echo("press Ctrl-C to stop", err=True)
    code = 0
    try:
        code = cluster.wait()
    finally:
        cluster.stop()
        typer.echo("specmesh up: stopped", err=True)
    raise typer.Exit(code=code)


@app.command()
def bench(
    target: str | None = typer.Option(None, help="host:port of a running gateway; without it, start a local cluster."),
    verifier: str = typer.Option(DEFAULT_VERIFIER, help="Verifier REF for the local cluster."),
    drafter: str = typer.Option(DEFAULT_DRAFTER, help=DRAFTER_HELP.replace("Drafter REF", "Drafter REF for the local cluster")),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    workload: str = typer.Option("mixed", help="chat | code | summarisation | mixed | a JSONL file."),
    concurrency: str = typer.Option("1,8", help="Comma-separated concurrency levels."),
    max_tokens: int = typer.Option(64, "--max-tokens"),
    requests: int = typer.Option(8, "--requests", help="Requests per mode and concurrency level (at least the level)."),
    json_out: str | None = typer.Option(None, "--json", help="Write the results as JSON here."),
    plot: str | None = typer.Option(None, "--plot", help="Draw tokens/s versus concurrency to this PNG."),
    baseline: str | None = typer.Option(None, "--baseline",
                                        help="'hf': also run HF generate and assisted generation in-process "
                                             "(concurrency 1) on the same models."),
    cost_ratio: float | None = typer.Option(None, "--cost-ratio",
                                            help="Drafter/verifier cost ratio c for the analytic ceiling "
                                                 "(default: 0 for prompt lookup, else from the services' profiles)."),
) -> None:
    """Measure per-user and aggregate tokens/s with speculation on and off, interleaved in one run."""
    import json

    from rich.progress import Progress

    from specmesh.bench import DEFAULT_MODES, format_table, run_bench, to_json
    from specmesh.local_cluster import ClusterStartError, LocalCluster, free_port
    from specmesh.workloads import load_workload

    try:
        levels = [int(x) for x in concurrency.split(",") if x.strip()]
        prompts = load_workload(workload)
        drafter, dtype = _local_choice(verifier, drafter, dtype)
        _torch_dtype(dtype)
    except ValueError as error:
        _fail(error)
    cluster = None
    cost_ratio_measured = None
    if target is None:
        cluster = LocalCluster(verifier=verifier, drafter=drafter, port=free_port(), extra_env=_cluster_env(dtype))
        typer.echo("bench: starting a local cluster ...", err=True)
        try:
            cluster.start()
        except ClusterStartError as error:
            _fail(error)
        target = cluster.gateway_address
        cost_ratio_measured = asyncio.run(_measured_cost_ratio(cluster))
    try:
        steps = len(levels) * 2 * len(DEFAULT_MODES)
        with Progress(transient=True, console=None) as progress:
            task = progress.add_task("benchmarking", total=steps)
            summaries = asyncio.run(run_bench(target, prompts, levels, max_tokens, requests,
                                              progress=lambda: progress.advance(task)))
    finally:
        if cluster is not None:
            cluster.stop()
    if baseline == "hf":
        from specmesh.bench_baselines import run_hf_baselines

        typer.echo("bench: HF baselines (in-process, concurrency 1) ...", err=True)
        summaries += run_hf_baselines(verifier, drafter, prompts, max_tokens, max(requests // 2, 2))
    elif baseline is not None:
        _fail(ValueError(f"unknown --baseline {baseline!r}: use 'hf'"))
    ratio = cost_ratio if cost_ratio is not None else (cost_ratio_measured if cost_ratio_measured is not None else 0.0)
    _add_ceilings(summaries, ratio)
    meta = {"target": target, "workload": workload, "max_tokens": max_tokens, "verifier": verifier,
            "drafter": drafter, "dtype": dtype if cluster is not None else None, "local_cluster": cluster is not None,
            "cost_ratio": ratio}
    if plot:
        from specmesh.bench_baselines import plot_bench

        plot_bench(summaries, plot)
    if json_out:
        with open(json_out, "w") as handle:
            json.dump(to_json(summaries, meta), handle, indent=2)
    typer.echo(format_table(summaries))


async def _measured_cost_ratio(cluster) -> float | None:
    """c = one drafter step / one verifier forward of one token, from the services' Profile tables."""
    from specmesh.grpc_server import insecure_channel
    from specmesh.v1 import common_pb2, drafter_pb2_grpc, verifier_pb2_grpc

    addresses = {s.name: s.address for s in cluster.services}
    if "drafter" not in addresses:
        return None
    async with insecure_channel(addresses["verifier"]) as channel:
        verifier_profile = await verifier_pb2_grpc.VerifierStub(channel).Profile(common_pb2.ProfileRequest())
    async with insecure_channel(addresses["drafter"]) as channel:
        drafter_profile = await drafter_pb2_grpc.DrafterStub(channel).Profile(common_pb2.ProfileRequest())
    if not verifier_profile.cost_table:
        return None
    if not drafter_profile.cost_table:
        return 0.0  # prompt lookup: no model
    return drafter_profile.cost_table[0].forward_seconds / verifier_profile.cost_table[0].forward_seconds


def _add_ceilings(summaries: list[dict], cost_ratio: float) -> None:
    """Next to each measured speedup, the analytic ceiling for its measured α and γ."""
    from specmesh.bench_baselines import analytic_ceiling

    for s in summaries:
        if s.get("mode") == "off" or "tau" not in s or not s.get("acceptance_rate"):
            continue
        gamma = s.get("mean_draft_length", 0.0)
        s["analytic_ceiling"] = analytic_ceiling(s["acceptance_rate"], gamma, cost_ratio) if gamma else 1.0


@app.command()
def tune(
    traces: list[str] = typer.Argument(..., help="OTLP JSON lines trace files (--trace-file output), or directories."),
    plot: str | None = typer.Option(None, "--plot", help="Also draw the calibration and speedup curves to this PNG."),
    max_draft_length: int = typer.Option(12, "--max-draft-length", help="Longest fixed draft length to model."),
) -> None:
    """Read exported traces; report acceptance by position and confidence, chosen verify length
    versus load, expected speedup per fixed draft length versus what the scheduler achieved,
    and recommended settings."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from specmesh.tune import analyze, load_spans
    from specmesh.tune_output import plot_report, print_report

    try:
        with Progress(TextColumn("reading traces"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("read", total=None)
            spans = load_spans(traces, progress=lambda done, total: progress.update(task, completed=done, total=total))
    except (OSError, ValueError) as error:
        _fail(error)
    report = analyze(spans, max_fixed_length=max_draft_length)
    print_report(report, Console(width=max(Console().width, 100)))
    if plot:
        plot_report(report, plot)
        typer.echo(f"plot written to {plot}", err=True)


@app.command("train-drafter")
def train_drafter(
    verifier: str = typer.Option(..., help="Verifier model REF the drafter is trained for."),
    out: str = typer.Option(..., "--out", help="Directory to write the drafter to (then a REF for --drafter)."),
    layers: int = typer.Option(2, help="Decoder layers of the drafter."),
    hidden: int | None = typer.Option(None, help="Hidden size (default: the verifier's; then the drafter shares "
                                                 "the verifier's frozen embedding and LM head)."),
    prompts: str | None = typer.Option(None, "--prompts", help="JSONL of {\"prompt\"} or {\"messages\"} lines "
                                                              "(default: built-in chat, code, structured prompts)."),
    minutes: float = typer.Option(10.0, help="Time for data generation and training; evaluation follows."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    max_data_tokens: int | None = typer.Option(None, "--max-data-tokens", help="Stop generating data after N tokens."),
    draft_vocab: int | None = typer.Option(None, "--draft-vocab", help="Draft from the K tokens the verifier "
                                           "generates most often (0: the whole vocabulary; default: 8192 for "
                                           "vocabularies of 32k tokens or more, else the whole vocabulary)."),
    data_share: float = typer.Option(0.5, "--data-share", help="Share of --minutes spent generating data."),
    data_temperature: float = typer.Option(0.7, "--data-temperature", help="Temperature of the sampled data."),
    greedy_pass: bool = typer.Option(True, "--greedy-pass/--no-greedy-pass",
                                     help="Generate the first pass over the prompts greedily (the text greedy "
                                          "serving drafts on); the rest is sampled."),
    context_prompts: int | None = typer.Option(None, "--context-prompts", help="Requests that carry one of the "
                                               "verifier's greedy answers to summarise or rewrite (default: a third "
                                               "as many as training prompts; 0: none)."),
    generation_batch: int | None = typer.Option(None, "--generation-batch", help="Sequences generated at once "
                                                "(default: 1536 on CUDA, 8 on CPU)."),
    seed: int = typer.Option(0, help="Seed of the data split, sampling and initialisation."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Distil a drafter (with a confidence head) for VERIFIER from its own sampled generations;
    write a directory that --drafter loads, with a held-out evaluation (eval.json, eval.png)."""
    _setup_logging(verbose)
    from specmesh.drafter_training.command import format_summary, run_train_drafter
    from specmesh.drafter_training.train import TrainOptions

    options = TrainOptions(num_layers=layers, hidden_size=hidden, minutes=minutes, device=device,
                           prompts_file=prompts, max_data_tokens=max_data_tokens, seed=seed,
                           draft_vocab=draft_vocab, data_share=data_share, temperature=data_temperature,
                           greedy_pass=greedy_pass, context_prompts=context_prompts,
                           generation_batch_size=generation_batch)
    try:
        report = run_train_drafter(verifier, out, options)
    except (SpecmeshError, ValueError) as error:
        _fail(error)
    typer.echo(format_summary(report, out))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

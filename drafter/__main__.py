"""`python -m drafter --model REF [options]`, also mounted as `specmesh serve drafter`.

Every DrafterConfig field is a flag, and each flag can be set by the environment variable
SPECMESH_DRAFTER_<FIELD> (e.g. SPECMESH_DRAFTER_DRAFT_AHEAD_TOKENS=8), which is how a
Kubernetes pod configures it. Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import typer

from specmesh.replica_options import parse_sizes

from drafter.config import DEFAULT_PROFILE_BATCH_SIZES, DrafterConfig

ENV_PREFIX = "SPECMESH_DRAFTER_"

app = typer.Typer(add_completion=False, help="Run one drafter replica (the draft model).")


def _env(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _parse_sizes(text: str) -> tuple[int, ...]:
    try:
        return parse_sizes(text)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


@app.callback(invoke_without_command=True)
def main(
    model: str = typer.Option(..., envvar=_env("model"),
                              help="Drafter REF (hub id, directory, GGUF file, short name), 'prompt-lookup', "
                                   "or 'layers:N' (the verifier's first N layers)."),
    verifier_model: str = typer.Option("", "--verifier-model", envvar=_env("verifier_model"),
                                       help="Verifier REF: required for 'layers:N'; otherwise its tokenizer is "
                                            "checked against the drafter's."),
    host: str = typer.Option("127.0.0.1", envvar=_env("host"), help="Address to listen on."),
    port: int = typer.Option(0, envvar=_env("port"), help="Port to listen on (0 = any free port)."),
    num_slots: int = typer.Option(16, "--num-slots", envvar=_env("num_slots"),
                                  help="Sessions held at once (KV cache slots)."),
    max_context: int = typer.Option(2048, "--max-context", envvar=_env("max_context"),
                                    help="Most tokens per session (history plus drafts)."),
    draft_top_k: int = typer.Option(8, "--draft-top-k", envvar=_env("draft_top_k"),
                                    help="Tokens kept in each draft distribution q."),
    max_draft_tokens: int = typer.Option(16, "--max-draft-tokens", envvar=_env("max_draft_tokens"),
                                         help="Most tokens drafted for one sync."),
    idle_ttl_s: float = typer.Option(600.0, "--idle-ttl-s", envvar=_env("idle_ttl_s"),
                                     help="Drop sessions idle this many seconds (0 = never)."),
    draft_ahead_tokens: int = typer.Option(4, "--draft-ahead-tokens", envvar=_env("draft_ahead_tokens"),
                                           help="Tokens drafted ahead per session while its chunk is verified "
                                                "(0 = off)."),
    context_copy: bool = typer.Option(True, "--context-copy/--no-context-copy", envvar=_env("context_copy"),
                                      help="Copy from the context where it repeats and the model is unsure."),
    batch_wait_ms: float = typer.Option(2.0, "--batch-wait-ms", envvar=_env("batch_wait_ms"),
                                        help="How long a sync waits for others to share its forward."),
    dtype: str = typer.Option("float32", envvar=_env("dtype"), help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", envvar=_env("device"), help="cpu, cuda or cuda:N."),
    profile_batch_sizes: str = typer.Option(
        ",".join(map(str, DEFAULT_PROFILE_BATCH_SIZES)), "--profile-batch-sizes",
        envvar=_env("profile_batch_sizes"), help="Sessions per draft step (comma-separated) timed at start-up."),
    grace_s: float = typer.Option(5.0, "--grace-s", envvar=_env("grace_s"),
                                  help="Seconds in-flight calls get to finish on SIGTERM."),
    verbose: bool = typer.Option(False, "--verbose", "-v", envvar=_env("verbose"), help="Debug logging."),
    metrics_port: int = typer.Option(0, "--metrics-port", envvar=_env("metrics_port"),
                                     help="Serve Prometheus /metrics on this port (0 = off)."),
    trace_file: str = typer.Option("", "--trace-file", envvar="SPECMESH_TRACE_FILE",
                                   help="Append OTLP JSON trace lines here (for specmesh tune); OTEL_* also apply."),
) -> None:
    """Run one drafter replica until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        config = DrafterConfig(
            model=model, verifier_model=verifier_model, host=host, port=port, num_slots=num_slots,
            max_context=max_context, draft_top_k=draft_top_k, max_draft_tokens=max_draft_tokens,
            idle_ttl_s=idle_ttl_s, draft_ahead_tokens=draft_ahead_tokens, batch_wait_ms=batch_wait_ms,
            context_copy=context_copy,
            dtype=dtype, device=device, profile_batch_sizes=_parse_sizes(profile_batch_sizes), grace_s=grace_s,
            metrics_port=metrics_port,
        )
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None

    from drafter.server import serve
    from specmesh.errors import SpecmeshError

    from specmesh.telemetry import setup_telemetry

    setup_telemetry("drafter", trace_file or None)
    try:
        asyncio.run(serve(config))
    except SpecmeshError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None


if __name__ == "__main__":
    app(prog_name="python -m drafter")

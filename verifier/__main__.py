"""`python -m verifier --model REF [options]`, also mounted as `specmesh serve verifier`.

Every VerifierConfig field is a flag, and each flag can be set by the environment variable
SPECMESH_VERIFIER_<FIELD> (e.g. SPECMESH_VERIFIER_NUM_SLOTS=32), which is how a Kubernetes pod
configures it. Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import typer

from specmesh.replica_options import parse_sizes

from verifier.config import DEFAULT_PROFILE_BATCH_TOKENS, VerifierConfig

ENV_PREFIX = "SPECMESH_VERIFIER_"

app = typer.Typer(add_completion=False, help="Run one verifier replica (the target model).")


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
                              help="Model REF: hub id, local directory, GGUF file or short name."),
    host: str = typer.Option("127.0.0.1", envvar=_env("host"), help="Address to listen on."),
    port: int = typer.Option(0, envvar=_env("port"), help="Port to listen on (0 = any free port)."),
    num_slots: int = typer.Option(16, "--num-slots", envvar=_env("num_slots"),
                                  help="Sessions held at once (KV cache slots)."),
    max_context: int = typer.Option(2048, "--max-context", envvar=_env("max_context"),
                                    help="Most tokens per session (history plus draft)."),
    dtype: str = typer.Option("float32", envvar=_env("dtype"), help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", envvar=_env("device"), help="cpu, cuda or cuda:N."),
    idle_ttl_s: float = typer.Option(600.0, "--idle-ttl-s", envvar=_env("idle_ttl_s"),
                                     help="Drop sessions idle this many seconds (0 = never)."),
    batch_wait_ms: float = typer.Option(2.0, "--batch-wait-ms", envvar=_env("batch_wait_ms"),
                                        help="How long a Verify call waits for others to share its forward."),
    max_batch_tokens: int = typer.Option(1024, "--max-batch-tokens", envvar=_env("max_batch_tokens"),
                                         help="Start a forward without waiting once this many tokens are queued."),
    profile_batch_tokens: str = typer.Option(
        ",".join(map(str, DEFAULT_PROFILE_BATCH_TOKENS)), "--profile-batch-tokens",
        envvar=_env("profile_batch_tokens"), help="Batch sizes (tokens, comma-separated) timed at start-up."),
    grace_s: float = typer.Option(5.0, "--grace-s", envvar=_env("grace_s"),
                                  help="Seconds in-flight calls get to finish on SIGTERM."),
    verbose: bool = typer.Option(False, "--verbose", "-v", envvar=_env("verbose"), help="Debug logging."),
    metrics_port: int = typer.Option(0, "--metrics-port", envvar=_env("metrics_port"),
                                     help="Serve Prometheus /metrics on this port (0 = off)."),
    trace_file: str = typer.Option("", "--trace-file", envvar="SPECMESH_TRACE_FILE",
                                   help="Append OTLP JSON trace lines here (for specmesh tune); OTEL_* also apply."),
) -> None:
    """Run one verifier replica until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        config = VerifierConfig(
            model=model, host=host, port=port, num_slots=num_slots, max_context=max_context, dtype=dtype,
            device=device, idle_ttl_s=idle_ttl_s, batch_wait_ms=batch_wait_ms, max_batch_tokens=max_batch_tokens,
            profile_batch_tokens=_parse_sizes(profile_batch_tokens), grace_s=grace_s,
            metrics_port=metrics_port,
        )
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None

    from transformers.utils import logging as transformers_logging

    from specmesh.errors import SpecmeshError
    from verifier.server import serve

    transformers_logging.disable_progress_bar()  # a progress bar per load is noise in pod logs

    from specmesh.telemetry import setup_telemetry

    setup_telemetry("verifier", trace_file or None)
    try:
        asyncio.run(serve(config))
    except SpecmeshError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None


if __name__ == "__main__":
    app(prog_name="python -m verifier")

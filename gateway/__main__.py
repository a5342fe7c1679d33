"""`python -m gateway` / `specmesh serve gateway`."""

from __future__ import annotations

import logging
import sys

import typer

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., envvar="SPECMESH_GATEWAY_MODEL",
                              help="The verifier's model REF; only its tokenizer and chat template are loaded."),
    scheduler: str = typer.Option(..., envvar="SPECMESH_GATEWAY_SCHEDULER", help="host:port of the scheduler."),
    host: str = typer.Option("127.0.0.1", envvar="SPECMESH_GATEWAY_HOST"),
    port: int = typer.Option(50051, envvar="SPECMESH_GATEWAY_PORT", help="gRPC port (0 picks a free one)."),
    max_tokens_default: int = typer.Option(256, envvar="SPECMESH_GATEWAY_MAX_TOKENS_DEFAULT",
                                           help="max_tokens of requests that leave it unset."),
    max_tokens_limit: int = typer.Option(4096, envvar="SPECMESH_GATEWAY_MAX_TOKENS_LIMIT",
                                         help="Largest max_tokens a request may ask for."),
    temperature_default: float = typer.Option(0.0, envvar="SPECMESH_GATEWAY_TEMPERATURE_DEFAULT",
                                              help="temperature of requests that leave it unset (0 = greedy)."),
    max_prompt_tokens: int = typer.Option(8192, envvar="SPECMESH_GATEWAY_MAX_PROMPT_TOKENS",
                                          help="Longest prompt in tokens (after the chat template)."),
    max_stop_strings: int = typer.Option(16, envvar="SPECMESH_GATEWAY_MAX_STOP_STRINGS"),
    max_stop_length: int = typer.Option(256, envvar="SPECMESH_GATEWAY_MAX_STOP_LENGTH",
                                        help="Longest stop string, in characters."),
    max_messages: int = typer.Option(1024, envvar="SPECMESH_GATEWAY_MAX_MESSAGES"),
    max_request_id_length: int = typer.Option(128, envvar="SPECMESH_GATEWAY_MAX_REQUEST_ID_LENGTH"),
    grace_s: float = typer.Option(5.0, envvar="SPECMESH_GATEWAY_GRACE_S",
                                  help="On SIGTERM, in-flight requests get this long to finish."),
    log_level: str = typer.Option("INFO", envvar="SPECMESH_LOG_LEVEL"),
    trace_file: str = typer.Option("", envvar="SPECMESH_TRACE_FILE",
                                   help="Append OTLP JSON trace lines here (specmesh tune); OTEL_* also apply."),
) -> None:
    """Run the gateway: the public specmesh.v1.Generation API in front of the scheduler."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s gateway %(name)s: %(message)s")
    from gateway.config import GatewayConfig
    from gateway.server import run
    from specmesh.telemetry import setup_telemetry

    setup_telemetry("gateway", trace_file or None)  # tracing (specmesh/telemetry.py); off unless asked for
    run(GatewayConfig(
        model=model, scheduler=scheduler, host=host, port=port, max_tokens_default=max_tokens_default,
        max_tokens_limit=max_tokens_limit, temperature_default=temperature_default,
        max_prompt_tokens=max_prompt_tokens, max_stop_strings=max_stop_strings, max_stop_length=max_stop_length,
        max_messages=max_messages, max_request_id_length=max_request_id_length, grace_s=grace_s,
    ))


if __name__ == "__main__":
    app()

"""`python -m gateway` / `specmesh serve gateway`."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import typer

from gateway.api_keys import ENV_VAR

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
    http_port: Optional[int] = typer.Option(None, envvar="SPECMESH_GATEWAY_HTTP_PORT",
                                            help="Serve the OpenAI-compatible HTTP API on this port too "
                                                 "(0 picks a free one). Unset: gRPC only."),
    served_model_name: Optional[str] = typer.Option(None, envvar="SPECMESH_GATEWAY_SERVED_MODEL_NAME",
                                                    help="The `model` HTTP clients send (default: --model)."),
    max_body_bytes: int = typer.Option(1 << 20, envvar="SPECMESH_GATEWAY_MAX_BODY_BYTES",
                                       help="Largest request body (HTTP) or message (gRPC), in bytes."),
    api_keys_file: Optional[str] = typer.Option(
        None, envvar="SPECMESH_GATEWAY_API_KEYS_FILE",
        help=f"File of API keys, one per line (or sha256:<hex> of a key). Keys are also read from "
             f"${ENV_VAR} (comma-separated). With any key configured, every request needs "
             f"'authorization: Bearer <key>'."),
    redis_url: Optional[str] = typer.Option(None, envvar="SPECMESH_GATEWAY_REDIS_URL",
                                            help="Redis shared by gateway replicas for rate limits."),
    rate_limit_rpm: int = typer.Option(0, envvar="SPECMESH_GATEWAY_RATE_LIMIT_RPM",
                                       help="Requests per minute per API key (0: unlimited)."),
    rate_limit_tpm: int = typer.Option(0, envvar="SPECMESH_GATEWAY_RATE_LIMIT_TPM",
                                       help="Tokens (prompt + max_tokens) per minute per API key (0: unlimited)."),
    max_concurrent_requests: int = typer.Option(128, envvar="SPECMESH_GATEWAY_MAX_CONCURRENT_REQUESTS",
                                                help="Requests running at once; more wait in the queue."),
    max_queued_requests: int = typer.Option(512, envvar="SPECMESH_GATEWAY_MAX_QUEUED_REQUESTS",
                                            help="Requests waiting for a slot; more are refused at once."),
    queue_timeout_s: float = typer.Option(10.0, envvar="SPECMESH_GATEWAY_QUEUE_TIMEOUT_S",
                                          help="Longest wait for a slot before the request is refused."),
    log_level: str = typer.Option("INFO", envvar="SPECMESH_LOG_LEVEL"),
    trace_file: Optional[str] = typer.Option(None, envvar="SPECMESH_TRACE_FILE",
                                             help="Append OTLP JSON trace lines here (specmesh tune); OTEL_* also apply."),
) -> None:
    """Run the gateway: the public specmesh.v1.Generation API in front of the scheduler."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s gateway %(name)s: %(message)s")
    from gateway.api_keys import ApiKeys
    from gateway.config import GatewayConfig
    from gateway.server import run

    api_keys = tuple(k for k in os.environ.get(ENV_VAR, "").split(",") if k.strip())
    try:
        keys = ApiKeys.load(api_keys_file, api_keys)
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--api-keys-file / $" + ENV_VAR) from None
    if (rate_limit_rpm or rate_limit_tpm) and not keys.enabled:
        logging.getLogger("gateway").warning("rate limits without API keys: all callers share one bucket")
    from specmesh.telemetry import setup_telemetry

    setup_telemetry("gateway", trace_file)  # tracing (specmesh/telemetry.py); off unless asked for
    run(GatewayConfig(
        model=model, scheduler=scheduler, host=host, port=port, max_tokens_default=max_tokens_default,
        max_tokens_limit=max_tokens_limit, temperature_default=temperature_default,
        max_prompt_tokens=max_prompt_tokens, max_stop_strings=max_stop_strings, max_stop_length=max_stop_length,
        max_messages=max_messages, max_request_id_length=max_request_id_length, grace_s=grace_s,
        http_port=http_port, served_model_name=served_model_name, max_body_bytes=max_body_bytes,
        api_keys_file=api_keys_file, api_keys=api_keys, redis_url=redis_url, rate_limit_rpm=rate_limit_rpm,
        rate_limit_tpm=rate_limit_tpm, max_concurrent_requests=max_concurrent_requests,
        max_queued_requests=max_queued_requests, queue_timeout_s=queue_timeout_s,
    ))


if __name__ == "__main__":
    app()

"""`python -m scheduler` / `specmesh serve scheduler`."""

from __future__ import annotations

import logging
import sys

import typer

app = typer.Typer(add_completion=False)


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@app.command()
def main(
    verifiers: str = typer.Option("", envvar="SPECMESH_SCHEDULER_VERIFIERS",
                                  help="host:port,... of verifiers (--discovery static)."),
    drafters: str = typer.Option("", envvar="SPECMESH_SCHEDULER_DRAFTERS", help="host:port,... of drafters."),
    host: str = typer.Option("127.0.0.1", envvar="SPECMESH_SCHEDULER_HOST"),
    port: int = typer.Option(50052, envvar="SPECMESH_SCHEDULER_PORT"),
    policy: str = typer.Option("adaptive", envvar="SPECMESH_SCHEDULER_POLICY",
                               help="adaptive (confidence x verifier load) or fixed (--draft-length every round)."),
    draft_length: int = typer.Option(4, envvar="SPECMESH_SCHEDULER_DRAFT_LENGTH"),
    max_draft_tokens: int = typer.Option(8, envvar="SPECMESH_SCHEDULER_MAX_DRAFT_TOKENS",
                                         help="Longest draft the adaptive policy may choose."),
    redis_url: str = typer.Option("", envvar="SPECMESH_SCHEDULER_REDIS_URL",
                                  help="Share calibration and cost profiles through Redis (empty: in-memory)."),
    max_batch_sessions: int = typer.Option(64, envvar="SPECMESH_SCHEDULER_MAX_BATCH_SESSIONS"),
    pipeline_lanes: int = typer.Option(1, envvar="SPECMESH_SCHEDULER_PIPELINE_LANES",
                                       help="Rounds in flight at once per verifier (overlap drafting with "
                                            "verification across session groups)."),
    lane_min_sessions: int = typer.Option(8, envvar="SPECMESH_SCHEDULER_LANE_MIN_SESSIONS",
                                          help="Split into lanes only when each gets this many sessions."),
    max_tokens_limit: int = typer.Option(4096, envvar="SPECMESH_SCHEDULER_MAX_TOKENS_LIMIT"),
    verify_timeout_s: float = typer.Option(120.0, envvar="SPECMESH_SCHEDULER_VERIFY_TIMEOUT_S"),
    draft_timeout_s: float = typer.Option(30.0, envvar="SPECMESH_SCHEDULER_DRAFT_TIMEOUT_S"),
    connect_wait_s: float = typer.Option(300.0, envvar="SPECMESH_SCHEDULER_CONNECT_WAIT_S"),
    replica_cooldown_s: float = typer.Option(5.0, envvar="SPECMESH_SCHEDULER_REPLICA_COOLDOWN_S"),
    grace_s: float = typer.Option(5.0, envvar="SPECMESH_SCHEDULER_GRACE_S"),
    discovery: str = typer.Option("static", envvar="SPECMESH_SCHEDULER_DISCOVERY",
                                  help="static (--verifiers/--drafters), dns (headless Services, NAME:PORT) or "
                                       "kubernetes (watch the Services' EndpointSlices)."),
    verifier_service: str = typer.Option("", envvar="SPECMESH_SCHEDULER_VERIFIER_SERVICE",
                                         help="dns: NAME:PORT; kubernetes: Service name of the verifier pool."),
    drafter_service: str = typer.Option("", envvar="SPECMESH_SCHEDULER_DRAFTER_SERVICE",
                                        help="dns: NAME:PORT; kubernetes: Service name of the drafter pool "
                                             "(empty: no drafters)."),
    namespace: str = typer.Option("", envvar="SPECMESH_SCHEDULER_NAMESPACE",
                                  help="kubernetes: namespace of the Services (default: the pod's own)."),
    grpc_port_name: str = typer.Option("grpc", envvar="SPECMESH_SCHEDULER_GRPC_PORT_NAME",
                                       help="kubernetes: name of the Service port to dial (empty: its only port)."),
    kubeconfig: str = typer.Option("", envvar="SPECMESH_SCHEDULER_KUBECONFIG",
                                   help="kubernetes: kubeconfig file (default: in-cluster ServiceAccount)."),
    dns_refresh_s: float = typer.Option(5.0, envvar="SPECMESH_SCHEDULER_DNS_REFRESH_S",
                                        help="dns: seconds between lookups."),
    log_level: str = typer.Option("INFO", envvar="SPECMESH_LOG_LEVEL"),
    metrics_port: int = typer.Option(0, envvar="SPECMESH_SCHEDULER_METRICS_PORT",
                                     help="Serve Prometheus /metrics on this port (0 = off)."),
    trace_file: str = typer.Option("", envvar="SPECMESH_TRACE_FILE",
                                   help="Append OTLP JSON trace lines here (for specmesh tune); OTEL_* also apply."),
) -> None:
    """Run the scheduler: owns sessions and runs the speculation loop over drafter and verifier pools."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s scheduler %(name)s: %(message)s")
    from scheduler.config import SchedulerConfig
    from scheduler.server import run
    from specmesh.telemetry import setup_telemetry

    setup_telemetry("scheduler", trace_file or None)
    try:
        config = SchedulerConfig(
            verifiers=_split(verifiers), drafters=_split(drafters), host=host, port=port, policy=policy,
            draft_length=draft_length, max_draft_tokens=max_draft_tokens, redis_url=redis_url or None,
            max_batch_sessions=max_batch_sessions, max_tokens_limit=max_tokens_limit,
            pipeline_lanes=pipeline_lanes, lane_min_sessions=lane_min_sessions,
            verify_timeout_s=verify_timeout_s, draft_timeout_s=draft_timeout_s, connect_wait_s=connect_wait_s,
            discovery=discovery, verifier_service=verifier_service, drafter_service=drafter_service,
            namespace=namespace, grpc_port_name=grpc_port_name, kubeconfig=kubeconfig, dns_refresh_s=dns_refresh_s,
            replica_cooldown_s=replica_cooldown_s, grace_s=grace_s, metrics_port=metrics_port,
        )
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    run(config)


if __name__ == "__main__":
    app()

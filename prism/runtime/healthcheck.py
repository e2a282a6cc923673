"""``python -m prism.runtime.healthcheck HOST:PORT [SERVICE]``: exit 0 when the gRPC health
service at HOST:PORT reports SERVICE (default: the whole server) SERVING, else 1 — the probe of
compose health checks and of anything without native gRPC probes (those cannot speak TLS). Over
TLS when PRISM_TLS_CA is set (with PRISM_TLS_CERT and PRISM_TLS_KEY for mutual TLS)."""
from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prism.runtime.tls import ClientTls, sync_channel


def check(address: str, service: str = "", timeout_s: float = 3.0, tls: ClientTls | None = None) -> bool:
    try:
        with sync_channel(address, tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout_s)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    return 0 if check(args[0], args[1] if len(args) > 1 else "", tls=ClientTls.from_env()) else 1


if __name__ == "__main__":
    sys.exit(main())

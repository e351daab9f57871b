"""gRPC health probe for containers and launchers (the same check grpc_health_probe makes).

    python -m kvpack.common.healthcheck 127.0.0.1:50051 [SERVICE]   # exit 0 when SERVING
"""

from __future__ import annotations

import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def is_serving(target: str, service: str = "", timeout_seconds: float = 2.0) -> bool:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_seconds)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(target: str, service: str = "", timeout_seconds: float = 60.0,
                 alive=lambda: True) -> bool:
    """Poll until SERVING; False on timeout or as soon as `alive()` says the server died."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if is_serving(target, service):
            return True
        if not alive():
            return False
        time.sleep(0.2)
    return False


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python -m kvpack.common.healthcheck HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    return 0 if is_serving(argv[0], argv[1] if len(argv) > 1 else "") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

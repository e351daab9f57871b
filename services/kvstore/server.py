"""Assembles a running kvstore: backend, servicer, gRPC server, health watcher, metrics endpoint."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from kvpack.common.grpc_server import GrpcServer
from kvpack.common.metrics_http import MetricsEndpoint
from kvpack.kvstore.backends import BackendUnavailable, open_backend
from kvpack.kvstore.metrics import KVStoreMetrics
from kvpack.kvstore.protocol import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_MAX_STAGED_BYTES,
    UPLOAD_TTL_SECONDS,
)
from kvpack.kvstore.rpc_methods import SERVICE_NAME, add_to_server
from kvpack.kvstore.servicer import KVStoreServicer

log = logging.getLogger("kvpack.kvstore")


@dataclass(frozen=True)
class KVStoreConfig:
    listen: str = "127.0.0.1:50051"
    backend: str = "memory://"
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    metrics_host: str = "0.0.0.0"
    capacity_bytes: int = 1 << 30
    ttl_seconds: float | None = None
    token: str | None = None
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    health_interval_seconds: float = 1.0
    max_workers: int = 16
    # Ranged Put: how long an upload may take before it is abandoned, and the bytes of records
    # in open uploads at most (kvpack.kvstore.uploads).
    upload_ttl_seconds: float = UPLOAD_TTL_SECONDS
    max_staged_bytes: int = DEFAULT_MAX_STAGED_BYTES


class KVStoreServer:
    """A started kvstore. `address` is where it listens; `stop()` shuts everything down."""

    def __init__(self, config: KVStoreConfig) -> None:
        self.config = config
        self.backend = open_backend(
            config.backend, capacity_bytes=config.capacity_bytes, ttl_seconds=config.ttl_seconds)
        self.metrics = KVStoreMetrics(self.backend)
        self.servicer = servicer = KVStoreServicer(
            self.backend, self.metrics, max_record_bytes=config.max_record_bytes,
            chunk_bytes=config.chunk_bytes, upload_ttl_seconds=config.upload_ttl_seconds,
            max_staged_bytes=config.max_staged_bytes)
        self.grpc = GrpcServer(
            config.listen,
            [(add_to_server, servicer, SERVICE_NAME)],
            token=config.token, max_workers=config.max_workers)
        self.metrics_endpoint = (
            MetricsEndpoint(self.metrics.registry, config.metrics_port, config.metrics_host)
            if config.metrics_port is not None else None)
        self._stopping = threading.Event()
        self._check_backend()
        self.grpc.start()
        self._watcher = threading.Thread(target=self._watch_backend, name="kvstore-health",
                                         daemon=True)
        self._watcher.start()

    @property
    def address(self) -> str:
        return self.grpc.address

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint else None

    def _check_backend(self) -> bool:
        try:
            self.backend.ping()
            healthy = True
        except BackendUnavailable as error:
            log.warning("backend not answering: %s", error)
            healthy = False
        self.metrics.backend_up.set(1 if healthy else 0)
        self.grpc.set_serving(healthy)
        return healthy

    def _watch_backend(self) -> None:
        while not self._stopping.wait(self.config.health_interval_seconds):
            self._check_backend()
            self.servicer.sweep_uploads()

    def stop(self, grace_seconds: float = 2.0) -> None:
        self._stopping.set()
        self.grpc.stop(grace_seconds)
        self.servicer.close()
        if self.metrics_endpoint:
            self.metrics_endpoint.close()
        self.backend.close()

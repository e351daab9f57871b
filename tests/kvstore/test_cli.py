"""`kvpack kvstore serve` as a user runs it: a real process, flags from the environment, clean
errors."""

import os
import signal
import subprocess
import sys

import pytest
from kvpack.kvstore.client import KVStoreClient, StoreUnavailable
from support.blocks import chain, random_record
from support.processes import free_port, wait_for

KVPACK = [sys.executable, "-m", "kvpack"]


def _run(*args, env=None):
    return subprocess.run([*KVPACK, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_help_lists_the_subcommands():
    result = _run("--help")
    assert result.returncode == 0 and "kvstore" in result.stdout
    result = _run("kvstore", "serve", "--help")
    assert result.returncode == 0
    assert "--backend" in result.stdout and "KVPACK_BACKEND" in result.stdout


@pytest.mark.parametrize("args, env, message", [
    (["--listen", "nonsense"], {}, "expected HOST:PORT"),
    (["--backend", "s3://bucket"], {}, "unknown backend"),
    (["--metrics-port", "-1"], {}, "non-negative"),
    ([], {"KVPACK_CAPACITY_BYTES": "lots"}, "KVPACK_CAPACITY_BYTES"),
])
def test_bad_flags_give_one_line_errors(args, env, message):
    result = _run("kvstore", "serve", *args, env=env)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_reads_environment_and_shuts_down_cleanly(redis_server):
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [*KVPACK, "kvstore", "serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "KVPACK_LISTEN": f"127.0.0.1:{port}", "KVPACK_BACKEND": redis_server.url,
             "KVPACK_METRICS_PORT": str(metrics_port), "KVPACK_TOKEN": "t0ken"})
    try:
        with KVStoreClient(f"127.0.0.1:{port}", token="t0ken") as client:
            def ready():
                try:
                    return client.stats()["backend"] == "redis"
                except StoreUnavailable:
                    return False
            wait_for(ready, timeout_seconds=30)
            block_hash = chain(1)[0]
            client.put("ns", block_hash, random_record("ns", 100))
            assert redis_server.client().dbsize() == 1  # it really used the Redis from the env
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert f"gRPC on 127.0.0.1:{port}" in output and "shutting down" in output

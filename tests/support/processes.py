"""Real redis-server processes (single and cluster) on free loopback ports, for tests to kill."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port(cluster_bus: bool = False) -> int:
    """A free loopback port; with cluster_bus, one whose bus port (port + 10000) is free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not cluster_bus:
            return port
        if port + 10000 <= 65535 and _is_free(port + 10000):
            return port


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for(condition, timeout_seconds: float = 10.0, interval_seconds: float = 0.05):
    deadline = time.monotonic() + timeout_seconds
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_seconds}s")
        time.sleep(interval_seconds)


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:  # CI installs it (.ci/run); failing beats silently skipping
        raise RuntimeError("redis-server not found: apt-get install redis-server")
    return binary


class RedisServer:
    """One redis-server on 127.0.0.1:port with no persistence; stop()/start() keep the port."""

    def __init__(self, workdir: Path, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.workdir = workdir
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers)
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited") from None
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


class RedisCluster:
    """Three masters with cluster mode on, joined by `redis-cli --cluster create`."""

    def __init__(self, workdir: Path, masters: int = 3):
        self.nodes = [
            RedisServer(workdir / f"node{i}", port=free_port(cluster_bus=True), extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000"))
            for i in range(masters)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisCluster:
        try:
            self._start()
        except BaseException:
            self.stop()  # never leave half a cluster running
            raise
        return self

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found: apt-get install redis-tools")
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        wait_for(lambda: all(n.client().cluster("info").get("cluster_state") == "ok"
                             for n in self.nodes), timeout_seconds=30)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

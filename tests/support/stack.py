"""The stack as a user runs it: kvpack CLI processes, a real redis-server and a real Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from kvpack.common.healthcheck import wait_serving

from support.processes import free_port, wait_for


class Process:
    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self.process = subprocess.Popen(argv, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def kvpack_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvpack", *args]


def start_grpc_service(name: str, argv: list[str], address: str, log_dir: Path,
                       timeout_seconds: float = 120) -> Process:
    process = Process(name, argv, log_dir)
    if not wait_serving(address, timeout_seconds=timeout_seconds, alive=process.alive):
        process.stop()
        raise RuntimeError(f"{name} did not become healthy:\n{process.tail()}")
    return process


class Prometheus:
    """A real Prometheus (Debian package) scraping the given targets every second."""

    def __init__(self, config_text: str, workdir: Path):
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus not found: apt-get install prometheus")
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(config_text)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Process("prometheus", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}"], workdir)
        wait_for(self._ready, timeout_seconds=60)

    def _ready(self) -> bool:
        if not self.process.alive():
            raise RuntimeError(f"prometheus exited:\n{self.process.tail()}")
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def query(self, expression: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        reply = json.load(urllib.request.urlopen(url, timeout=10))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def scalar(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expression: str, predicate, timeout_seconds: float = 30) -> float:
        """Wait for fresh scrapes until the expression's value satisfies `predicate`."""
        deadline = time.monotonic() + timeout_seconds
        value = None
        while time.monotonic() < deadline:
            value = self.scalar(expression)
            if value is not None and predicate(value):
                return value
            time.sleep(0.5)
        raise AssertionError(f"{expression} = {value} after {timeout_seconds}s")

    def stop(self) -> None:
        self.process.stop()

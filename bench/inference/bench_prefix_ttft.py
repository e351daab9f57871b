"""Time to first token with and without a stored prefix, through gRPC and a real kvstore.

CPU, a real model and text (the same 1024-token prompt three times per method: the first request
computes the whole prompt and stores its full blocks, the next ones fetch them and compute the
rest):

    python bench/inference/bench_prefix_ttft.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text ../shared/data/text/wikitext-2-raw/wiki.test.raw --out bench/results/x.json

GPU, a random-weight Llama-3-8B-shaped model in bf16 and a real redis-server behind the kvstore
(`--random-llama3-8b --redis`): per method, request A = prefix + suffix A stores the prefix's
blocks; once they are all written, request B = prefix + suffix B (another suffix: only the prefix
is shared) fetches the prefix and computes the suffix; request C is B again with reuse off, which
recomputes everything. Speed-up = TTFT(C) / TTFT(B). B and C are repeated and the medians kept.
Every B records where its time went (`reuse_breakdown`): the prefix store's load (blocks, bytes,
`fetch_seconds` until the last block arrived, seconds spent waiting for blocks and loading them
into the cache, its total) and the rest of the TTFT (the suffix's prefill and the first token:
`compute_seconds`).

    . bench/device_env.sh && python bench/inference/bench_prefix_ttft.py --random-llama3-8b \\
        --redis --device cuda --prefix-tokens 32768 --out $OUT/inference_prefix_ttft_h100.json

The kvstore runs as its own process (`kvpack kvstore serve`), as deployed: in this process it
would share the GIL with the inference server that receives and loads the blocks.
`--kvstore-streams N` sets the GetMany connections the inference server's client fetches over,
`--load-threads L` the threads its prefix store loads the blocks with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from kvpack.inference.server import InferenceConfig, InferenceServer
from kvpack.kvstore.client import KVStoreClient, StoreError
from kvpack.kvstore.server import KVStoreConfig, KVStoreServer
from kvpack.proto import inference_pb2, inference_pb2_grpc

METHODS = {"fp16": {}, "kivi": {"bits": 2, "group_size": 32, "window": 0}}


class IdTokenizer:
    """Token ids as text: the random-weight model has no vocabulary (prompts are sent as ids)."""

    eos_token_id = None
    bos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [int(part) for part in text.split()]

    def decode(self, token_ids: list[int]) -> str:
        return " ".join(str(token) for token in token_ids)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis() -> tuple[subprocess.Popen, int, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (bench/device_env.sh puts .redisbin there)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return process, port, client.info()["redis_version"]
        except redis.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError("redis-server did not start")


def start_kvstore_process(backend: str) -> tuple[subprocess.Popen, str]:
    """`kvpack kvstore serve` on a free port; the process and its address once it answers."""
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "kvpack", "kvstore", "serve", "--listen", address,
         "--metrics-port", "0", "--backend", backend, "--capacity-bytes", str(16 << 30)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    with KVStoreClient(address, timeout_seconds=1, retries=0) as client:
        for _ in range(300):
            try:
                client.stats()
                return process, address
            except StoreError:
                if process.poll() is not None:
                    raise RuntimeError("kvpack kvstore serve exited") from None
                time.sleep(0.1)
    process.kill()
    raise RuntimeError("kvpack kvstore serve did not answer")


def generate(stub, ids: list[int], reuse: bool, method: str, params: dict) -> dict:
    request = inference_pb2.GenerateRequest(
        prompt_token_ids=ids, max_new_tokens=2, reuse=reuse, method=method
    )
    for name, value in params.items():  # the method's parameters, as the request carries them
        request.method_params[name] = str(value)
    usage = list(stub.Generate(request))[-1].usage
    return {"cached_tokens": usage.cached_tokens, "ttft_seconds": usage.ttft_seconds}


def put_blocks(server: InferenceServer) -> float:
    return server.metrics.kvstore_put_blocks._value.get()


def wait_for_puts(server: InferenceServer, target: float, timeout: float = 600.0) -> float:
    """Seconds until the server has written `target` blocks to the store in all."""
    started = time.perf_counter()
    while put_blocks(server) < target:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"only {put_blocks(server)} of {target} blocks put")
        time.sleep(0.05)
    return time.perf_counter() - started


def start_server(
    loaded,
    store_address,
    method,
    params,
    block_tokens,
    prefill_chunk_tokens,
    streams=None,
    load_threads=None,
):
    """An in-process inference server on a free port for one method, and a stub to call it.
    `streams`: GetMany connections of its kvstore client, `load_threads`: its prefix store's
    (None: the defaults)."""
    server = InferenceServer(
        InferenceConfig(
            listen="127.0.0.1:0",
            kvstore=store_address,
            method=method,
            method_params=params,
            block_tokens=block_tokens,
            prefill_chunk_tokens=prefill_chunk_tokens,
            kvstore_streams=streams,
            prefix_load_threads=load_threads,
        ),
        loaded=loaded,
    )
    return server, inference_pb2_grpc.InferenceStub(grpc.insecure_channel(server.address))


def shared_prefix(args, loaded, store_address: str, report: dict) -> None:
    import random

    rng = random.Random(0)
    vocab = loaded.model.config.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(args.prefix_tokens)]
    suffixes = [[rng.randrange(3, vocab) for _ in range(args.suffix_tokens)] for _ in range(2)]
    blocks = args.prefix_tokens // args.block_tokens
    for method in args.methods.split(","):
        params = METHODS[method]
        server, stub = start_server(
            loaded,
            store_address,
            method,
            params,
            args.block_tokens,
            args.prefill_chunk_tokens,
            args.kvstore_streams,
            args.load_threads,
        )
        before = put_blocks(server)
        cold = generate(stub, prefix + suffixes[0], True, method, params)
        # every full block of A's prompt (kivi with window 0 packs them all)
        put_seconds = wait_for_puts(
            server, before + blocks + args.suffix_tokens // args.block_tokens
        )
        warm, recompute, breakdown = [], [], []
        partial = report["results"][method] = {
            "cold_request_a": cold,
            "seconds_until_prefix_stored": put_seconds,
            "kvstore_streams": len(server.prefix_store.client._stubs),
            "load_threads": server.prefix_store.load_threads,
            "reuse_request_b": warm,
            "reuse_breakdown": breakdown,
            "recompute_request_c": recompute,
        }
        for _ in range(args.repeats):
            warm.append(generate(stub, prefix + suffixes[1], True, method, params))
            load = dataclasses.asdict(server.prefix_store.last_load)
            load.pop("started", None)
            load["compute_seconds"] = warm[-1]["ttft_seconds"] - load["total_seconds"]
            load["mb_per_s"] = load["bytes"] / max(load["total_seconds"], 1e-9) / 1e6
            breakdown.append(load)
            recompute.append(generate(stub, prefix + suffixes[1], False, method, params))
            print(method, json.dumps(partial), flush=True)
            args.out.write_text(json.dumps(report, indent=1))  # partial results survive a timeout
        warm_ttft = statistics.median(r["ttft_seconds"] for r in warm)
        recompute_ttft = statistics.median(r["ttft_seconds"] for r in recompute)
        median = {
            key: statistics.median(b[key] for b in breakdown)
            for key in (
                "total_seconds",
                "fetch_seconds",
                "wait_seconds",
                "load_seconds",
                "compute_seconds",
            )
        }
        report["results"][method] = {
            "method_params": params,
            **partial,
            "reuse_breakdown_median": {
                "fetch_and_load_seconds": median["total_seconds"],
                "fetch_seconds": median["fetch_seconds"],
                "waiting_for_blocks_seconds": median["wait_seconds"],
                "loading_seconds": median["load_seconds"],
                "compute_seconds": median["compute_seconds"],
                "prefix_bytes": breakdown[-1]["bytes"],
            },
            "ttft_reuse_median_seconds": warm_ttft,
            "ttft_recompute_median_seconds": recompute_ttft,
            "speedup": recompute_ttft / warm_ttft,
        }
        print(method, json.dumps(report["results"][method]), flush=True)
        args.out.write_text(json.dumps(report, indent=1))
        server.stop()


def repeated_prompt(args, loaded, store_address: str, report: dict) -> None:
    text = args.text.read_text(encoding="utf-8")
    ids = loaded.tokenizer.encode(text[: args.prompt_tokens * 12])[: args.prompt_tokens]
    for method, params in METHODS.items():
        server, stub = start_server(
            loaded, store_address, method, params, args.block_tokens, args.block_tokens
        )
        runs = []
        for _ in range(3):
            request = inference_pb2.GenerateRequest(prompt_token_ids=ids, max_new_tokens=4)
            usage = list(stub.Generate(request))[-1].usage
            runs.append({"cached_tokens": usage.cached_tokens, "ttft_seconds": usage.ttft_seconds})
            time.sleep(2)  # let the background puts finish
        report["results"][method] = runs
        print(method, runs, flush=True)
        server.stop()
    args.out.write_text(json.dumps(report, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model to load (the CPU protocol)")
    parser.add_argument("--text", type=Path, help="prompt text (the CPU protocol)")
    parser.add_argument("--random-llama3-8b", action="store_true", help="GPU protocol")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="with --random-llama3-8b: a tiny "
        "model of that architecture instead, to check the script on a CPU",
    )
    parser.add_argument("--redis", action="store_true", help="kvstore on a real redis-server")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--prefix-tokens", type=int, default=32768)
    parser.add_argument("--suffix-tokens", type=int, default=256)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=2048)
    parser.add_argument("--methods", default="kivi")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-tokens", type=int, default=256)
    parser.add_argument(
        "--kvstore-streams",
        type=int,
        default=None,
        help="GetMany connections of the inference server's kvstore client (default: the "
        "client's own default)",
    )
    parser.add_argument(
        "--load-threads",
        type=int,
        default=None,
        help="threads the prefix store loads a block's layers with (default: its own default)",
    )
    parser.add_argument(
        "--kvstore-in-process",
        action="store_true",
        help="run the kvstore in this process (as before) instead of as its own process",
    )
    args = parser.parse_args()
    import torch
    from kvpack.common.allocator import keep_freed_memory

    keep_freed_memory()  # as `kvpack inference serve` does: blocks are large buffers

    if args.random_llama3_8b:
        from bench_decode import LLAMA3_8B, TINY, build_model
        from kvpack.inference.loader import LoadedModel

        dtype = torch.float32 if args.tiny else torch.bfloat16
        shape = TINY if args.tiny else LLAMA3_8B
        model = build_model(shape, 1 << 20, torch.device(args.device), dtype)
        loaded = LoadedModel(model, IdTokenizer(), "random-llama3-8b-seed0", model.device, dtype)
    else:
        from kvpack.inference.loader import load_model

        loaded = load_model(args.model, device=args.device)
    redis_process = None
    backend = "memory://"
    report = {
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": loaded.model_id,
        "block_tokens": args.block_tokens,
        "results": {},
    }
    if args.redis:
        redis_process, port, version = start_redis()
        backend = f"redis://127.0.0.1:{port}/0"
        report["redis_version"] = version
    report["kvstore_backend"] = backend.split(":")[0]
    report["kvstore_process"] = "in-process" if args.kvstore_in_process else "own process"
    store_process = None
    if args.kvstore_in_process:
        store = KVStoreServer(KVStoreConfig(listen="127.0.0.1:0", backend=backend,
                                            capacity_bytes=16 << 30))  # fmt: skip
        store_address = store.address
    else:
        store = None
        store_process, store_address = start_kvstore_process(backend)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if args.random_llama3_8b:
            report.update(
                protocol="shared prefix: A stores, B reuses, C recomputes (reuse off)",
                prefix_tokens=args.prefix_tokens,
                suffix_tokens=args.suffix_tokens,
                prefill_chunk_tokens=args.prefill_chunk_tokens,
            )
            shared_prefix(args, loaded, store_address, report)
        else:
            repeated_prompt(args, loaded, store_address, report)
    finally:
        if store is not None:
            store.stop()
        if store_process is not None:
            store_process.terminate()
            store_process.wait(timeout=10)
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Put/Get throughput through the kvstore service vs raw redis-py SET/GET, side by side in one run.

    python bench/kvstore/bench_store.py --out bench/results/kvstore_throughput.json

Starts its own redis-server (no persistence) on a free loopback port and a kvstore in-process on
the Redis backend (and one on the memory backend for reference). For each block size it times
`repeats` sequential operations from one client and reports the median per-operation throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import redis

from kvpack.common import record
from kvpack.common.hashing import block_hashes
from kvpack.kvstore.client import KVStoreClient
from kvpack.kvstore.server import KVStoreConfig, KVStoreServer

PARALLEL_STREAMS = 4
SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "4MiB": 4 << 20, "16MiB": 16 << 20}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def median_mb_per_s(operation, size_bytes: int, repeats: int) -> float:
    seconds = []
    for index in range(repeats):
        start = time.perf_counter()
        operation(index)
        seconds.append(time.perf_counter() - start)
    return size_bytes / statistics.median(seconds) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    port = free_port()
    workdir = tempfile.mkdtemp()
    redis_process = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    raw = redis.Redis(port=port)
    for _ in range(100):
        try:
            raw.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    servers = {
        "redis": KVStoreServer(KVStoreConfig(listen="127.0.0.1:0", backend=f"redis://127.0.0.1:{port}/0")),
        "memory": KVStoreServer(KVStoreConfig(listen="127.0.0.1:0", capacity_bytes=4 << 30)),
    }
    rows = []
    try:
        for label, size in SIZES.items():
            payload = os.urandom(size - 200)
            data = record.encode(record.RecordHeader.for_namespace("bench"), payload)
            hashes = block_hashes(list(range(args.repeats)), 1)
            row = {"block": label, "record_bytes": len(data)}
            raw_keys = [f"raw:{i}" for i in range(args.repeats)]
            row["raw_redis_set_mb_s"] = median_mb_per_s(lambda i: raw.set(raw_keys[i], data), len(data), args.repeats)
            row["raw_redis_get_mb_s"] = median_mb_per_s(lambda i: raw.get(raw_keys[i]), len(data), args.repeats)
            raw.delete(*raw_keys)
            for backend, server in servers.items():
                with KVStoreClient(server.address) as client:
                    row[f"service_{backend}_put_mb_s"] = median_mb_per_s(
                        lambda i: client.put("bench", hashes[i], data), len(data), args.repeats)
                    row[f"service_{backend}_get_mb_s"] = median_mb_per_s(
                        lambda i: client.get("bench", hashes[i]), len(data), args.repeats)
                    batch = hashes[: max(1, min(args.repeats, (256 << 20) // len(data)))]
                    row[f"service_{backend}_get_many_mb_s"] = median_mb_per_s(
                        lambda i: client.get_many("bench", batch), len(data) * len(batch), 5)
                with KVStoreClient(server.address, streams=PARALLEL_STREAMS) as parallel:
                    row[f"service_{backend}_get_many_parallel_mb_s"] = median_mb_per_s(
                        lambda i: parallel.get_many("bench", batch), len(data) * len(batch), 5)
                with KVStoreClient(server.address) as client:
                    for block_hash in hashes:
                        client.delete("bench", block_hash)
            row["put_vs_raw"] = row["service_redis_put_mb_s"] / row["raw_redis_set_mb_s"]
            row["get_vs_raw"] = row["service_redis_get_mb_s"] / row["raw_redis_get_mb_s"]
            row["get_many_vs_raw"] = row["service_redis_get_many_mb_s"] / row["raw_redis_get_mb_s"]
            row["get_many_parallel_vs_raw"] = (row["service_redis_get_many_parallel_mb_s"]
                                               / row["raw_redis_get_mb_s"])
            rows.append(row)
            print(json.dumps(row), flush=True)
        redis_version = raw.info("server")["redis_version"]
    finally:
        for server in servers.values():
            server.stop(0)
        redis_process.kill()
    result = {
        "benchmark": "kvstore put/get throughput, one client, sequential, median of repeats; GetMany fetches up to 256 MiB of blocks in one call",
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})",
        "redis_version": redis_version,
        "redis_py": redis.__version__,
        "hiredis": redis.utils.HIREDIS_AVAILABLE,
        "repeats": args.repeats,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(markdown_table(result))


def markdown_table(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}; Redis {result['redis_version']}, redis-py {result['redis_py']}"
        f" (hiredis: {result['hiredis']}); median of {result['repeats']} sequential ops, MB/s.",
        "",
        "| block | raw SET | service Put (redis) | Put / raw | raw GET | service Get (redis) | Get / raw "
        f"| GetMany (redis) | GetMany / raw | GetMany ×{PARALLEL_STREAMS} streams (redis) | ×{PARALLEL_STREAMS} / raw "
        "| Put (memory) | Get (memory) | GetMany (memory) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['block']} | {r['raw_redis_set_mb_s']:.0f} | {r['service_redis_put_mb_s']:.0f} | "
            f"{r['put_vs_raw']:.2f}× | {r['raw_redis_get_mb_s']:.0f} | {r['service_redis_get_mb_s']:.0f} | "
            f"{r['get_vs_raw']:.2f}× | {r['service_redis_get_many_mb_s']:.0f} | "
            f"{r['get_many_vs_raw']:.2f}× | {r['service_redis_get_many_parallel_mb_s']:.0f} | "
            f"{r['get_many_parallel_vs_raw']:.2f}× | {r['service_memory_put_mb_s']:.0f} | "
            f"{r['service_memory_get_mb_s']:.0f} | {r['service_memory_get_many_mb_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

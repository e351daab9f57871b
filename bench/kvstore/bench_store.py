"""Put/Get throughput through the kvstore service vs raw redis-py SET/GET, side by side in one run.

    python bench/kvstore/bench_store.py --machine "NAME" --out bench/results/kvstore_throughput.json

Starts its own redis-server (no persistence) on a free loopback port and two kvstores as separate
processes, the way they are deployed (`kvpack kvstore serve`): one on that Redis, one on the memory
backend (for reference). For each block size it runs `repeats` rounds; a round does one raw SET,
one service Put (each backend), then one raw GET and one service Get of the same record, so the
things compared share the machine's load at that moment (every other round runs them in reverse
order). It reports the median per-operation throughput of each. GetMany fetches up to 256 MiB
of blocks in one call (5 rounds).

This process (the client of both redis-py and the service) reuses freed memory the way the service
does (kvpack.common.allocator); `--default-allocator` measures both clients with glibc's defaults.
The target compares with redis-py as installed (hiredis packs commands); the service sends values
with redis-py's Python packer (kvpack.kvstore.backends.redis), so raw SET is also timed that way
("raw SET, service's packer") to show how much of Put's ratio that choice accounts for. Likewise
the service reads a record with its own raw GET (RedisBackend.get_with_room, no reply parser), so
raw GET is also timed that way ("raw GET, service's reader").

`service_<backend>_get` is `KVStoreClient.get` as shipped: a record over STREAMED_GET_BYTES comes
as byte ranges (at most DEFAULT_GET_RANGES of at least GET_RANGE_BYTES) fetched in parallel over
as many connections. The same get in one call (`get_ranges=1`: a Get stream of 1 MiB chunks, the
code before ranges) is timed in the same rounds as `service_<backend>_get_one_call`, and in
exactly n equal ranges (`--get-ranges`, sizes over the threshold only) as
`service_redis_get_<n>_ranges`.

`service_<backend>_put` is `KVStoreClient.put` as shipped: a record of at least 2 x PUT_RANGE_BYTES
goes as byte ranges (at most DEFAULT_PUT_RANGES) on parallel PutWhole calls, committed by the
service when the last arrived. The same put in one call (`put_ranges=1`, the code before ranged
puts) is timed in the same rounds as `service_<backend>_put_one_call`, and in exactly n equal
ranges (`--put-ranges`, sizes of 2 MiB and up) as `service_redis_put_<n>_ranges`.
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
import sys
import tempfile
import time
from contextlib import ExitStack

import redis
from kvpack.common import record
from kvpack.common.allocator import keep_freed_memory
from kvpack.common.hashing import block_hashes
from kvpack.kvstore.backends.redis import RedisBackend, ValueSendingConnection
from kvpack.kvstore.client import KVStoreClient, StoreError
from kvpack.kvstore.protocol import (
    DEFAULT_GET_RANGES,
    DEFAULT_PUT_RANGES,
    GET_RANGE_BYTES,
    PUT_RANGE_BYTES,
    STREAMED_GET_BYTES,
)

PARALLEL_STREAMS = 4
SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "4MiB": 4 << 20, "16MiB": 16 << 20}
GET_MANY_ROUNDS = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(stack: ExitStack) -> redis.Redis:
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", stack.enter_context(tempfile.TemporaryDirectory())],
        stdout=subprocess.DEVNULL)
    stack.callback(process.kill)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def start_kvstore(stack: ExitStack, *backend_args: str, pythonpath: str | None = None) -> str:
    """A `kvpack kvstore serve` process; its address once it answers. `pythonpath`: run the kvpack
    found there instead (e.g. an older commit installed with `pip install --target`), from a
    neutral working directory."""
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    process = subprocess.Popen(
        [sys.executable, "-m", "kvpack", "kvstore", "serve", "--listen", address,
         "--metrics-port", "0", *backend_args], stdout=subprocess.DEVNULL, env=env,
        cwd=tempfile.gettempdir())  # not the checkout: its ./kvpack would shadow the installed one
    stack.callback(process.wait)
    stack.callback(process.terminate)
    with KVStoreClient(address, timeout_seconds=1, retries=0) as client:
        for _ in range(300):
            try:
                client.stats()
                return address
            except StoreError:
                if process.poll() is not None:
                    raise RuntimeError(f"kvstore {backend_args} exited") from None
                time.sleep(0.1)
    raise RuntimeError(f"kvstore {backend_args} did not answer")


def timed_rounds(operations: dict[str, callable], rounds: int,
                 alternate: bool = True) -> dict[str, list[float]]:
    """Seconds of each operation per round; each round runs every operation once, in order, and
    with `alternate` every other round in reverse order: in one fixed order the same get code
    timed 6-13% apart at 64 KiB and 1 MiB on the 2-core VM, by its place in the round."""
    seconds: dict[str, list[float]] = {name: [] for name in operations}
    for index in range(rounds):
        in_order = list(operations.items())
        for name, operation in (in_order[::-1] if alternate and index % 2 else in_order):
            start = time.perf_counter()
            operation(index)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def mb_per_s(size_bytes: int, seconds: list[float]) -> float:
    return size_bytes / statistics.median(seconds) / 1e6


def measure_size(raw: redis.Redis, raw_like_service: redis.Redis, reader: RedisBackend,
                 clients: dict[str, KVStoreClient], one_call: dict[str, KVStoreClient],
                 ranged: dict[int, KVStoreClient],
                 parallel: dict[str, KVStoreClient], label: str, size: int, repeats: int,
                 alternate: bool = True,
                 put_ranged: dict[int, KVStoreClient] | None = None) -> dict:
    data = record.encode(record.RecordHeader.for_namespace("bench"), os.urandom(size - 200))
    hashes = block_hashes(list(range(repeats)), 1)
    raw_keys = [f"raw:{i}" for i in range(repeats)]
    row = {"block": label, "record_bytes": len(data)}

    puts = {"raw_redis_set": lambda i: raw.set(raw_keys[i], data),
            "raw_redis_set_service_packer": lambda i: raw_like_service.set(raw_keys[i], data)}
    gets = {"raw_redis_get": lambda i: raw.get(raw_keys[i]),
            "raw_redis_get_service_reader": lambda i: reader.get_with_room(raw_keys[i], 32)}
    for backend, client in clients.items():
        puts[f"service_{backend}_put"] = lambda i, c=client: c.put("bench", hashes[i], data)
        puts[f"service_{backend}_put_one_call"] = (
            lambda i, c=one_call[backend]: c.put("bench", hashes[i], data))
        gets[f"service_{backend}_get"] = lambda i, c=client: _check(c.get("bench", hashes[i]))
        gets[f"service_{backend}_get_one_call"] = (
            lambda i, c=one_call[backend]: _check(c.get("bench", hashes[i])))
    if len(data) >= 2 << 20:  # 1 MiB ranges at least
        for count, client in (put_ranged or {}).items():
            puts[f"service_redis_put_{count}_ranges"] = (
                lambda i, c=client: c.put("bench", hashes[i], data))
    if len(data) > STREAMED_GET_BYTES:  # below it every get is one GetWhole message
        for count, client in ranged.items():
            gets[f"service_redis_get_{count}_ranges"] = (
                lambda i, c=client: _check(c.get("bench", hashes[i])))
    for name, seconds in {**timed_rounds(puts, repeats, alternate),
                          **timed_rounds(gets, repeats, alternate)}.items():
        row[f"{name}_mb_s"] = mb_per_s(len(data), seconds)

    batch = hashes[: max(1, min(repeats, (256 << 20) // len(data)))]
    many = {}
    for backend in clients:
        many[f"service_{backend}_get_many"] = (
            lambda i, c=clients[backend]: _check(*c.get_many("bench", batch)))
        many[f"service_{backend}_get_many_parallel"] = (
            lambda i, c=parallel[backend]: _check(*c.get_many("bench", batch)))
    for name, seconds in timed_rounds(many, GET_MANY_ROUNDS, alternate).items():
        row[f"{name}_mb_s"] = mb_per_s(len(data) * len(batch), seconds)

    raw.delete(*raw_keys)
    for client in clients.values():
        for block_hash in hashes:
            client.delete("bench", block_hash)
    row["put_vs_raw"] = row["service_redis_put_mb_s"] / row["raw_redis_set_mb_s"]
    row["put_vs_raw_service_packer"] = (row["service_redis_put_mb_s"]
                                        / row["raw_redis_set_service_packer_mb_s"])
    row["put_one_call_vs_raw"] = row["service_redis_put_one_call_mb_s"] / row["raw_redis_set_mb_s"]
    for count in put_ranged or {}:
        if f"service_redis_put_{count}_ranges_mb_s" in row:
            row[f"put_{count}_ranges_vs_raw"] = (row[f"service_redis_put_{count}_ranges_mb_s"]
                                                 / row["raw_redis_set_mb_s"])
    row["get_vs_raw"] = row["service_redis_get_mb_s"] / row["raw_redis_get_mb_s"]
    row["get_one_call_vs_raw"] = row["service_redis_get_one_call_mb_s"] / row["raw_redis_get_mb_s"]
    for count in ranged:
        if f"service_redis_get_{count}_ranges_mb_s" in row:
            row[f"get_{count}_ranges_vs_raw"] = (row[f"service_redis_get_{count}_ranges_mb_s"]
                                                 / row["raw_redis_get_mb_s"])
    row["get_vs_raw_service_reader"] = (row["service_redis_get_mb_s"]
                                        / row["raw_redis_get_service_reader_mb_s"])
    row["get_many_vs_raw"] = row["service_redis_get_many_mb_s"] / row["raw_redis_get_mb_s"]
    row["get_many_parallel_vs_raw"] = (row["service_redis_get_many_parallel_mb_s"]
                                       / row["raw_redis_get_mb_s"])
    return row


def _check(*blocks: bytes | None) -> None:
    if any(block is None for block in blocks):
        raise RuntimeError("a block put by the benchmark came back as a miss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sizes", default=",".join(SIZES),
                        help=f"comma-separated subset of {', '.join(SIZES)} (default: all)")
    parser.add_argument("--machine", default=None,
                        help="what to call this machine in the results (default: host name, CPUs)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave this process on glibc's allocator defaults")
    parser.add_argument("--get-ranges", default="2,4,8",
                        help="other range counts to time KVStoreClient.get with, beside the "
                             f"default ({DEFAULT_GET_RANGES}) and one call (comma-separated; '' "
                             "for none)")
    parser.add_argument("--put-ranges", default="2,4",
                        help="other range counts to time KVStoreClient.put with, beside the "
                             f"default ({DEFAULT_PUT_RANGES}) and one call (comma-separated; '' "
                             "for none)")
    parser.add_argument("--fixed-order", action="store_true",
                        help="run each round's operations in one order (this script before "
                             "2026-12-07's ranged Get), not reversed every other round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sizes = {label: SIZES[label] for label in args.sizes.split(",")}
    range_counts = [int(n) for n in args.get_ranges.split(",") if n]
    put_range_counts = [int(n) for n in args.put_ranges.split(",") if n]
    allocator = "glibc defaults" if args.default_allocator else "freed memory kept"
    if not args.default_allocator and not keep_freed_memory():
        allocator = "glibc defaults (mallopt unavailable)"

    rows = []
    with ExitStack() as stack:
        raw = start_redis(stack)
        redis_port = raw.connection_pool.connection_kwargs["port"]
        raw_like_service = redis.Redis(connection_pool=redis.ConnectionPool(
            port=redis_port, connection_class=ValueSendingConnection))
        reader = RedisBackend(f"redis://127.0.0.1:{redis_port}/0")
        stack.callback(reader.close)
        addresses = {
            "redis": start_kvstore(stack, "--backend", f"redis://127.0.0.1:{redis_port}/0"),
            "memory": start_kvstore(stack, "--backend", "memory://",
                                    "--capacity-bytes", str(4 << 30)),
        }
        clients = {b: stack.enter_context(KVStoreClient(a, streams=1))
                   for b, a in addresses.items()}
        one_call = {b: stack.enter_context(KVStoreClient(a, streams=1, get_ranges=1,
                                                         put_ranges=1))
                    for b, a in addresses.items()}
        ranged = {n: stack.enter_context(KVStoreClient(  # exactly n equal ranges
            addresses["redis"], streams=1, get_ranges=n, get_range_bytes=1)) for n in range_counts}
        put_ranged = {n: stack.enter_context(KVStoreClient(  # exactly n equal ranges
            addresses["redis"], streams=1, put_ranges=n, put_range_bytes=1))
            for n in put_range_counts}
        parallel = {b: stack.enter_context(KVStoreClient(a, streams=PARALLEL_STREAMS))
                    for b, a in addresses.items()}
        for label, size in sizes.items():
            rows.append(measure_size(raw, raw_like_service, reader, clients, one_call, ranged,
                                     parallel, label, size, args.repeats,
                                     alternate=not args.fixed_order, put_ranged=put_ranged))
            print(json.dumps(rows[-1]), flush=True)
        redis_version = raw.info("server")["redis_version"]
    result = {
        "benchmark": "kvstore put/get throughput, one client, sequential, median of repeats; "
                     "raw redis-py and the service interleaved round by round; the service runs "
                     "as its own process (kvpack kvstore serve); GetMany fetches up to 256 MiB of "
                     "blocks in one call",
        "machine": args.machine or f"{platform.node()} ({os.cpu_count()} CPUs, "
                                   f"{platform.processor() or platform.machine()})",
        "redis_version": redis_version,
        "redis_py": redis.__version__,
        "hiredis": redis.utils.HIREDIS_AVAILABLE,
        "client_allocator": allocator,
        "get_ranges_default": DEFAULT_GET_RANGES,
        "get_range_bytes_default": GET_RANGE_BYTES,
        "ranged_get_over_bytes": STREAMED_GET_BYTES,
        "put_ranges_default": DEFAULT_PUT_RANGES,
        "put_range_bytes_default": PUT_RANGE_BYTES,
        "repeats": args.repeats,
        "round_order": "fixed" if args.fixed_order else "reversed every other round",
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(markdown_table(result))


def markdown_table(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}; Redis {result['redis_version']}, redis-py "
        f"{result['redis_py']} (hiredis: {result['hiredis']}); client allocator: "
        f"{result.get('client_allocator', 'glibc defaults')}; median of {result['repeats']} "
        "sequential ops, MB/s.",
        "",
        "| block | raw SET | service Put (redis) | Put / raw | raw SET, service's packer "
        "| Put / that "
        "| raw GET | service Get (redis) | Get / raw | raw GET, service's reader | Get / that "
        f"| GetMany (redis) | GetMany / raw | GetMany ×{PARALLEL_STREAMS} streams (redis) | "
        f"×{PARALLEL_STREAMS} / raw | Put (memory) | Get (memory) | GetMany (memory) |",
        "| --- |" + " ---: |" * 17,
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['block']} | {r['raw_redis_set_mb_s']:.0f} | {r['service_redis_put_mb_s']:.0f} | "
            f"{r['put_vs_raw']:.2f}× | {r['raw_redis_set_service_packer_mb_s']:.0f} | "
            f"{r['put_vs_raw_service_packer']:.2f}× | "
            f"{r['raw_redis_get_mb_s']:.0f} | {r['service_redis_get_mb_s']:.0f} | "
            f"{r['get_vs_raw']:.2f}× | {_cell(r, 'raw_redis_get_service_reader_mb_s', '.0f')} | "
            f"{_cell(r, 'get_vs_raw_service_reader', '.2f', '×')} | "
            f"{r['service_redis_get_many_mb_s']:.0f} | "
            f"{r['get_many_vs_raw']:.2f}× | {r['service_redis_get_many_parallel_mb_s']:.0f} | "
            f"{r['get_many_parallel_vs_raw']:.2f}× | {r['service_memory_put_mb_s']:.0f} | "
            f"{r['service_memory_get_mb_s']:.0f} | {r['service_memory_get_many_mb_s']:.0f} |")
    return "\n".join(lines) + variants_table(result, "get") + variants_table(result, "put")


def variants_table(result: dict, op: str) -> str:
    """Get's or Put's variants side by side (`op` "get" or "put"; results of this script's
    versions with ranged gets / puts): the default, one call, exactly n ranges."""
    rows = [r for r in result["rows"] if f"service_redis_{op}_one_call_mb_s" in r]
    if not rows:
        return ""
    counts = sorted({int(key.split("_")[3]) for r in rows for key in r
                     if key.startswith(f"service_redis_{op}_") and key.endswith("_ranges_mb_s")})
    raw = "raw_redis_get" if op == "get" else "raw_redis_set"
    raw_name = "raw GET" if op == "get" else "raw SET"
    title = op.capitalize()
    range_mib = result.get(f"{op}_range_bytes_default", 0) / (1 << 20)
    default = (f"at most {result.get('get_ranges_default', '?')} ranges of at least "
               f"{range_mib:g} MiB" if op == "get" else
               f"records of at least 2 x {range_mib:g} MiB in at most "
               f"{result.get('put_ranges_default', '?')} ranges")
    over = (f" over {result.get('ranged_get_over_bytes', 0) >> 20} MiB" if op == "get" else "")
    before = "a Get stream, as before ranges" if op == "get" else "as before ranged puts"
    lines = [
        "", "",
        f"{title} (redis){over}: the default ({default}), one call ({before}), exactly n ranges; "
        f"MB/s and / {raw_name}.",
        "",
        f"| block | {raw_name} | {title} (default) | / raw | {title}, one call | / raw |"
        + "".join(f" {n} ranges | / raw |" for n in counts)
        + f" {title}, one call (memory) | {title} (memory) |",
        "| --- |" + " ---: |" * (7 + 2 * len(counts)),
    ]
    for r in rows:
        cells = [f"{r[f'{raw}_mb_s']:.0f}", f"{r[f'service_redis_{op}_mb_s']:.0f}",
                 f"{r[f'{op}_vs_raw']:.2f}×", f"{r[f'service_redis_{op}_one_call_mb_s']:.0f}",
                 f"{r[f'{op}_one_call_vs_raw']:.2f}×"]
        for n in counts:
            cells += [_cell(r, f"service_redis_{op}_{n}_ranges_mb_s", ".0f"),
                      _cell(r, f"{op}_{n}_ranges_vs_raw", ".2f", "×")]
        cells += [f"{r[f'service_memory_{op}_one_call_mb_s']:.0f}",
                  f"{r[f'service_memory_{op}_mb_s']:.0f}"]
        lines.append(f"| {r['block']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: dict, key: str, spec: str, suffix: str = "") -> str:
    """A table cell; results of earlier versions of this script lack some keys."""
    return f"{row[key]:{spec}}{suffix}" if key in row else ""


if __name__ == "__main__":
    main()

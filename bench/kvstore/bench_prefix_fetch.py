"""Fetch and load a long stored prefix the way the inference service does, without a model.

    python bench/kvstore/bench_prefix_fetch.py --machine "NAME" --out bench/results/x.json
    python bench/kvstore/bench_prefix_fetch.py --device cuda ...   # on a GPU host: loads to HBM

The CPU stand-in for the H100 prefix-TTFT run (bench/inference/bench_prefix_ttft.py), where B's
time is almost all fetch + load: a 32,768-token prefix of a Llama-3-8B-shaped model (32 layers,
8 KV heads, head_dim 128, bf16) packed by KIVI 2-bit (group 32, window 0) into 128 blocks of 256
tokens, each one record of all layers made by the prefix store itself (~6.2 MB, ~800 MB in all).
It starts its own redis-server and a `kvpack kvstore serve` process on it (as deployed), puts the
blocks through the service, and then times, interleaved round by round:

- `before`: the read path this replaced, kept here as it was: Match, one `get` (GetWhole) per
  block in turn, every record verified by the service, the client and the prefix store, copied
  into per-layer bytes, then all blocks loaded into the cache. `before, old service`
  (`--baseline-pythonpath`): the same against a kvstore of another build on the same Redis (the
  commit before these changes, installed with `pip install --no-deps --target DIR`).
- `fetch N`: `KVStoreClient.iter_many` over N streams, blocks only (verified, no load).
- `load_prefix N×L`: `PrefixStore.load_prefix` with an N-stream client and L load threads (each
  loading its share of the layers): the new path, each block loaded into the cache (`--device`)
  as soon as it arrived.

The cache's contents are checked against the blocks after every load. Every layer gets the same
packed data (encoding 32 layers of random K/V on a CPU would take minutes); sizes, record layout
and the work of moving and loading them are those of the real model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import start_kvstore, start_redis  # noqa: E402
from kvpack.common import record  # noqa: E402
from kvpack.common.allocator import keep_freed_memory  # noqa: E402
from kvpack.inference.kv_cache import SequenceCache  # noqa: E402
from kvpack.inference.methods import MethodSpec, build_layer_codecs  # noqa: E402
from kvpack.inference.metrics import InferenceMetrics  # noqa: E402
from kvpack.inference.prefix_store import BlockLayout, PrefixStore, namespace_of  # noqa: E402
from kvpack.kvstore.client import KVStoreClient  # noqa: E402

SHAPE = dict(num_layers=32, num_kv_heads=8, head_dim=128)
METHOD = MethodSpec.of("kivi", {"bits": 2, "group_size": 32, "window": 0})
DTYPE = torch.bfloat16


def make_layout(codec, block_tokens: int) -> BlockLayout:
    return BlockLayout(
        model_id="random-llama3-8b-shape",
        codec_name=codec.name,
        codec_fingerprint=codec.fingerprint(),
        dtype=str(DTYPE),
        num_layers=SHAPE["num_layers"],
        num_kv_heads=SHAPE["num_kv_heads"],
        head_dim=SHAPE["head_dim"],
        block_tokens=block_tokens,
    )


def new_cache(codecs, capacity: int, device: str) -> SequenceCache:
    return SequenceCache(
        codecs,
        num_kv_heads=SHAPE["num_kv_heads"],
        head_dim=SHAPE["head_dim"],
        dtype=DTYPE,
        device=torch.device(device),
        capacity=capacity,
    )


def make_records(codecs, prefix: PrefixStore, namespace: str, layout: BlockLayout, blocks: int):
    """The prefix store's records of `blocks` blocks of random K/V (one layer packed, used for
    every layer); the token ids whose chained hashes address them."""
    torch.manual_seed(0)
    tokens = blocks * layout.block_tokens
    source = new_cache(codecs[:1], tokens, "cpu")
    layer = source.layers[0]
    shape = (1, SHAPE["num_kv_heads"], layout.block_tokens, SHAPE["head_dim"])
    for _ in range(blocks):
        layer.append(torch.randn(shape, dtype=DTYPE), torch.randn(shape, dtype=DTYPE), None)
    layers = [layer] * SHAPE["num_layers"]
    records = [
        prefix._encode_block(namespace, layers, start, layout)
        for start in range(0, tokens, layout.block_tokens)
    ]
    token_ids = list(range(1000, 1000 + tokens + 1))  # + the last prompt token, always computed
    return records, token_ids


def check_loaded(cache: SequenceCache, records: list[bytes], namespace, layout, prefix) -> None:
    """Every layer of the cache holds exactly the stored blocks."""
    for layer in cache.layers[:: SHAPE["num_layers"] - 1]:  # first and last
        for index in (0, len(records) - 1):
            start = index * layout.block_tokens
            key_bytes, value_bytes = layer.block_bytes(start, start + layout.block_tokens)
            stored = prefix._split_block(records[index], namespace, layout)[0]
            if (key_bytes, value_bytes) != stored:
                raise AssertionError(f"block {index} did not load bit-identically")


def old_read_path(client, prefix: PrefixStore, token_ids, namespace, layout, cache) -> dict:
    """The read path before iter_many/load_prefix (PrefixStore.fetch_prefix + the engine's
    _load_blocks at commit 1513d02), timed in two parts."""
    started = time.perf_counter()
    hashes = prefix.hashes(token_ids[:-1])
    matched = client.match(namespace, hashes)
    blocks = []
    for block_hash in hashes[:matched]:
        data = client.get(namespace, block_hash)
        header, payload = record.decode(data, namespace)  # verified again, as fetch_prefix did
        blocks.append(prefix._split_block(data, namespace, layout))
    fetched = time.perf_counter()
    for block in blocks:
        for layer, (key_bytes, value_bytes) in zip(cache.layers, block, strict=True):
            layer.load_block(key_bytes, value_bytes)
    sync()
    done = time.perf_counter()
    return {
        "blocks": len(blocks),
        "fetch_seconds": fetched - started,
        "load_seconds": done - fetched,
        "total_seconds": done - started,
    }


def new_read_path(
    prefix: PrefixStore, token_ids, namespace, layout, cache, codecs, capacity, device
) -> dict:
    started = time.perf_counter()
    cache, tokens = prefix.load_prefix(
        token_ids, namespace, layout, cache, lambda: new_cache(codecs, capacity, device)
    )
    sync()
    stats = prefix.last_load
    return {
        "blocks": stats.blocks,
        "fetch_seconds": stats.fetch_seconds,
        "wait_seconds": stats.wait_seconds,
        "load_seconds": stats.load_seconds,
        "total_seconds": time.perf_counter() - started,
    }, cache


def fetch_only(client: KVStoreClient, hashes, namespace) -> dict:
    started = time.perf_counter()
    count = 0
    for block in client.iter_many(namespace, hashes, copy=False):
        if block is None:
            raise RuntimeError("a stored block came back as a miss")
        count += 1
    return {"blocks": count, "total_seconds": time.perf_counter() - started}


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=128)
    parser.add_argument("--block-tokens", type=int, default=256)
    parser.add_argument("--streams", default="1,2,4,8", help="comma-separated stream counts")
    parser.add_argument(
        "--load-threads", default="1", help="comma-separated load thread counts (load_prefix)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the cache lives (cpu, cuda)")
    parser.add_argument("--machine", default=None)
    parser.add_argument(
        "--baseline-pythonpath",
        default=None,
        help="also start a kvstore from the kvpack installed there (e.g. the commit before these "
        "changes) on the same Redis and time the old read path against it: row 'before, old "
        "service'",
    )
    parser.add_argument(
        "--kvstore-pythonpath",
        default=None,
        help="run the kvstore from the kvpack installed there (before/after comparisons: e.g. "
        "`pip install --no-deps --target DIR` of an older commit)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    keep_freed_memory()  # as `kvpack inference serve` does
    streams = [int(n) for n in args.streams.split(",")]
    load_threads = [int(n) for n in args.load_threads.split(",")]
    codecs = build_layer_codecs(METHOD, num_layers=SHAPE["num_layers"], head_dim=SHAPE["head_dim"])
    layout = make_layout(codecs[0], args.block_tokens)
    namespace = namespace_of(layout.model_id, codecs[0], "bench")
    capacity = args.blocks * args.block_tokens + 512
    result = {
        "benchmark": "fetch + load of a stored prefix through the kvstore (Redis backend, service "
        "as its own process), the inference service's read path without a model",
        "machine": args.machine or f"{platform.node()} ({os.cpu_count()} CPUs)",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "shape": {**SHAPE, "dtype": str(DTYPE), "method": "kivi 2-bit, group 32, window 0"},
        "blocks": args.blocks,
        "block_tokens": args.block_tokens,
        "repeats": args.repeats,
        "kvstore": f"kvpack from {args.kvstore_pythonpath}"
        if args.kvstore_pythonpath
        else "this tree",
    }
    with ExitStack() as stack:
        raw = stack.enter_context(ExitStack())
        redis_client = start_redis(raw)
        port = redis_client.connection_pool.connection_kwargs["port"]
        address = start_kvstore(
            stack, "--backend", f"redis://127.0.0.1:{port}/0", pythonpath=args.kvstore_pythonpath
        )
        metrics = InferenceMetrics()
        writer = KVStoreClient(address, streams=1)
        baseline = None
        if args.baseline_pythonpath:
            baseline = KVStoreClient(
                start_kvstore(
                    stack,
                    "--backend",
                    f"redis://127.0.0.1:{port}/0",
                    pythonpath=args.baseline_pythonpath,
                ),
                streams=1,
            )
            stack.callback(baseline.close)
            result["baseline_kvstore"] = f"kvpack from {args.baseline_pythonpath}"
        prefix = PrefixStore(writer, block_tokens=args.block_tokens, metrics=metrics)
        stack.callback(prefix.close)
        started = time.perf_counter()
        records, token_ids = make_records(codecs, prefix, namespace, layout, args.blocks)
        print(f"made {len(records)} records in {time.perf_counter() - started:.1f} s", flush=True)
        hashes = prefix.hashes(token_ids[:-1])
        for block_hash, data in zip(hashes, records, strict=True):
            writer.put(namespace, block_hash, data)
        total_bytes = sum(map(len, records))
        result["record_bytes"] = len(records[0])
        result["prefix_bytes"] = total_bytes
        print(f"{total_bytes / 1e6:.0f} MB stored in {len(records)} records", flush=True)

        readers = {n: stack.enter_context(KVStoreClient(address, streams=n)) for n in streams}
        stores = {
            n: PrefixStore(client, block_tokens=args.block_tokens, metrics=metrics)
            for n, client in readers.items()
        }
        for n in streams:  # warm up: connections, allocator, the codec's first load
            fetch_only(readers[n], hashes[:4], namespace)
        for block_hash in hashes[:4]:  # and the old path's GetWhole
            for client in (writer, baseline) if baseline else (writer,):
                client.get(namespace, block_hash)
        runs: dict[str, list[dict]] = {}
        for round_ in range(args.repeats):
            cache = new_cache(codecs, capacity, args.device)
            timed = old_read_path(writer, prefix, token_ids, namespace, layout, cache)
            check_loaded(cache, records, namespace, layout, prefix)
            runs.setdefault("before", []).append(timed)
            del cache
            if baseline is not None:
                cache = new_cache(codecs, capacity, args.device)
                timed = old_read_path(baseline, prefix, token_ids, namespace, layout, cache)
                check_loaded(cache, records, namespace, layout, prefix)
                runs.setdefault("before, old service", []).append(timed)
                del cache
            for n in streams:
                runs.setdefault(f"fetch {n}", []).append(fetch_only(readers[n], hashes, namespace))
                for threads in load_threads:
                    stores[n].load_threads = threads
                    cache = new_cache(codecs, capacity, args.device)
                    timed, cache = new_read_path(
                        stores[n], token_ids, namespace, layout, cache, codecs, capacity,
                        args.device,
                    )  # fmt: skip
                    if timed["blocks"] != args.blocks:
                        raise RuntimeError(f"load_prefix loaded {timed['blocks']} blocks")
                    check_loaded(cache, records, namespace, layout, prefix)
                    runs.setdefault(f"load_prefix {n}x{threads}", []).append(timed)
                    del cache
            print(
                f"round {round_}: "
                + ", ".join(f"{name} {r[-1]['total_seconds']:.2f} s" for name, r in runs.items()),
                flush=True,
            )
        for store in stores.values():
            store._puts.put(None)  # stop the writer threads; clients close with the stack
    rows = {}
    for name, timings in runs.items():
        row = {
            key: statistics.median(t[key] for t in timings)
            for key in timings[0]
            if key.endswith("_seconds")
        }
        row["mb_per_s"] = total_bytes / row["total_seconds"] / 1e6
        row["runs"] = timings
        rows[name] = row
    result["results"] = rows
    before = rows["before"]["total_seconds"]
    for row in rows.values():
        row["speedup_vs_before"] = before / row["total_seconds"]
    print(markdown_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


def markdown_table(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}, cache on {result['device']}; {result['blocks']} blocks of "
        f"{result['record_bytes'] / 1e6:.2f} MB ({result['prefix_bytes'] / 1e6:.0f} MB); median "
        f"of {result['repeats']}.",
        "",
        "| path | total s | MB/s | last block in s | waiting for blocks s | loading s "
        "| vs before |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in result["results"].items():
        wait = row.get("wait_seconds", row.get("fetch_seconds"))
        load = row.get("load_seconds")
        fetched = row.get("fetch_seconds")
        lines.append(
            f"| {name} | {row['total_seconds']:.2f} | {row['mb_per_s']:.0f} | "
            f"{'' if fetched is None else f'{fetched:.2f}'} | "
            f"{'' if wait is None else f'{wait:.2f}'} | {'' if load is None else f'{load:.2f}'} | "
            f"{row['speedup_vs_before']:.2f}× |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

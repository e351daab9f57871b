"""The longest context each method holds on one GPU, with a decode step measured there.

    python bench/inference/bench_long_context.py --out $OUT/inference_long_context_h100.json

Random-weight Llama-3-8B shape in bf16 (bench_decode.py), batch 1. Per method: the cache's bytes
per token are measured on a small cache, the free GPU memory after loading the model (less a
headroom for activations, the graphs, the fill's temporaries and, for methods without a fused
decode kernel, the float32 scores of one layer) gives the longest context, rounded down to 64K
tokens; the cache is filled with synthetic keys and values encoded directly (a multi-million-token
prefill is quadratic), then decode steps are timed as the engine runs them. On out-of-memory the
context shrinks by 5% and the method is tried again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_decode import (
    LLAMA3_8B,
    METHODS,
    TINY,
    bench_kvpack,
    build_model,
    kvpack_cache,
    reset_memory,
)

ROUND_TOKENS = 65536
HEADROOM_BYTES = 2 << 30


def bytes_per_token(runner, codecs, small: int = 8192, large: int = 40960) -> float:
    """Allocated cache bytes per added token (the difference of two capacities, all layers)."""

    def allocated(capacity: int) -> int:
        reset_memory(runner.device)
        before = torch.cuda.memory_allocated() if runner.device.type == "cuda" else 0
        cache = kvpack_cache(runner, codecs, 0, capacity)
        after = torch.cuda.memory_allocated() if runner.device.type == "cuda" else cache.nbytes()
        del cache
        return after - before

    return (allocated(large) - allocated(small)) / (large - small)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default="fp16,kivi,qjl")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    args = parser.parse_args()

    from kvpack.inference.methods import MethodSpec, build_layer_codecs
    from kvpack.inference.runner import ModelRunner

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    max_positions = 1 << 23  # RoPE is computed from positions; no table of this size exists
    model = build_model(TINY if args.smoke else LLAMA3_8B, max_positions, device, dtype)
    runner = ModelRunner(model)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        "total_memory_gib": (
            torch.cuda.get_device_properties(0).total_memory / 2**30 if device.type == "cuda" else 0
        ),
        "torch": torch.__version__,
        "model": "random-weight Llama-3-8B shape" if not args.smoke else "tiny (smoke)",
        "dtype": str(dtype),
        "batch": 1,
        "method_params": {},
        "results": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.methods.split(","):
        codecs = build_layer_codecs(
            MethodSpec.of(name, METHODS[name]),
            num_layers=runner.num_layers,
            head_dim=runner.head_dim,
        )
        report["method_params"][name] = METHODS[name]
        per_token = bytes_per_token(runner, codecs)
        reset_memory(device)
        free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 1 << 30
        fused = codecs[0].supports_decode_attention(runner.dtype)
        # unfused decode holds float32 scores, softmax and bf16 probabilities of one layer
        transient = 0 if fused else 10 * runner.num_heads
        tokens = int((free - HEADROOM_BYTES) / max(per_token + transient, 1.0))
        tokens = max(ROUND_TOKENS, tokens // ROUND_TOKENS * ROUND_TOKENS)
        if args.smoke:
            tokens = 4096
        row = {"bytes_per_token_all_layers": per_token, "free_gib_before": free / 2**30}
        for _attempt in range(4):
            started = time.perf_counter()
            try:
                result = bench_kvpack(runner, codecs, tokens, args.decode_tokens, graph=True)
            except torch.OutOfMemoryError as error:
                row.setdefault("out_of_memory_at", []).append(tokens)
                print(f"{name}: {tokens} tokens out of memory ({str(error)[:120]})", flush=True)
                reset_memory(device)
                tokens = int(tokens * 0.95) // 4096 * 4096
                continue
            row.update(result, context_tokens=tokens, attempt_seconds=time.perf_counter() - started)
            break
        report["results"][name] = row
        print(name, json.dumps(row), flush=True)
        args.out.write_text(json.dumps(report, indent=1))
        reset_memory(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

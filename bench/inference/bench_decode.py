"""Decode speed and memory of the inference engine against HF `generate`, one GPU, one run.

    python bench/inference/bench_decode.py --out $OUT/inference_decode_h100.json

A random-weight model of Llama-3-8B shape (32 layers, 32 query / 8 KV heads, head_dim 128, bf16),
batch 1. For each context length the cache is filled with synthetic keys and values (the same
tensors for every method: a 128K prefill is quadratic and says nothing about decode), then:
- HF: `model.generate` continuing from a DynamicCache holding them (SDPA attention), timed for 1
  and for 1 + N new tokens; decode tokens/s = N / difference.
- kvpack: `ModelRunner.decode` steps over a `SequenceCache` of each method (fp16/kivi/qjl), timed
  over N steps after warm-up (CUDA-synchronized wall clock: the step includes the host work).
Correctness first, at the first context: the logits of one decode step from each kvpack method are
compared with HF's on the same cache (relative L2 error; fp16 must agree to bf16 rounding).
Peak memory is torch.cuda.max_memory_allocated during each method's fill and decode.
`--smoke` runs a tiny model on the CPU to check the script only.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
TINY = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)
METHODS = {
    "fp16": {},
    "kivi": {"bits": 2, "group_size": 32, "window": 128},
    "qjl": {
        "sketch_dim": 256,
        "outlier_channels": 8,
        "outlier_sketch_dim": 256,
        "group_size": 32,
        "value_bits": 2,
        "window": 128,
    },
}
FILL_CHUNK_TOKENS = 8192


def build_model(shape: dict, max_positions: int, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=max_positions)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 directly: an fp32 8B model would take 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    return model


def synthetic_kv(layer: int, start: int, end: int, num_kv_heads: int, head_dim: int, device, dtype):
    """Keys and values of tokens [start, end) of one layer, the same for every method."""
    generator = torch.Generator(device=device).manual_seed(1000 * layer + start)
    shape = (1, num_kv_heads, end - start, head_dim)
    k = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    v = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return k.to(dtype), v.to(dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


# -- HF ---------------------------------------------------------------------------------------


def hf_cache(model, context: int):
    from transformers import DynamicCache

    config = model.config
    cache = DynamicCache(config=config)
    device, dtype = model.device, model.dtype
    for layer in range(config.num_hidden_layers):
        parts = [
            synthetic_kv(
                layer,
                s,
                min(s + FILL_CHUNK_TOKENS, context),
                config.num_key_value_heads,
                config.head_dim,
                device,
                dtype,
            )
            for s in range(0, context, FILL_CHUNK_TOKENS)
        ]
        keys = torch.cat([k for k, _ in parts], dim=2)
        values = torch.cat([v for _, v in parts], dim=2)
        del parts
        cache.update(keys, values, layer)
    return cache


def hf_generate_seconds(model, cache, context: int, new_tokens: int, input_ids) -> float:
    sync(model.device)
    start = time.perf_counter()
    model.generate(
        input_ids,
        past_key_values=cache,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        attention_mask=torch.ones_like(input_ids),
    )
    sync(model.device)
    seconds = time.perf_counter() - start
    cache.crop(-(cache.get_seq_length() - context))  # back to the synthetic context
    return seconds


def bench_hf(model, context: int, decode_tokens: int) -> dict:
    device = model.device
    reset_memory(device)
    cache = hf_cache(model, context)
    input_ids = torch.randint(0, model.config.vocab_size, (1, context + 1), device=device)
    hf_generate_seconds(model, cache, context, 2, input_ids)  # warm-up
    first = min(hf_generate_seconds(model, cache, context, 1, input_ids) for _ in range(2))
    total = hf_generate_seconds(model, cache, context, 1 + decode_tokens, input_ids)
    result = {
        "decode_tokens_per_second": decode_tokens / (total - first),
        "peak_memory_gib": peak_gib(device),
    }
    del cache
    return result


def hf_step_logits(model, context: int, token: torch.Tensor) -> torch.Tensor:
    cache = hf_cache(model, context)
    with torch.inference_mode():
        out = model(
            input_ids=token.view(1, 1),
            past_key_values=cache,
            position_ids=torch.tensor([[context]], device=model.device),
            use_cache=True,
        )
    return out.logits[0, -1].float()


# -- kvpack -----------------------------------------------------------------------------------


def kvpack_cache(runner, codecs, context: int, capacity: int):
    from kvpack.inference.kv_cache import SequenceCache

    cache = SequenceCache(
        codecs,
        num_kv_heads=runner.num_kv_heads,
        head_dim=runner.head_dim,
        dtype=runner.dtype,
        device=runner.device,
        capacity=capacity,
    )
    for index, layer in enumerate(cache.layers):
        for start in range(0, context, FILL_CHUNK_TOKENS):
            k, v = synthetic_kv(
                index,
                start,
                min(start + FILL_CHUNK_TOKENS, context),
                runner.num_kv_heads,
                runner.head_dim,
                runner.device,
                runner.dtype,
            )
            layer.append(k, v, None)
    return cache


def bench_kvpack(runner, codecs, context: int, decode_tokens: int, warmup_tokens: int = 3) -> dict:
    device = runner.device
    reset_memory(device)
    started = time.perf_counter()
    cache = kvpack_cache(runner, codecs, context, context + decode_tokens + warmup_tokens)
    sync(device)
    fill_seconds = time.perf_counter() - started
    token = torch.zeros(1, dtype=torch.long, device=device)
    position = context

    def step() -> None:
        nonlocal token, position
        logits = runner.decode([cache], token, torch.tensor([position], device=device))
        token = torch.argmax(logits, dim=-1)  # stays on the device: no host sync per step
        position += 1

    for _ in range(warmup_tokens):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(decode_tokens):
        step()
    sync(device)
    seconds = time.perf_counter() - started
    result = {
        "decode_tokens_per_second": decode_tokens / seconds,
        "peak_memory_gib": peak_gib(device),
        "fill_seconds": fill_seconds,
        "cache_bytes": cache.nbytes(),
        "compression_ratio": cache.compression_ratio(),
    }
    return result  # the cache is freed with this frame


def kvpack_step_logits(runner, codecs, context: int, token: torch.Tensor) -> torch.Tensor:
    cache = kvpack_cache(runner, codecs, context, context + 1)
    position = torch.tensor([context], device=runner.device)
    return runner.decode([cache], token.view(1), position)[0].float()


def attention_error(runner, codec, context: int) -> float:
    """‖attend(q) − SDPA(q, K, V)‖ / ‖SDPA‖: one layer, one query token, layer-0 synthetic K/V."""
    from kvpack.inference.kv_cache import LayerCache

    generator = torch.Generator(device=runner.device).manual_seed(7)
    q = torch.randn(
        1, runner.num_heads, 1, runner.head_dim, generator=generator, device=runner.device
    ).to(runner.dtype)
    layer = LayerCache(
        codec,
        num_kv_heads=runner.num_kv_heads,
        dtype=runner.dtype,
        device=runner.device,
        capacity=context,
        pre_rope_keys=False,
    )
    keys, values = [], []
    for start in range(0, context, FILL_CHUNK_TOKENS):
        k, v = synthetic_kv(
            0,
            start,
            min(start + FILL_CHUNK_TOKENS, context),
            runner.num_kv_heads,
            runner.head_dim,
            runner.device,
            runner.dtype,
        )
        layer.append(k, v, None)
        keys.append(k)
        values.append(v)
    group = runner.num_heads // runner.num_kv_heads
    k = torch.cat(keys, dim=2).repeat_interleave(group, dim=1).float()
    v = torch.cat(values, dim=2).repeat_interleave(group, dim=1).float()
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k, v, scale=runner.scaling
    )
    out = layer.attend(q, runner.scaling, 1).float()
    return ((out - reference).norm() / reference.norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contexts", default="4096,32768,131072")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    args = parser.parse_args()

    # kvpack must be installed (the checkout's top-level kvpack/ folder alone lacks the mapped
    # subpackages), so run this from outside the repository root.
    from kvpack.inference.methods import MethodSpec, build_layer_codecs
    from kvpack.inference.runner import ModelRunner

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    contexts = [int(c) for c in args.contexts.split(",")]
    methods = args.methods.split(",")
    model = build_model(TINY if args.smoke else LLAMA3_8B, max(contexts) + 1024, device, dtype)
    runner = ModelRunner(model)
    codecs = {
        name: build_layer_codecs(
            MethodSpec.of(name, METHODS[name]),
            num_layers=runner.num_layers,
            head_dim=runner.head_dim,
        )
        for name in methods
    }
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "random-weight Llama-3-8B shape" if not args.smoke else "tiny (smoke)",
        "dtype": str(dtype),
        "batch": 1,
        "decode_tokens": args.decode_tokens,
        "method_params": {name: METHODS[name] for name in methods},
        "correctness": {},
        "results": {},
    }
    import transformers

    report["transformers"] = transformers.__version__

    # correctness, at the first context: (1) one layer's attention through each codec against
    # SDPA in float32 on the same bf16 inputs (asserted for fp16); (2) the logits of a whole decode
    # step against HF's (reported only: 32 random-weight layers amplify any rounding difference).
    context = contexts[0]
    for name in methods:
        report["correctness"][name] = {
            "context": context,
            "attention_relative_l2_vs_sdpa": attention_error(runner, codecs[name][0], context),
        }
    token = torch.tensor([7], device=device)
    reference = hf_step_logits(model, context, token)
    for name in methods:
        logits = kvpack_step_logits(runner, codecs[name], context, token)
        report["correctness"][name]["logits_relative_l2_vs_hf"] = (
            (logits - reference).norm() / reference.norm()
        ).item()
        same_argmax = bool(logits.argmax() == reference.argmax())
        report["correctness"][name]["same_argmax_as_hf"] = same_argmax
        print(f"correctness {name}: {report['correctness'][name]}", flush=True)
    fp16_error = report["correctness"]["fp16"]["attention_relative_l2_vs_sdpa"]
    assert fp16_error < 1e-2, f"fp16 attention disagrees with SDPA: {fp16_error}"
    reset_memory(device)

    for context in contexts:
        row = report["results"].setdefault(str(context), {})
        if not args.no_hf:
            try:
                row["hf_generate"] = bench_hf(model, context, args.decode_tokens)
            except torch.OutOfMemoryError as error:
                row["hf_generate"] = {"error": f"out of memory: {error}"[:200]}
        for name in methods:
            try:
                row[name] = bench_kvpack(runner, codecs[name], context, args.decode_tokens)
            except torch.OutOfMemoryError as error:
                row[name] = {"error": f"out of memory: {error}"[:200]}
        print(context, json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))  # partial results survive a timeout

    print(f"\n| context | {' | '.join(['hf_generate', *methods])} |  (decode tok/s, peak GiB)")
    for context, row in report["results"].items():
        cells = [
            f"{r['decode_tokens_per_second']:.1f} / {r['peak_memory_gib']:.1f}"
            if "error" not in r
            else "OOM"
            for r in row.values()
        ]
        print(f"| {context} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

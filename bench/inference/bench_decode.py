"""Decode speed and memory of the inference engine against HF `generate`, one GPU, one run.

    python bench/inference/bench_decode.py --sweep --profile --out $OUT/inference_decode_h100.json

A random-weight model of Llama-3-8B shape (32 layers, 32 query / 8 KV heads, head_dim 128, bf16),
batch 1. For each context length the cache is filled with synthetic keys and values (the same
tensors for every method: a 128K prefill is quadratic and says nothing about decode), then:
- HF: `model.generate` continuing from a DynamicCache holding them (SDPA attention), timed for 1
  and for 1 + N new tokens; decode tokens/s = N / difference.
- kvpack: `ModelRunner.decode` steps over a `SequenceCache` of each method (fp16/kivi/qjl), timed
  over N steps after warm-up (CUDA-synchronized wall clock: the step includes the host work), both
  as the engine runs them (a CUDA graph of the step where the codec has a fused decode kernel:
  "graph") and with every step eager ("eager").
Correctness first, at the first context: (1) one layer's attention through each codec against
float32 SDPA (asserted for fp16); (2) the fused decode kernel against the unfused codec path
(key_scores, softmax, attend_values) on the GPU (asserted); (3) 40 graphed decode steps against
40 eager ones from the same cache, crossing group boundaries (asserted: same logits up to bf16
noise); (4) the logits of one decode step from each method against HF's (reported only).
`--sweep` first times the fused decode kernel's launch settings at the largest context and keeps
the fastest; `--profile` writes torch.profiler tables (CPU and CUDA time per op) of one eager and
one graphed kivi step. Peak memory is torch.cuda.max_memory_allocated during each method's fill
and decode. `--smoke` runs a tiny model on the CPU to check the script only.
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


def bench_kvpack(
    runner, codecs, context: int, decode_tokens: int, graph: bool, warmup_tokens: int = 3
) -> dict:
    device = runner.device
    reset_memory(device)
    started = time.perf_counter()
    cache = kvpack_cache(runner, codecs, context, context + decode_tokens + 64)
    sync(device)
    fill_seconds = time.perf_counter() - started
    token = torch.zeros(1, dtype=torch.long, device=device)
    position = context

    def step() -> None:
        nonlocal token, position
        logits = runner.decode(
            [cache], token, torch.tensor([position], device=device), use_graph=graph
        )
        token = torch.argmax(logits, dim=-1)  # stays on the device: no host sync per step
        position += 1

    started = time.perf_counter()
    for _ in range(warmup_tokens):
        step()
    sync(device)
    warmup_seconds = time.perf_counter() - started
    # Time whole group cycles: a step that packs a group replays another graph (and costs more).
    started = time.perf_counter()
    for _ in range(decode_tokens):
        step()
    sync(device)
    seconds = time.perf_counter() - started
    graphs = cache.decode_graphs
    return {
        "decode_tokens_per_second": decode_tokens / seconds,
        "step_ms": 1000 * seconds / decode_tokens,
        "peak_memory_gib": peak_gib(device),
        "fill_seconds": fill_seconds,
        "warmup_seconds_incl_capture": warmup_seconds,
        "graphs_captured": graphs.captures if graphs is not None else 0,
        "cache_bytes": cache.nbytes(),
        "compression_ratio": cache.compression_ratio(),
    }  # the cache is freed with this frame


def kvpack_step_logits(runner, codecs, context: int, token: torch.Tensor) -> torch.Tensor:
    cache = kvpack_cache(runner, codecs, context, context + 1)
    position = torch.tensor([context], device=runner.device)
    return runner.decode([cache], token.view(1), position)[0].float()


def graph_vs_eager(runner, codecs, context: int, steps: int = 40) -> dict:
    """Greedy-decode `steps` tokens from two identical caches, graphed and eager; compare logits.

    The context is chosen off a group boundary so the steps cross group completions."""
    device = runner.device
    caches = [kvpack_cache(runner, codecs, context, context + steps + 64) for _ in range(2)]
    tokens = [torch.tensor([7], device=device)] * 2
    worst, agree = 0.0, 0
    for index in range(steps):
        position = torch.tensor([context + index], device=device)
        logits = [
            runner.decode([cache], token, position, use_graph=graph)[0]
            for cache, token, graph in zip(caches, tokens, (True, False), strict=True)
        ]
        error = ((logits[0] - logits[1]).norm() / logits[1].norm()).item()
        worst = max(worst, error)
        agree += int(logits[0].argmax() == logits[1].argmax())
        tokens = [logits[1].argmax().view(1)] * 2  # both follow the eager path's tokens
    graphs = caches[0].decode_graphs
    return {
        "steps": steps,
        "context": context,
        "graphed": graphs is not None,
        "graphs_captured": graphs.captures if graphs is not None else 0,
        "worst_logits_relative_l2": worst,
        "same_argmax_steps": agree,
    }


def fused_vs_unfused(runner, codec, contexts: list[int]) -> dict:
    """The fused decode kernel against the unfused codec path on one layer, on the GPU."""
    from kvpack.kernels.cache import PackedCache

    if not codec.supports_decode_attention(runner.dtype):
        return {"supported": False}
    out = {}
    generator = torch.Generator(device=runner.device).manual_seed(11)
    for context in contexts:
        keys = codec.new_keys(1, runner.num_kv_heads, dtype=runner.dtype, device=runner.device,
                              capacity=context + 64)  # fmt: skip
        values = codec.new_values(1, runner.num_kv_heads, dtype=runner.dtype,
                                  device=runner.device, capacity=context + 64)  # fmt: skip
        k, v = synthetic_kv(0, 0, context, runner.num_kv_heads, runner.head_dim, runner.device,
                            runner.dtype)  # fmt: skip
        codec.append_keys(keys, k)
        codec.append_values(values, v)
        q = torch.randn(1, runner.num_heads, 1, runner.head_dim, generator=generator,
                        device=runner.device).to(runner.dtype)  # fmt: skip
        lengths = torch.tensor([keys.num_packed, keys.tail_len], device=runner.device)
        fused = codec.decode_attention(q, keys, values, lengths, runner.scaling).float()
        assert isinstance(keys, PackedCache)
        scores = codec.key_scores(q, keys) * runner.scaling
        unfused = codec.attend_values(torch.softmax(scores, -1).to(q.dtype), values).float()
        out[str(context)] = ((fused - unfused).norm() / unfused.norm()).item()
    return out


def profile_step(runner, codecs, context: int, out_dir: Path) -> dict:
    """torch.profiler tables of one eager and one graphed step (sorted by CPU, then CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    device = runner.device
    summary = {}
    for mode, graph in (("eager", False), ("graph", True)):
        cache = kvpack_cache(runner, codecs, context, context + 64)
        token = torch.zeros(1, dtype=torch.long, device=device)
        for index in range(3):  # warm-up (and capture)
            runner.decode([cache], token, torch.tensor([context + index], device=device),
                          use_graph=graph)  # fmt: skip
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.decode([cache], token, torch.tensor([context + 3], device=device),
                          use_graph=graph)  # fmt: skip
            sync(device)
        events = prof.key_averages()
        tables = [events.table(sort_by="self_cpu_time_total", row_limit=25)]
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                tables.append(events.table(sort_by=key, row_limit=25))
                break
            except Exception:  # the key's name changed across torch versions
                continue
        (out_dir / f"profile_{mode}_{context}.txt").write_text("\n\n".join(tables))
        summary[mode] = {
            "cpu_ms": sum(e.self_cpu_time_total for e in events) / 1000,
            "cuda_ms": sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000,
            "kernel_launches": sum(
                e.count
                for e in events
                if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")  # fmt: skip
            ),
        }
        print(f"profile {mode}: {summary[mode]}", flush=True)
        print(tables[0][:6000], flush=True)
        del cache
    return summary


def sweep_decode_kernel(runner, codecs_by_method: dict, context: int) -> dict:
    """Time the fused decode kernel's launch settings at `context`; keep the fastest for kivi."""
    from kvpack.kernels import decode_attention_triton as dat

    # (block_t, warps, stages, programs per SM, register cap or 0); the first run of the
    # rewritten kernel (inference_decode_h100.json of 2026-12-07) put 64 / 4 / 2 first, with
    # 32-token tiles and 8 warps well behind: the sweep now spends its time around that setting.
    candidates = [
        (64, 4, 2, per_sm, regs) for per_sm in (4, 5, 6, 8) for regs in (0, 96, 80)
    ] + [(64, 4, 3, 4, 0), (64, 4, 3, 6, 80), (128, 8, 2, 4, 0), (128, 8, 2, 6, 80)]
    results = {}
    for method, codecs in codecs_by_method.items():
        codec = codecs[0]
        if method != "kivi" or not codec.supports_decode_attention(runner.dtype):
            continue
        keys = codec.new_keys(1, runner.num_kv_heads, dtype=runner.dtype, device=runner.device,
                              capacity=context + 64)  # fmt: skip
        values = codec.new_values(1, runner.num_kv_heads, dtype=runner.dtype,
                                  device=runner.device, capacity=context + 64)  # fmt: skip
        for start in range(0, context, FILL_CHUNK_TOKENS):
            end = min(start + FILL_CHUNK_TOKENS, context)
            k, v = synthetic_kv(0, start, end, runner.num_kv_heads, runner.head_dim,
                                runner.device, runner.dtype)  # fmt: skip
            codec.append_keys(keys, k)
            codec.append_values(values, v)
        q = torch.randn(1, runner.num_heads, 1, runner.head_dim, device=runner.device,
                        dtype=runner.dtype)  # fmt: skip
        lengths = torch.tensor([keys.num_packed, keys.tail_len], device=runner.device)
        scores = codec.key_scores(q, keys) * runner.scaling  # the unfused path as reference
        reference = codec.attend_values(torch.softmax(scores, -1).to(q.dtype), values).float()
        del scores
        timings = {}
        for candidate in candidates:
            set_launch(dat, *candidate)
            name = "t{}_w{}_s{}_p{}_r{}".format(*candidate)
            try:
                out = codec.decode_attention(q, keys, values, lengths, runner.scaling)
                error = ((out.float() - reference).norm() / reference.norm()).item()
                if error > 1e-2:
                    timings[name] = {"error": f"disagrees: {error}"}
                    continue
                seconds = cuda_time(
                    lambda c=codec, a=(q, keys, values, lengths, runner.scaling): (
                        c.decode_attention(*a)
                    )
                )
                timings[name] = {"us": seconds * 1e6}
            except Exception as error:  # a setting that does not compile is skipped
                timings[name] = {"error": str(error)[:200]}
        timed = {n: t["us"] for n, t in timings.items() if "us" in t}
        best = min(timed, key=timed.get)
        cache_bytes = codec.nbytes(keys) + codec.nbytes(values)
        results[method] = {
            "context": context,
            "timings": timings,
            "best": best,
            "best_us": timed[best],
            "best_gb_per_s": cache_bytes / (timed[best] * 1e-6) / 1e9,
            "cache_bytes_one_layer": cache_bytes,
        }
        print(f"sweep {method}: best {best} {timed[best]:.1f} us "
              f"({results[method]['best_gb_per_s']:.0f} GB/s)", flush=True)  # fmt: skip
        del keys, values
    if "kivi" in results:  # the compressed method the target is about
        set_launch(dat, *(int(part[1:]) for part in results["kivi"]["best"].split("_")))
    results["kept"] = {
        "block_t": dat.DECODE_BLOCK_T,
        "num_warps": dat.DECODE_NUM_WARPS,
        "num_stages": dat.DECODE_NUM_STAGES,
        "programs_per_sm": dat.DECODE_PROGRAMS_PER_SM,
        "max_registers": dat.DECODE_MAX_REGISTERS,
    }
    return results


def set_launch(dat, block_t: int, warps: int, stages: int, per_sm: int, regs: int = 0) -> None:
    """Set the fused decode kernel's launch settings (module constants of
    kvpack.kernels.decode_attention_triton; regs 0 = no register cap)."""
    dat.DECODE_BLOCK_T, dat.DECODE_NUM_WARPS = block_t, warps
    dat.DECODE_NUM_STAGES, dat.DECODE_PROGRAMS_PER_SM = stages, per_sm
    dat.DECODE_MAX_REGISTERS = regs or None


def cuda_time(call, repeats: int = 50) -> float:
    """Median seconds of `call` over `repeats` CUDA-event-timed runs (after 3 warm-ups)."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


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
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-eager", action="store_true", help="skip the all-eager variants")
    parser.add_argument("--sweep", action="store_true", help="sweep the fused kernel first")
    parser.add_argument("--profile", action="store_true", help="profile one kivi step")
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
    import transformers

    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": "random-weight Llama-3-8B shape" if not args.smoke else "tiny (smoke)",
        "dtype": str(dtype),
        "batch": 1,
        "decode_tokens": args.decode_tokens,
        "method_params": {name: METHODS[name] for name in methods},
        "correctness": {},
        "results": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=1))  # partial results survive a timeout

    if args.sweep and device.type == "cuda":
        report["sweep"] = sweep_decode_kernel(runner, codecs, max(contexts))
        save()
        reset_memory(device)

    # correctness, at the first context (see the module docstring)
    context = contexts[0]
    for name in methods:
        report["correctness"][name] = {
            "context": context,
            "attention_relative_l2_vs_sdpa": attention_error(runner, codecs[name][0], context),
            "fused_vs_unfused_relative_l2": fused_vs_unfused(
                runner, codecs[name][0], [context, context + 77]
            ),
            "graph_vs_eager": graph_vs_eager(runner, codecs[name], context + 13),
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
    save()
    fp16_error = report["correctness"]["fp16"]["attention_relative_l2_vs_sdpa"]
    assert fp16_error < 1e-2, f"fp16 attention disagrees with SDPA: {fp16_error}"
    for name in methods:
        check = report["correctness"][name]
        fused = [e for e in check["fused_vs_unfused_relative_l2"].values() if isinstance(e, float)]
        assert all(e < 2e-2 for e in fused), f"{name}: fused decode disagrees: {check}"
        assert check["graph_vs_eager"]["worst_logits_relative_l2"] < 2e-2, f"{name}: {check}"
    reset_memory(device)

    if args.profile and device.type == "cuda" and "kivi" in codecs:
        report["profile"] = profile_step(runner, codecs["kivi"], 32768, args.out.parent)
        save()
        reset_memory(device)

    variants = [(name, True) for name in methods]
    if not args.no_eager:  # methods without a fused kernel are eager in both
        variants += [
            (name, False)
            for name in methods
            if codecs[name][0].supports_decode_attention(runner.dtype)
        ]
    for context in contexts:
        row = report["results"].setdefault(str(context), {})
        if not args.no_hf:
            try:
                row["hf_generate"] = bench_hf(model, context, args.decode_tokens)
            except torch.OutOfMemoryError as error:
                row["hf_generate"] = {"error": f"out of memory: {error}"[:200]}
        for name, graph in variants:
            key = name if graph else f"{name}_eager"
            try:
                row[key] = bench_kvpack(runner, codecs[name], context, args.decode_tokens, graph)
            except torch.OutOfMemoryError as error:
                row[key] = {"error": f"out of memory: {error}"[:200]}
            reset_memory(device)
        print(context, json.dumps(row), flush=True)
        save()

    names = list(next(iter(report["results"].values())))
    print(f"\n| context | {' | '.join(names)} |  (decode tok/s, peak GiB)")
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

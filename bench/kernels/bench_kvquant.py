"""KVQuant kernels on one GPU: correctness against the PyTorch reference, then timings next to the
bf16 q·Kᵀ / SDPA / p·V baselines of bench_kernels.py, in the same run and at the same shapes
(a Llama-3-8B attention layer: 32 query heads, 8 KV heads, head_dim 128, bf16, batch 1, one
decode query against 8K..512K cached tokens).

    python bench/kernels/bench_kvquant.py --out $OUT/kvquant_h100.json

The codebooks are random (timing does not depend on their values); fidelity on real weights is
measured by tests/calibrate. `kvquant_rows` is also what bench_kernels.py's kvquant slot calls.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path

import bench_kernels as base  # same folder; sets up kvpack.kernels on a machine without install
import torch
import torch.nn.functional as F

sys.path.insert(0, str(base.REPO / "tests"))
from kvpack.kernels import kvquant_reference as reference  # noqa: E402
from kvpack.kernels import kvquant_scores_v3_triton, kvquant_triton, make_codec  # noqa: E402
from support.kvquant import keys_like, random_calibration, values_like  # noqa: E402

BITS = (2, 3, 4)
CORRECTNESS_CASES = [
    # (dtype, head_dim, query heads, kv heads, query tokens, cached tokens, bits)
    (torch.bfloat16, 128, 32, 8, 1, 4096, 3),
    (torch.bfloat16, 128, 32, 8, 16, 2048, 2),
    (torch.float16, 64, 9, 3, 4, 1024, 4),
    (torch.float32, 128, 8, 8, 2, 1024, 3),
    (torch.bfloat16, 64, 24, 3, 1, 3000, 2),
    (torch.bfloat16, 128, 8, 2, 1, 524288, 3),  # RoPE angles of 512K-token positions
    (torch.float32, 128, 4, 1, 1, 524288, 4),
    (torch.float16, 128, 24, 3, 2, 3001, 3),  # GQA 8 x 2 query tokens: a full 16-row tile
]
# version-3 launch settings checked against the reference (each: every score written, rel. err.)
V3_CHECKS = [
    dict(),
    dict(prefetch=0, direct_store=False),
    dict(prefetch=1, direct_store=True),
    dict(prefetch=0, direct_store=True, heads_per_program=2),
    dict(block_t=128, num_warps=8, direct_store=True),
    dict(block_t=128, num_warps=8, direct_store=True, maxnreg=None),
    dict(outlier_prefetch=False),
    dict(mask_rows=False),
    dict(prefetch=0, direct_store=True, heads_per_program=2, mask_rows=False),
]
# launch settings of the raw score kernel; the first is the launcher's default for 4 bits (version
# 2, decode row tile), version 3 is its default for 2 and 3 bits (head_dim 128, 16-bit queries).
# prepared0: version 2's first form, query operands rebuilt per tile and head inside the kernel
# (the default prepares them once per call, see key_scores(prepared_queries=...)).
SCORE_VARIANTS = [
    dict(version=2, block_t=64, num_warps=4),
    # v3 (key operand built in the dot's register layout, 128-register cap, bt64 w4): launcher
    # defaults (next head's code words loaded one head ahead into registers, scores stored from
    # the accumulator layout, the tile's outlier index/delta lines asked from L2 before the head
    # loop), then without that prefetch (run 7's default). Run 7's load/store options and run 8's
    # pipelined head loop (slower, removed since) are in their JSON and kvquant_h100_notes.md.
    dict(version=3),
    dict(version=3, outlier_prefetch=False),
    # reading every row of the query operands (run 9: the default mask_rows=True, which reads only
    # the real query rows, a quarter of their L2 bytes at GQA 4, is 2-4% faster)
    dict(version=3, mask_rows=False),
]


def variant_label(variant: dict) -> str:
    names = {"block_t": "bt", "num_warps": "w", "num_stages": "stages",
             "heads_per_program": "heads", "words": "words", "prepared_queries": "prepared",
             "version": "v", "maxnreg": "maxnreg", "prefetch": "prefetch",
             "direct_store": "direct", "outlier_row_chunk": "outlier_rows",
             "outlier_prefetch": "outlier_prefetch", "mask_rows": "mask_rows"}
    return " ".join(f"{names[key]}{int(value) if isinstance(value, bool) else value}"
                    for key, value in variant.items())


def calibration_for(head_dim: int, kv_heads: int):
    return random_calibration(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, bits=BITS,
                              outliers=0.01, uniform_codebooks=True)


def codec_for(calibration, bits: int):
    return make_codec("kvquant", head_dim=calibration.head_dim, calibration=calibration,
                      bits=bits, outliers=0.01, sink_tokens=1, layer=0)


def rel_err(value, ref) -> float:
    return base.rel_err(value, ref)


def check_correctness(device) -> dict:
    """Triton vs reference on fresh random inputs (poisoned outputs), several shapes and dtypes."""
    results = {}
    for dtype, head_dim, hq, hkv, tq, tokens, bits in CORRECTNESS_CASES:
        name = (f"{str(dtype).removeprefix('torch.')}_d{head_dim}_gqa{hq // hkv}_tq{tq}"
                f"_t{tokens}_b{bits}")
        g = torch.Generator().manual_seed(tokens + bits)
        calibration = calibration_for(head_dim, hkv)
        k = keys_like(calibration, 0, 2, tokens, g, outlier_rate=0.005).to(device, dtype)
        v = values_like(calibration, 2, tokens, g).to(device, dtype)
        q = torch.randn(2, hq, tq, head_dim, generator=g).to(device, dtype)
        p = torch.softmax(torch.randn(2, hq, tq, tokens, generator=g), -1).to(device)
        fast, slow = codec_for(calibration, bits), codec_for(calibration, bits)
        fast.use_triton, slow.use_triton = True, False
        case = {}
        keys_fast, keys_slow = fast.encode_keys(k), slow.encode_keys(k)
        used_fast, used_slow = keys_fast.used(), keys_slow.used()
        case["key_code_mismatch_fraction"] = (
            reference.unpack_codes(used_fast["codes"], bits, head_dim)
            != reference.unpack_codes(used_slow["codes"], bits, head_dim)).float().mean().item()
        case["key_outlier_index_equal_fraction"] = (
            used_fast["outlier_index"] == used_slow["outlier_index"]).float().mean().item()
        case["key_outlier_delta_rel_err"] = rel_err(used_fast["outlier_delta"],
                                                    used_slow["outlier_delta"])
        t = fast.tables(device)
        for words in (True, False) if tokens < 100000 else (True,):
            out = torch.full((2, hq, tq, tokens), float("nan"), device=device)
            out[..., :1] = 0  # the sink column is the codec's job, not the kernel's
            kvquant_triton.key_scores(q, used_slow["codes"], used_slow["outlier_index"],
                                      used_slow["outlier_delta"], t["key_zero"], t["key_scale"],
                                      t["key_lut"], t["inv_freq"], 1.0, bits, token_start=1,
                                      out=out, words=words)
            expected = slow.key_scores(q, keys_slow)
            label = "words" if words else "bytes"
            case[f"score_all_written_{label}"] = bool(torch.isfinite(out).all().item())
            case[f"score_rel_err_{label}"] = rel_err(out[..., 1:], expected[..., 1:])
        for check in V3_CHECKS if kvquant_scores_v3_triton.v3_fits(q, head_dim, bits) else ():
            if hkv % check.get("heads_per_program", 1):
                continue
            out = torch.full((2, hq, tq, tokens), float("nan"), device=device)
            out[..., :1] = 0
            kvquant_triton.key_scores(q, used_slow["codes"], used_slow["outlier_index"],
                                      used_slow["outlier_delta"], t["key_zero"], t["key_scale"],
                                      t["key_lut"], t["inv_freq"], 1.0, bits, token_start=1,
                                      out=out, version=3, **check)
            label = " ".join(["v3", variant_label(check)]).strip()
            case[f"score_all_written_{label}"] = bool(torch.isfinite(out).all().item())
            case[f"score_rel_err_{label}"] = rel_err(out[..., 1:], expected[..., 1:])
        exact = reference.scores(q, reference.apply_rope(k, torch.arange(tokens, device=device),
                                                         t["inv_freq"], 1.0))
        case["codec_score_rel_err_vs_exact"] = rel_err(fast.key_scores(q, keys_fast), exact)
        case["codec_score_rel_err_vs_reference"] = rel_err(fast.key_scores(q, keys_slow),
                                                           slow.key_scores(q, keys_slow))
        values_fast, values_slow = fast.encode_values(v), slow.encode_values(v)
        case["value_code_mismatch_fraction"] = (
            reference.unpack_codes(values_fast.used()["codes"], bits, head_dim)
            != reference.unpack_codes(values_slow.used()["codes"], bits, head_dim)
        ).float().mean().item()
        out = fast.attend_values(p, values_slow)
        case["value_attend_rel_err"] = rel_err(out, slow.attend_values(p, values_slow))
        case["value_attend_rel_err_vs_exact"] = rel_err(out, reference.attend(p, v))
        grown = fast.new_keys(2, hkv, device=device, capacity=16)
        fast.append_keys(grown, k[:, :, :100])
        for i in range(100, 200):
            fast.append_keys(grown, k[:, :, i : i + 1])
        case["append_equals_encode"] = bool(torch.equal(
            fast.key_scores(q, grown), fast.key_scores(q, fast.encode_keys(k[:, :, :200]))))
        results[name] = case
        print(name, json.dumps(case), flush=True)
    return results


def kvquant_rows(tokens, k, v, q, p, device, roofline_gbps, timed) -> list[dict]:
    """KVQuant 2/3/4-bit score, 3-bit value attention and quantize rows for one context."""
    calibration = calibration_for(k.shape[-1], k.shape[1])
    rows = []
    for bits in BITS:
        rows += _rows_for_bits(codec_for(calibration, bits), tokens, k, v, q, p, device,
                               roofline_gbps, timed)
    return rows


def _rows_for_bits(codec, tokens, k, v, q, p, device, roofline_gbps, timed) -> list[dict]:
    bits, kv_heads = codec.bits, k.shape[1]
    scores_f32 = q.shape[1] * tokens * 4
    keys = codec.new_keys(1, kv_heads, device=device, capacity=tokens)
    codec.append_keys(keys, k)
    key_bytes = codec.nbytes(keys)
    rows = [timed(f"KVQuant-{bits} score (codec.key_scores)", lambda: codec.key_scores(q, keys),
                  key_bytes + scores_f32, roofline_gbps, bits=bits,
                  key_bytes_per_token_head=key_bytes / tokens / kv_heads)]
    used, t = keys.used(), codec.tables(device)
    out = torch.empty(1, q.shape[1], 1, tokens, device=device)
    kernel = functools.partial(
        kvquant_triton.key_scores, q, used["codes"], used["outlier_index"], used["outlier_delta"],
        t["key_zero"], t["key_scale"], t["key_lut"], t["inv_freq"], 1.0, bits, token_start=1,
        out=out)
    # other bit widths: version 2 and, where it fits, version 3 (the default for 2 bits since
    # run 9)
    others = [dict(version=3)] if kvquant_scores_v3_triton.v3_fits(q, q.shape[-1], bits) else []
    for variant in SCORE_VARIANTS if bits == 3 else SCORE_VARIANTS[:1] + others:
        rows.append(timed(f"KVQuant-{bits} score kernel {variant_label(variant)}",
                          functools.partial(kernel, **variant),
                          key_bytes + scores_f32, roofline_gbps, bits=bits))
    if bits == 3 and kvquant_scores_v3_triton.v3_fits(q, q.shape[-1], bits):
        # ablation (not a valid score): what the sparse outlier pass costs version 3
        no_slots = functools.partial(
            kvquant_triton.key_scores, q, used["codes"], used["outlier_index"][..., :0],
            used["outlier_delta"][..., :0], t["key_zero"], t["key_scale"], t["key_lut"],
            t["inv_freq"], 1.0, bits, token_start=1, out=out, version=3)
        rows.append(timed("ablation: KVQuant-3 score kernel v3 without the outlier pass",
                          no_slots, key_bytes + scores_f32, roofline_gbps, bits=bits))
    if bits != 3:
        return rows
    values = codec.new_values(1, kv_heads, device=device, capacity=tokens)
    codec.append_values(values, v)
    value_bytes = codec.nbytes(values)
    rows.append(timed("KVQuant-3 value attention (codec.attend_values)",
                      lambda: codec.attend_values(p, values), value_bytes + p.numel() * 4,
                      roofline_gbps, bits=bits,
                      value_bytes_per_token_head=value_bytes / tokens / kv_heads))
    rows.append(timed("KVQuant-3 quantize keys (pack kernel)", lambda: codec._quantize_keys(k),
                      k.numel() * 2 + key_bytes, roofline_gbps, bits=bits))
    rows.append(timed("KVQuant-3 quantize values (pack kernel)",
                      lambda: codec._quantize_values(v), v.numel() * 2 + value_bytes,
                      roofline_gbps, bits=bits))
    return rows


def kernel_stats() -> list[dict]:
    """Registers and spills of every compiled kvquant kernel (from Triton's per-device cache)."""
    stats = []
    for module, name in ((kvquant_triton, "_kvquant_key_scores_kernel"),
                         (kvquant_scores_v3_triton, "_kvquant_key_scores_v3_kernel"),
                         (kvquant_triton, "_kvquant_attend_values_kernel"),
                         (kvquant_triton, "_kvquant_pack_kernel")):
        function = getattr(module, name)
        for cache in function.device_caches.values():
            for compiled in cache[0].values():
                stats.append({"kernel": name, "num_warps": compiled.metadata.num_warps,
                              "n_regs": getattr(compiled, "n_regs", None),
                              "n_spills": getattr(compiled, "n_spills", None),
                              "shared_bytes": compiled.metadata.shared})
    return stats


def ablations(tokens: int, device, roofline_gbps: float) -> list[dict]:
    """Where the score and value kernels spend their time: each row removes one ingredient."""
    heads_q, heads_kv, head_dim, bits = base.QUERY_HEADS, base.KV_HEADS, base.HEAD_DIM, 3
    calibration = calibration_for(head_dim, heads_kv)
    codec = codec_for(calibration, bits)
    g = torch.Generator().manual_seed(tokens)
    k = keys_like(calibration, 0, 1, tokens, g, outlier_rate=0.005).to(device, torch.bfloat16)
    v = values_like(calibration, 1, tokens, g).to(device, torch.bfloat16)
    q = torch.randn(1, heads_q, 1, head_dim, generator=g).to(device, torch.bfloat16)
    p = torch.softmax(torch.randn(1, heads_q, 1, tokens, generator=g), -1).to(device)
    keys, values = codec.encode_keys(k), codec.encode_values(v)
    used, t = keys.used(), codec.tables(device)
    out = torch.empty(1, heads_q, 1, tokens, device=device)
    key_bytes = codec.nbytes(keys)

    def score(q=q, codes=used["codes"], index=used["outlier_index"], delta=used["outlier_delta"],
              inv_freq=t["inv_freq"], out=out):
        kvquant_triton.key_scores(q, codes, index, delta, t["key_zero"], t["key_scale"],
                                  t["key_lut"], inv_freq, 1.0, bits, token_start=1, out=out)

    head0 = {name: x[:, :1] for name, x in used.items()}
    rows = [
        base.timed("score kernel (default launch)", score, key_bytes, roofline_gbps),
        base.timed("score kernel, no sparse slots", functools.partial(
            score, index=used["outlier_index"][..., :0], delta=used["outlier_delta"][..., :0]),
            key_bytes, roofline_gbps),
        base.timed("score kernel, inv_freq 0 (cheap cos/sin)", functools.partial(
            score, inv_freq=torch.zeros_like(t["inv_freq"])), key_bytes, roofline_gbps),
        base.timed("score kernel, 1 KV head (4 query heads)", functools.partial(
            score, q=q[:, :4].contiguous(), codes=head0["codes"], index=head0["outlier_index"],
            delta=head0["outlier_delta"], out=out[:, :4].contiguous()),
            key_bytes // heads_kv, roofline_gbps),
    ]
    value_used, value_bytes = values.used(), codec.nbytes(values)

    def attend(p=p, index=value_used["outlier_index"], delta=value_used["outlier_delta"]):
        kvquant_triton.attend_values(p, value_used["codes"], value_used["scale"],
                                     value_used["zero"], index, delta, t["value_lut"], bits,
                                     token_start=1)

    rows += [
        base.timed("value kernel (p float32)", attend, value_bytes, roofline_gbps),
        base.timed("value kernel, p bfloat16", functools.partial(attend, p=p.to(torch.bfloat16)),
                   value_bytes, roofline_gbps),
        base.timed("value kernel, p bfloat16, no sparse slots", functools.partial(
            attend, p=p.to(torch.bfloat16), index=value_used["outlier_index"][..., :0],
            delta=value_used["outlier_delta"][..., :0]), value_bytes, roofline_gbps),
        base.timed("bf16 q·Kᵀ (torch.matmul)", lambda: torch.matmul(
            q.view(1, heads_kv, heads_q // heads_kv, head_dim), k.transpose(-1, -2)),
            k.numel() * 2, roofline_gbps),
    ]
    for row in rows:
        row["tokens"] = tokens
    return rows


def bits_per_number(device) -> dict:
    """Measured bits per K/V element at the benchmark shape (every stored byte)."""
    calibration = calibration_for(128, 8)
    g = torch.Generator().manual_seed(0)
    k = keys_like(calibration, 0, 1, 4096, g).to(device)
    v = values_like(calibration, 1, 4096, g).to(device)
    result = {}
    for bits in BITS:
        codec = codec_for(calibration, bits)
        total = codec.nbytes(codec.encode_keys(k)) + codec.nbytes(codec.encode_values(v))
        result[str(bits)] = 8 * total / (k.numel() + v.numel())
    return result


def bench_context(tokens: int, device, roofline_gbps: float) -> list[dict]:
    dtype = torch.float32 if base.SMOKE else torch.bfloat16
    torch.manual_seed(tokens)
    heads_q, heads_kv, head_dim = base.QUERY_HEADS, base.KV_HEADS, base.HEAD_DIM
    k = torch.randn(1, heads_kv, tokens, head_dim, device=device, dtype=dtype)
    v = torch.randn(1, heads_kv, tokens, head_dim, device=device, dtype=dtype)
    q = torch.randn(1, heads_q, 1, head_dim, device=device, dtype=dtype)
    p = torch.softmax(torch.randn(1, heads_q, 1, tokens, device=device), dim=-1)
    kv_bytes = k.numel() * 2
    q_rows = q.view(1, heads_kv, heads_q // heads_kv, head_dim)
    p_rows = p.to(dtype).view(1, heads_kv, heads_q // heads_kv, tokens)
    rows = [
        base.timed("bf16 q·Kᵀ (torch.matmul)", lambda: torch.matmul(q_rows, k.transpose(-1, -2)),
                   kv_bytes + heads_q * tokens * 2, roofline_gbps),
        base.timed("bf16 SDPA decode (whole attention)",
                   lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                   2 * kv_bytes, roofline_gbps),
        base.timed("bf16 p·V (torch.matmul)", lambda: torch.matmul(p_rows, v),
                   kv_bytes + p_rows.numel() * 2, roofline_gbps),
    ]
    # keys like a model's: per-channel offsets and scales, not unit Gaussians
    calibration = calibration_for(head_dim, heads_kv)
    k = (calibration.key_zero[0][None, :, None].to(device)
         + calibration.key_scale[0][None, :, None].to(device) * 0.45 * k.float()).to(dtype)
    rows += kvquant_rows(tokens, k, v, q, p, device, roofline_gbps, base.timed)
    for row in rows:
        row["tokens"] = tokens
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="8192,32768,131072,524288")
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter dry run")
    parser.add_argument("--default-variants", action="store_true",
                        help="time only the launcher defaults of each version (device time)")
    parser.add_argument("--correctness-cases", type=int, default=None,
                        help="check only the first N correctness cases (device time)")
    parser.add_argument("--ablate", action="store_true",
                        help="only the ablation rows and kernel register/spill counts")
    args = parser.parse_args()
    device = torch.device("cuda")
    if args.smoke:  # TRITON_INTERPRET=1 must be set in the environment
        device = torch.device("cpu")
        base.SMOKE = True
        base.QUERY_HEADS, base.KV_HEADS, base.HEAD_DIM = 8, 2, 64
        CORRECTNESS_CASES[:] = [(torch.float32, 64, 6, 3, 2, 300, 3)]
        SCORE_VARIANTS[:] = [dict(version=2, block_t=32, num_warps=4),
                             dict(version=2, block_t=16, words=False),
                             dict(version=2, block_t=16, prepared_queries=False)]
    started = time.time()
    import triton

    results = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "shape": {"query_heads": base.QUERY_HEADS, "kv_heads": base.KV_HEADS,
                  "head_dim": base.HEAD_DIM, "dtype": "bfloat16", "batch": 1, "query_tokens": 1},
        "kvquant_params": {"bits": list(BITS), "outliers": 0.01, "sink_tokens": 1},
    }
    if args.ablate:
        results["roofline"] = base.copy_roofline(device)
        results["ablations"] = [row for tokens in args.tokens.split(",")
                                for row in ablations(int(tokens), device,
                                                     results["roofline"]["GB_per_s"])]
        results["kernel_stats"] = [] if args.smoke else kernel_stats()
        print(json.dumps(results["kernel_stats"]))
        Path(args.out).write_text(json.dumps(results, indent=1))
        return
    if args.default_variants:
        SCORE_VARIANTS[:] = [dict(version=2, block_t=64, num_warps=4), dict(version=3)]
    if args.correctness_cases is not None:
        del CORRECTNESS_CASES[args.correctness_cases:]
    results["correctness"] = check_correctness(device)
    results["bits_per_number"] = bits_per_number(device)
    print("bits per number", results["bits_per_number"], flush=True)
    results["roofline"] = base.copy_roofline(device)
    roofline = results["roofline"]["GB_per_s"]
    results["timings"] = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        print(f"context {tokens}", flush=True)
        results["timings"].extend(bench_context(tokens, device, roofline))
        if not args.smoke:
            torch.cuda.empty_cache()
    ratios = {}
    for tokens in sorted({row["tokens"] for row in results["timings"]}):
        best = {row["op"]: min(row["ms"], row["graph_ms"] or math.inf)
                for row in results["timings"] if row["tokens"] == tokens}
        baseline = best["bf16 q·Kᵀ (torch.matmul)"]
        ratio = {"bf16_qk_ms": baseline, "sdpa_ms": best["bf16 SDPA decode (whole attention)"]}
        for bits in BITS:
            codec_ms = best[f"KVQuant-{bits} score (codec.key_scores)"]
            kernel_ms = min(ms for op, ms in best.items()
                            if op.startswith(f"KVQuant-{bits} score kernel"))
            ratio[f"kvquant{bits}_score_speedup"] = baseline / codec_ms
            ratio[f"kvquant{bits}_kernel_speedup"] = baseline / kernel_ms
        value_ms = best["KVQuant-3 value attention (codec.attend_values)"]
        ratio["kvquant3_value_speedup"] = best["bf16 p·V (torch.matmul)"] / value_ms
        ratios[str(tokens)] = ratio
    results["ratios"] = ratios
    long_contexts = [r for t, r in ratios.items() if int(t) >= 131072]
    results["targets"] = {"kvquant3_score_ge_2x_bf16_at_128K_plus": bool(long_contexts) and all(
        r["kvquant3_score_speedup"] >= 2 for r in long_contexts)}
    results["wall_seconds"] = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    for tokens, ratio in ratios.items():
        print(tokens, {key: round(value, 4) for key, value in ratio.items()})
    print(json.dumps(results["targets"]))


if __name__ == "__main__":
    main()

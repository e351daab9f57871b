"""Screen KVQuant configurations on SmolLM2-135M by fake quantization (CPU; ~1 minute per row).

    OMP_NUM_THREADS=1 python bench/eval/kvquant_screen.py [--json OUT] [NAME ...]  # default: all

Every row runs the kvquant codec itself (its reference path: the packed format and the numbers the
Triton kernels compute) on the keys and values of full forward passes over wiki.test.raw, as
bench/eval/kvquant_diagnostics.py does, and prints the bits per number the report counts at 1024
tokens (the codecs' own nbytes), and, on the report's window (the first 1024 tokens), ppl, its
change against the fp16-stored cache and the mean KL divergence per token from it; then the mean
KL over the next HELD_OUT 1024-token windows ("held-out KL"). One window's KL moves by 5-10% when
a few codes flip (its ppl by a few percent), so configurations are picked by the held-out mean and
only then read on the report's window (docs/eval.md, "KVQuant against KIVI-4").

A row is (name, artifact options, codec parameters, extras). Artifacts are refitted from the
diagnostics' cached calibration activations (wikitext-2 valid, 4096 tokens, 512-token windows:
bench/eval/fidelity.py's setting) by `calibration_from_activations` with the options given
(`outliers` = the key range fraction, `fisher_weighting`, `even_key_bits`, `even_value_bits`;
defaults: `kvpack calibrate`'s). They borrow the diagnostics artifact's per-layer sensitivities
(bench/eval/fidelity.py's "1%" artifact; option `sensitivities`: another artifact's file in the
same folder), so `avg_bits` rows allocate by its measurements. Codec
parameters are `KVQuantCodec`'s; `qnorm` may also be "keys" (Q-Norm on key codebooks only).
Extras, for what the stored format cannot do today (measured here only):
    hot     {"layers": [...], "outliers": f, "slots": n}: those layers' keys use ranges at fraction
            f with n slots (per-layer key ranges and slot counts: codec/artifact work, no kernel
            change)
    tail    keys of the unfinished 32-token group are exact at every query (KIVI's fp16 group
            tail; for KVQuant a new fp16 field in the cache): attention is recomputed with exact
            scores for those keys
    fake    "kivi": KIVI's scheme instead of the codec (keys per channel over 32-token groups,
            pre-RoPE here; values per token over 32 channels; fp16 scale and minimum)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kvquant_diagnostics as diag  # noqa: E402

HELD_OUT = 4
# the k-means 4-bit key codebook (the default until 2026-12-07), allocating by the sensitivities
# measured with it: `kvpack calibrate` with fidelity.py's "1%" flags and --even-key-bits none
OLD = {"even_key_bits": (), "sensitivities": "smollm2-wt2valid-4096-sens512.safetensors"}
R2 = {"outliers": 0.02}  # key ranges at the 1% / 99% quantiles
K2V1 = {"bits": 4, "value_outliers": 0.01}  # with R2: two key slots (its default), one value slot
HOT = {"layers": [18, 20, 23], "outliers": 0.08, "slots": 8}

ROWS: list[tuple[str, dict, dict, dict]] = [
    ("KIVI-4-like", {}, {"bits": 4}, {"fake": "kivi"}),
    ("KIVI-4-like, exact group tail", {}, {"bits": 4}, {"fake": "kivi", "tail": 32}),
    # controls for the tail rows: the same recomputed attention with no tail (tail 1: only the
    # sink token exact), since the op order alone moves one window's KL by several percent
    ("KIVI-4-like, tail path, no tail", {}, {"bits": 4}, {"fake": "kivi", "tail": 1}),
    ("4b even K, tail path, no tail", {}, {"bits": 4}, {"tail": 1}),
    ("4b even K, K 2% 2 slots, 8 sinks, tail path, no tail", R2, {**K2V1, "sink_tokens": 8},
     {"tail": 1}),
    # 4-bit codes (<= 5.0 bits: at most 3 slots in all with one sink)
    ("4b k-means K (old default)", OLD, {"bits": 4}, {}),
    ("4b even K (new default)", {}, {"bits": 4}, {}),
    ("4b even K, even V", {"even_value_bits": (4,)}, {"bits": 4}, {}),
    ("4b even K, Q-Norm", {}, {"bits": 4, "qnorm": True}, {}),
    ("4b even K, V 2 slots", {}, {"bits": 4, "value_outliers": 0.02}, {}),
    ("4b even K, K 2 slots", {}, {"bits": 4, "key_outliers": 0.02}, {}),
    ("4b even K, K 2% 2 slots", R2, K2V1, {}),
    ("4b even K, K 3% 3 slots, V 0", {"outliers": 0.03},
     {"bits": 4, "key_outliers": 0.04, "value_outliers": 0}, {}),
    ("4b even K, 4 sinks", {}, {"bits": 4, "sink_tokens": 4}, {}),
    ("4b even K, K 2% 2 slots, 4 sinks", R2, {**K2V1, "sink_tokens": 4}, {}),
    ("4b even K, K 2% 2 slots, 8 sinks", R2, {**K2V1, "sink_tokens": 8}, {}),
    ("4b even K, K 2% 2 slots, hot layers", R2, K2V1, {"hot": HOT}),
    ("4b even K, K 2% 2 slots, hot layers, 4 sinks", R2, {**K2V1, "sink_tokens": 4},
     {"hot": HOT}),
    ("4b even K, exact group tail", {}, {"bits": 4}, {"tail": 32}),
    ("4b even K, K 2% 2 slots, 8 sinks, exact group tail", R2, {**K2V1, "sink_tokens": 8},
     {"tail": 32}),
    # ~4.3 bits
    ("mixed 3.66 k-means K (old default)", OLD, {"avg_bits": 3.66}, {}),
    ("mixed 3.66", {}, {"avg_bits": 3.66}, {}),
    ("mixed 3.66, 4 sinks", {}, {"avg_bits": 3.66, "sink_tokens": 4}, {}),
    ("mixed 3.5, K 2% 2 slots", R2, {"avg_bits": 3.5, "value_outliers": 0.01}, {}),
    ("K4 + V3", {}, {"key_bits": 4, "value_bits": 3}, {}),
    ("K4 + V4 0 slots", {}, {"bits": 4, "value_outliers": 0}, {}),
    # the report's other mixed rows, before and after the 4-bit key codebook change
    ("mixed 3.0 k-means K (old default)", OLD, {"avg_bits": 3.0}, {}),
    ("mixed 3.0", {}, {"avg_bits": 3.0}, {}),
    ("mixed 2.66 k-means K (old default)", OLD, {"avg_bits": 2.66}, {}),
    ("mixed 2.66", {}, {"avg_bits": 2.66}, {}),
]

_artifacts: dict[str, object] = {}


def artifact(options: dict):
    from kvpack.calibrate.calibrate import (
        EVEN_KEY_BITS,
        EVEN_VALUE_BITS,
        calibration_from_activations,
    )

    key = json.dumps(options, sort_keys=True)
    if key not in _artifacts:
        base = diag._calibration()
        made = calibration_from_activations(
            diag._state["acts"], diag._state["shape"], bits_list=[2, 3, 4],
            outliers=options.get("outliers", 0.01), sink_tokens=1,
            text_sha256=base.metadata.get("text_sha256", ""), num_tokens=4096,
            sequence_length=512, progress=False,
            fisher_weighting=options.get("fisher_weighting", "keys"),
            even_key_bits=tuple(options.get("even_key_bits", EVEN_KEY_BITS)),
            even_value_bits=tuple(options.get("even_value_bits", EVEN_VALUE_BITS)),
        )
        if "sensitivities" in options:
            from kvpack.kernels.kvquant_calibration import KVQuantCalibration

            base = KVQuantCalibration.load(Path(base.source).parent / options["sensitivities"])
        made.key_sensitivity, made.value_sensitivity = base.key_sensitivity, \
            base.value_sensitivity
        _artifacts[key] = made
    return _artifacts[key]


def codecs_for(calibration, params: dict):
    from kvpack.kernels.kvquant import KVQuantCodec

    params = dict(params)
    qnorm = params.pop("qnorm", None)
    if qnorm == "keys":  # Q-Norm on key codebooks only: the value constants -> identity
        calibration = copy.copy(calibration)
        calibration.value_qnorm = {b: torch.tensor([[1.0, 0.0]]).expand(t.shape).clone()
                                   for b, t in calibration.value_qnorm.items()}
        qnorm = True
    base = KVQuantCodec(head_dim=calibration.head_dim, calibration=calibration, use_triton=False,
                        qnorm=qnorm, **params)
    return [base.for_layer(layer) for layer in range(calibration.num_layers)]


def bits_per_number(key_codecs, value_codecs, tokens: int = 1024) -> float:
    """What the report counts (every stored byte) at `tokens` tokens, from the codecs' nbytes."""
    total = 0
    for key_codec, value_codec in zip(key_codecs, value_codecs, strict=True):
        x = torch.zeros(1, key_codec.calibration.num_kv_heads, tokens, key_codec.head_dim)
        total += key_codec.nbytes(key_codec.encode_keys(x))
        total += value_codec.nbytes(value_codec.encode_values(x))
    heads, dim = key_codecs[0].calibration.num_kv_heads, key_codecs[0].head_dim
    return 8 * total / (2 * len(key_codecs) * heads * dim * tokens)


def windows() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, fp16-stored reference log-probs): the report's window, then HELD_OUT more."""
    if "windows" not in diag._state:
        from kvpack.calibrate.cli import token_windows

        text = diag.TEXT.read_text(encoding="utf-8")
        tokens = token_windows(diag._state["loaded"].tokenizer, text, 1024 * (1 + HELD_OUT), 1024)
        diag._state["windows"] = [(row, diag._reference_log_probs(row)) for row in tokens]
    return diag._state["windows"]


def measure(key_fn=None, value_fn=None) -> tuple[float, float, float]:
    """(ppl on the report's window, its KL, mean KL of the held-out windows), KL in 1e-3 nats."""
    results = []
    for tokens, reference in windows():
        diag._state["reference"] = reference
        results.append(diag.perplexity(key_fn=key_fn, value_fn=value_fn, tokens=tokens, kl=True))
    diag._state.pop("reference", None)
    held_out = sum(kl for _, kl in results[1:]) / max(len(results) - 1, 1)
    return results[0][0], results[0][1] * 1e3, held_out * 1e3


def codec_fn(codecs, kind: str):
    def through(layer, x):
        codec = codecs[layer]
        # a placeholder first token takes the codec's first sink slot (the real sink stays exact)
        padded = torch.cat((torch.zeros_like(x[:, :1]), x), 1)[None]
        if kind == "keys":
            return codec.dequantize_keys(codec.encode_keys(padded))[0, :, 1:]
        return codec.dequantize_values(codec.encode_values(padded))[0, :, 1:]

    return through


def with_exact_tail(key_fn, group: int):
    """(key_fn, restore) for `measure`: the returned key_fn leaves the keys exact and stashes
    key_fn's quantized ones; every layer's attention then scores the quantized keys, except the
    sink token and those of the query's unfinished `group`-token group (tokens >= group *
    floor((i + 1) / group) at query i), which it scores exactly. Call restore() afterwards."""
    from kvpack.kernels import kvquant_reference as reference
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import repeat_kv

    model, shape = diag._state["model"], diag._state["shape"]
    quantized: dict[int, torch.Tensor] = {}

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        tokens = key.shape[2]
        rotated = reference.apply_rope(quantized[module.layer_idx], torch.arange(tokens),
                                       shape.inv_freq, shape.attention_scaling).to(key.dtype)
        groups = module.num_key_value_groups
        exact = query @ repeat_kv(key, groups).transpose(2, 3)
        approx = query @ repeat_kv(rotated, groups).transpose(2, 3)
        i, j = torch.arange(tokens)[:, None], torch.arange(tokens)[None, :]
        use_exact = (j >= (i + 1) // group * group) | (j == 0)
        scores = torch.where(use_exact, exact, approx) * scaling
        probs = torch.softmax(scores.masked_fill(j > i, float("-inf")), -1, dtype=torch.float32)
        out = probs.to(query.dtype) @ repeat_kv(value, groups)
        return out.transpose(1, 2).contiguous(), probs

    def stash(layer, k):  # k: [H, T - 1, D], the sink token left out
        quantized[layer] = torch.cat((torch.zeros_like(k[:, :1]), key_fn(layer, k)), 1)[None]
        return k

    AttentionInterface.register("kvq_exact_tail", attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation("kvq_exact_tail")
    return stash, lambda: model.set_attn_implementation(previous)


def screen(name: str, options: dict, params: dict, extras: dict, base_ppl: float) -> dict:
    if extras.get("fake") == "kivi":
        key_fn, value_fn = diag._min_max(params["bits"], 1, 32), diag._min_max(params["bits"], -1,
                                                                              32)
        bits = params["bits"] + 2 * 16 / 32  # fp16 scale + minimum per 32 numbers
    else:
        key_codecs = value_codecs = codecs_for(artifact(options), params)
        hot = extras.get("hot")
        if hot:
            hot_codecs = codecs_for(artifact({**options, "outliers": hot["outliers"]}),
                                    {**params, "key_outliers": (hot["slots"] - 0.5) / 64})
            key_codecs = [hot_codecs[i] if i in hot["layers"] else codec
                          for i, codec in enumerate(value_codecs)]
        key_fn, value_fn = codec_fn(key_codecs, "keys"), codec_fn(value_codecs, "values")
        bits = bits_per_number(key_codecs, value_codecs)
    restore = None
    if extras.get("tail"):
        key_fn, restore = with_exact_tail(key_fn, extras["tail"])
    try:
        ppl, divergence, held_out = measure(key_fn, value_fn)
    finally:
        if restore is not None:
            restore()
    row = {"name": name, "artifact": options, "params": params, "extras": extras, "bits": bits,
           "ppl": ppl, "change_percent": 100 * (ppl / base_ppl - 1), "kl_1e3": divergence,
           "held_out_kl_1e3": held_out}
    print(f"{name:<52} {bits:6.3f} b  ppl {ppl:8.4f} {row['change_percent']:+6.2f}%  "
          f"KL {divergence:6.2f}  held-out KL {held_out:6.2f} (1e-3)", flush=True)
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    diag.setup()
    base_ppl = diag.perplexity()
    print(f"fp16-stored cache: ppl {base_ppl:.4f} (report window)", flush=True)
    windows()  # the references, with the model's own attention
    rows = [row for row in ROWS if not args.names or row[0] in args.names]
    results = [screen(*row, base_ppl) for row in rows]
    if args.json:
        args.json.write_text(json.dumps({"base_ppl": base_ppl, "held_out_windows": HELD_OUT,
                                         "rows": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

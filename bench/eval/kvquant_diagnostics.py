"""KVQuant fidelity diagnostics on SmolLM2-135M with fake quantization (CPU, minutes).

    OMP_NUM_THREADS=1 python bench/eval/kvquant_diagnostics.py [values] [keys] [codec JSON ...]

    values   4-bit values alone: the codec's per-token codebook fitted with / without Fisher
             weights, an evenly spaced one, and per-token int4 min-max (HF quanto's scheme)
    keys     4-bit keys alone: calibrated codebook vs an evenly spaced grid vs online per-channel
             groups of 32 / 128 tokens (KIVI's scheme, pre-RoPE)
    codec    the kvquant codec itself with the given parameters, e.g. '{"avg_bits": 2.66}'
             (calibration: bench/eval/fidelity.py's artifact; KVQ_DIAG_CALIBRATION overrides)

Each line prints ppl, its change against the fp16-stored cache, and the mean KL divergence per
token from it: on 1023 tokens, ppl moves by several percent between quantizers whose KL differs by
a few percent, so the KL is the measure to compare quantizers by.

Keys (pre-RoPE k_proj outputs) and values (v_proj outputs) are replaced by their quantized-then-
dequantized version inside one full forward pass over the first 1024 tokens of wiki.test.raw; the
first token (the attention sink) stays exact. With a cache whose every token goes through the codec
(window 0), this is what `kvpack eval ppl` measures, up to fp16 storage of the full-precision parts.
Calibration activations and Fisher information (wikitext-2 valid, 4096 tokens in 512-token windows,
as bench/eval/fidelity.py) are collected once and cached under /tmp.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("KVPACK_SHARED_DATA", REPO.parent / "shared" / "data"))
TEXT = SHARED / "text" / "wikitext-2-raw" / "wiki.test.raw"
CALIBRATION_TEXT = SHARED / "text" / "wikitext-2" / "valid.txt"
CACHE = Path(os.environ.get("KVQ_DIAG_CACHE", "/tmp/kvq_diag"))

_state: dict = {}


def setup(calibration_tokens: int = 4096, sequence_length: int = 512):
    from kvpack.calibrate.calibrate import model_activations, model_shape
    from kvpack.calibrate.cli import token_windows
    from kvpack.inference.loader import load_model

    from kvpack.models import fetch_smollm2

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    loaded = load_model(str(fetch_smollm2()))
    model = loaded.model.eval()
    tokens = token_windows(loaded.tokenizer, TEXT.read_text(encoding="utf-8"), 1024, 1024)[0]
    shape = model_shape(model, loaded.model_id)
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"acts-{calibration_tokens}-{sequence_length}.pt"
    if path.exists():
        from kvpack.calibrate.fisher import LayerActivations

        acts = [LayerActivations(**d) for d in torch.load(path)]
    else:
        text = CALIBRATION_TEXT.read_text(encoding="utf-8")
        windows = token_windows(loaded.tokenizer, text, calibration_tokens, sequence_length)
        acts = model_activations(model, shape, windows, sink_tokens=1, progress=True)
        torch.save([vars(a) for a in acts], path)
    _state.update(loaded=loaded, model=model, tokens=tokens, shape=shape, acts=acts)
    return _state


def perplexity(key_fn=None, value_fn=None, tokens=None, kl: bool = False):
    """ppl of the test tokens with k/v of layer i replaced by key_fn(i, k) / value_fn(i, v).
    k, v are [H, T, D] float32 (T without the sink token, which stays exact). With `kl`, returns
    (ppl, mean KL(fp16 || quantized) per token in nats): a smoother measure of the damage."""
    model, shape = _state["model"], _state["shape"]
    tokens = _state["tokens"] if tokens is None else tokens
    handles = []
    heads, dim = shape.num_kv_heads, shape.head_dim

    def hook_for(layer, fn):
        def hook(_module, _inputs, output):
            x = output[0].float().view(-1, heads, dim).transpose(0, 1)  # [H, T, D]
            x = x.half().float()  # the cache stores fp16
            out = x.clone()
            if fn is not None:
                out[:, 1:] = fn(layer, x[:, 1:])
            return out.transpose(0, 1).reshape(1, -1, heads * dim).to(output.dtype)
        return hook

    for layer, block in enumerate(model.model.layers):
        attn = block.self_attn
        handles.append(attn.k_proj.register_forward_hook(hook_for(layer, key_fn)))
        handles.append(attn.v_proj.register_forward_hook(hook_for(layer, value_fn)))
    try:
        with torch.no_grad():
            logits = model(input_ids=tokens[None]).logits[0, :-1].double()
        log_probs = torch.log_softmax(logits, -1)
        nll = -log_probs.gather(1, tokens[1:, None]).mean().item()
    finally:
        for handle in handles:
            handle.remove()
    if not kl:
        return math.exp(nll)
    if key_fn is None and value_fn is None:
        return math.exp(nll), 0.0
    reference = _state.get("reference")
    if reference is None or reference.shape != log_probs.shape:
        reference = _state["reference"] = _reference_log_probs(tokens)
    divergence = (reference.exp() * (reference - log_probs)).sum(-1).mean().item()
    return math.exp(nll), divergence


def _reference_log_probs(tokens: torch.Tensor) -> torch.Tensor:
    """log-probabilities with the keys and values only rounded to fp16 (the cache's storage)."""
    model = _state["model"]

    def to_half(_module, _inputs, output):
        return output.half().to(output.dtype)

    handles = []
    for block in model.model.layers:
        handles.append(block.self_attn.k_proj.register_forward_hook(to_half))
        handles.append(block.self_attn.v_proj.register_forward_hook(to_half))
    try:
        with torch.no_grad():
            logits = model(input_ids=tokens[None]).logits[0, :-1].double()
    finally:
        for handle in handles:
            handle.remove()
    return torch.log_softmax(logits, -1)


def _report(name: str, base: float, **fns) -> None:
    ppl, divergence = perplexity(kl=True, **fns)
    change = 100 * (ppl / base - 1)
    print(f"{name:<52} ppl {ppl:8.4f} {change:+7.2f}%  KL {divergence * 1e3:7.2f}e-3", flush=True)


def _value_codebook(acts, bits: int, fisher: bool) -> torch.Tensor:
    from kvpack.calibrate.kmeans import weighted_kmeans_1d
    from kvpack.kernels import kvquant_reference as reference

    index, zero, scale = reference.value_ranges(acts.values, 1)
    scale = scale.float()[..., None]
    normalized = (acts.values - zero.float()[..., None]) / scale
    inlier = torch.ones_like(normalized, dtype=torch.bool).scatter_(-1, index, False)
    weights = (acts.value_fisher if fisher else torch.ones_like(normalized)) * scale.square()
    return weighted_kmeans_1d(normalized[inlier], weights[inlier], 1 << bits)


def _values_with(luts, bits: int, slots: int = 1):
    from kvpack.kernels import kvquant_reference as reference

    def quantize(layer, v):
        lut = luts[layer].float().sort().values
        boundaries = (lut[1:] + lut[:-1]) / 2
        packed = reference.quantize_values(v[None], boundaries, lut, bits, slots)
        return reference.dequantize_values(*packed, lut, bits, v.shape[-1])[0]
    return quantize


def _min_max(bits: int, dim: int, group: int):
    """Asymmetric min-max int quantization over `group` consecutive elements along `dim`
    (-1: per token, groups of channels; 1: per channel, groups of tokens), fp16 scale and min."""
    def quantize(_layer, x):
        moved = x.movedim(dim, -1)
        pad = (-moved.shape[-1]) % group
        padded = torch.cat((moved, moved[..., -1:].expand(*moved.shape[:-1], pad)), -1)
        grouped = padded.reshape(*moved.shape[:-1], -1, group)
        low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
        step = ((high - low) / (2**bits - 1)).clamp_min(1e-6).half().float()
        low = low.half().float()
        codes = ((grouped - low) / step).round().clamp(0, 2**bits - 1)
        out = (codes * step + low).reshape(*moved.shape[:-1], -1)[..., : moved.shape[-1]]
        return out.movedim(-1, dim)
    return quantize


def _keys_with(calibration, luts, bits: int, slots: int = 1):
    from kvpack.kernels import kvquant_reference as reference

    def quantize(layer, k):
        zero, scale = calibration.key_zero[layer], calibration.key_scale[layer]
        lut = luts[layer].float().sort().values
        boundaries = (lut[1:] + lut[:-1]) / 2
        codes, index, delta = reference.quantize_keys(k[None], zero, scale, boundaries, lut, bits,
                                                      slots)
        return reference.dequantize_keys(codes, index, delta, zero, scale, lut, bits,
                                         k.shape[-1])[0]
    return quantize


def _calibration():
    from kvpack.kernels.kvquant_calibration import KVQuantCalibration

    default = (Path.home() / ".cache" / "kvpack" / "calibration"
               / "smollm2-wt2valid-4096-sens512-evenk4.safetensors")
    return KVQuantCalibration.load(os.environ.get("KVQ_DIAG_CALIBRATION", default))


def _codec_fns(calibration, params: dict):
    from kvpack.kernels.kvquant import KVQuantCodec

    base = KVQuantCodec(head_dim=calibration.head_dim, calibration=calibration, use_triton=False,
                        **params)
    codecs = [base.for_layer(layer) for layer in range(calibration.num_layers)]

    def through(layer, x, kind):
        codec = codecs[layer]
        # a placeholder first token takes the codec's sink slot (the real sink stays exact)
        padded = torch.cat((torch.zeros_like(x[:, :1]), x), 1)[None]
        if kind == "keys":
            return codec.dequantize_keys(codec.encode_keys(padded))[0, :, 1:]
        return codec.dequantize_values(codec.encode_values(padded))[0, :, 1:]

    return (lambda layer, k: through(layer, k, "keys"),
            lambda layer, v: through(layer, v, "values"), codecs)


def main(argv: list[str]) -> int:
    import json

    setup()
    base = perplexity()
    print(f"fp16-stored cache: ppl {base:.4f}", flush=True)
    acts = _state["acts"]
    for experiment in argv or ["values", "keys"]:
        if experiment == "values":
            for fisher in (True, False):
                books = [_value_codebook(a, 4, fisher) for a in acts]
                _report(f"V4 codebook {'F*s^2' if fisher else 's^2'}-weighted, 1 slot", base,
                        value_fn=_values_with(books, 4))
            _report("V4 evenly spaced codebook, 1 slot", base,
                    value_fn=_values_with([torch.linspace(-1, 1, 16)] * len(acts), 4))
            _report("V4 per-token int4 min-max (64 channels)", base, value_fn=_min_max(4, -1, 64))
        elif experiment == "keys":
            calibration = _calibration()
            _report("K4 calibrated codebook, 1 slot", base, key_fn=_keys_with(
                calibration, calibration.key_centroids[4], 4))
            _report("K4 evenly spaced grid in the calibrated ranges, 1 slot", base,
                    key_fn=_keys_with(calibration, [torch.linspace(-1, 1, 16)] * len(acts), 4))
            for group in (32, 128):
                _report(f"K4 per-channel int4, groups of {group} tokens (pre-RoPE)", base,
                        key_fn=_min_max(4, 1, group))
        else:
            params = json.loads(experiment)
            key_fn, value_fn, codecs = _codec_fns(_calibration(), params)
            _report(f"codec {experiment}", base, key_fn=key_fn, value_fn=value_fn)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

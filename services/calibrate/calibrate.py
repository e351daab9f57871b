"""KVQuant offline calibration: Fisher-weighted per-layer codebooks, key scales, Q-Norm constants.

For each layer (research/kvquant.md §1.2, §1.6):
- keys, per channel: thresholds are the (f/2, 1 - f/2) quantiles over calibration tokens (f = the
  outlier fraction; min/max when f = 0); zero = midpoint, scale = half-range; elements with
  |x_n| > 1 are outliers and stay out of the codebook fit;
- values, per token: the codec's own online rule (`kvquant_reference.value_ranges`);
- codebook: weighted 1-D k-means over all normalized inliers with weight F * s^2 (the paper's
  Eq. 7: an error e in normalized units is an error s*e in the activation, whose loss impact the
  Fisher F weighs; the reference code leaves out s^2). By default only the key codebooks weigh
  by F: a few thousand calibration tokens give a value Fisher so heavy-tailed (0.1% of the
  elements hold up to 70% of a layer's mass) that the value codebook fits a handful of points and
  loses to an evenly spaced one (SmolLM2: 4-bit values alone +2.4% ppl with F, +0.9% without;
  docs/eval.md); values weigh by s^2 only (`fisher_weighting`). Bit widths in `even_key_bits` /
  `even_value_bits` get the evenly spaced grid over [-1, 1] instead: by default 4-bit keys,
  whose k-means codebook loses to it on SmolLM2 (held-out KL of the 4-bit codec 20.3e-3 vs
  16.6e-3; docs/eval.md "KVQuant against KIVI-4");
- Q-Norm: lut = centroids * sigma1/sigma2 + (m1 - m2 * sigma1/sigma2), matching mean and std of
  the quantized inliers (m2, sigma2) to the data (m1, sigma1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from kvpack.calibrate.fisher import LayerActivations, collect_activations
from kvpack.calibrate.kmeans import weighted_kmeans_1d
from kvpack.kernels import kvquant_reference as reference
from kvpack.kernels.kvquant_calibration import KVQuantCalibration
from tqdm import tqdm

# RoPE variants whose frequencies change with the sequence length cannot be baked into a codec.
DYNAMIC_ROPE_TYPES = {"dynamic", "longrope"}


def channel_quantiles(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) = the fraction/2 and 1 - fraction/2 quantiles along dim 0 (linear
    interpolation, as numpy.percentile); fraction 0 gives min and max."""
    ordered = x.sort(dim=0).values
    last = x.shape[0] - 1

    def at(q: float) -> torch.Tensor:
        position = q * last
        below = int(position)
        above = min(below + 1, last)
        weight = position - below
        return ordered[below] * (1 - weight) + ordered[above] * weight

    return at(fraction / 2), at(1 - fraction / 2)


def qnorm_constants(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[scale, offset] that give the snapped points the data's mean and std."""
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    snapped = centroids[reference.nearest_codes(points, boundaries)]
    mean_data, std_data = points.mean(), points.std()
    mean_snapped, std_snapped = snapped.mean(), snapped.std()
    if float(std_snapped) <= 0:
        return torch.tensor([1.0, 0.0])
    scale = std_data / std_snapped
    return torch.stack((scale, mean_data - mean_snapped * scale)).float()


def evenly_spaced_codebook(bits: int) -> torch.Tensor:
    """2**bits points evenly spaced over the normalized range [-1, 1], both ends included (the
    grid of min-max integer quantization)."""
    return torch.linspace(-1.0, 1.0, 1 << bits)


def _codebooks(points, weights, bits_list, evenly_spaced=()):
    """Per bit width: (sorted centroids, Q-Norm constants). Widths in `evenly_spaced` get the
    evenly spaced grid instead of the weighted k-means fit."""
    centroids, norms = {}, {}
    for bits in bits_list:
        if bits in evenly_spaced:
            centroids[bits] = evenly_spaced_codebook(bits)
        else:
            centroids[bits] = weighted_kmeans_1d(points, weights, 1 << bits)
        norms[bits] = qnorm_constants(points.float(), centroids[bits])
    return centroids, norms


from .defaults import EVEN_KEY_BITS, EVEN_VALUE_BITS  # noqa: E402  (re-exported)

FISHER_WEIGHTING = ("keys", "both", "values", "none")


def calibrate_layer(
    acts: LayerActivations, *, bits_list: list[int], outliers: float,
    fisher_weighting: str = "keys", even_key_bits=EVEN_KEY_BITS, even_value_bits=EVEN_VALUE_BITS,
) -> dict[str, Any]:
    """One layer's constants from its activations and Fisher information. `fisher_weighting`
    says which codebooks weigh each element by its Fisher information (all weigh by s^2);
    `even_key_bits` / `even_value_bits`: the bit widths whose key / value codebook is evenly
    spaced in [-1, 1] instead of fitted by k-means."""
    if fisher_weighting not in FISHER_WEIGHTING:
        raise ValueError(f"fisher_weighting must be one of {FISHER_WEIGHTING}, "
                         f"got {fisher_weighting!r}")
    key_fisher = fisher_weighting in ("keys", "both")
    value_fisher = fisher_weighting in ("values", "both")
    lower, upper = channel_quantiles(acts.keys, outliers)
    key_zero = (upper + lower) / 2
    key_scale = ((upper - lower) / 2).clamp_min(1e-6)
    normalized = (acts.keys - key_zero) / key_scale
    inlier = normalized.abs() <= 1
    key_weights = (acts.key_fisher if key_fisher else torch.ones_like(acts.keys)) \
        * key_scale.square()
    key_centroids, key_qnorm = _codebooks(normalized[inlier], key_weights[inlier], bits_list,
                                          even_key_bits)

    num_slots = reference.outlier_slots(outliers, acts.values.shape[-1])
    index, zero, scale = reference.value_ranges(acts.values, num_slots)
    zero, scale = zero.float()[..., None], scale.float()[..., None]
    value_normalized = (acts.values - zero) / scale
    value_inlier = torch.ones_like(value_normalized, dtype=torch.bool).scatter_(-1, index, False)
    value_weights = (acts.value_fisher if value_fisher else torch.ones_like(acts.values)) \
        * scale.square()
    value_centroids, value_qnorm = _codebooks(
        value_normalized[value_inlier], value_weights[value_inlier], bits_list, even_value_bits
    )
    return {
        "key_zero": key_zero, "key_scale": key_scale,
        "key_centroids": key_centroids, "key_qnorm": key_qnorm,
        "value_centroids": value_centroids, "value_qnorm": value_qnorm,
    }


def rope_of(model) -> tuple[torch.Tensor, float, dict[str, Any]]:
    """The model's RoPE inverse frequencies (rope scaling applied by transformers), attention
    scaling, and rope parameters for the record."""
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", None))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in DYNAMIC_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} changes with the sequence length; "
                         "kvquant needs fixed RoPE frequencies")
    rotary = model.model.rotary_emb
    return rotary.inv_freq.detach().float().cpu(), float(rotary.attention_scaling), rope


@dataclass(frozen=True)
class ModelShape:
    """What a calibration records about its model besides the statistics."""

    model_id: str
    model_type: str | None
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    inv_freq: torch.Tensor
    attention_scaling: float
    rope: dict[str, Any]


def model_shape(model, model_id: str) -> ModelShape:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq, attention_scaling, rope = rope_of(model)
    if inv_freq.numel() != head_dim // 2:
        raise ValueError(f"partial rotary embeddings ({inv_freq.numel()} frequencies for "
                         f"head_dim {head_dim}) are not supported")
    return ModelShape(model_id, getattr(config, "model_type", None), config.num_attention_heads,
                      config.num_key_value_heads, head_dim, inv_freq, attention_scaling,
                      {key: value for key, value in rope.items() if _is_json(value)})


def model_activations(model, shape: ModelShape, sequences: torch.Tensor, *, sink_tokens: int,
                      progress: bool = True) -> list[LayerActivations]:
    if sequences.dim() != 2 or sequences.shape[1] <= sink_tokens:
        raise ValueError(
            f"sequences must be [S, L] with L > sink_tokens, got {tuple(sequences.shape)}"
        )
    return collect_activations(model, sequences, num_kv_heads=shape.num_kv_heads,
                               head_dim=shape.head_dim, sink_tokens=sink_tokens, progress=progress)


def calibration_from_activations(
    activations: list[LayerActivations], shape: ModelShape, *, bits_list: list[int],
    outliers: float, sink_tokens: int, text_sha256: str, num_tokens: int, sequence_length: int,
    progress: bool = True, fisher_weighting: str = "keys", even_key_bits=EVEN_KEY_BITS,
    even_value_bits=EVEN_VALUE_BITS,
) -> KVQuantCalibration:
    """Fit every layer's constants (one pass of Fisher collection serves several settings)."""
    for bits in (*bits_list, *even_key_bits, *even_value_bits):
        reference.check_bits(bits)
    if not 0.0 <= outliers < 0.5:
        raise ValueError(f"outliers must be a fraction in [0, 0.5), got {outliers}")
    layers = [
        calibrate_layer(acts, bits_list=bits_list, outliers=outliers,
                        fisher_weighting=fisher_weighting, even_key_bits=even_key_bits,
                        even_value_bits=even_value_bits)
        for acts in tqdm(activations, desc="calibrate: codebooks", unit="layer",
                         disable=not progress)
    ]
    metadata = {
        "model_id": shape.model_id,
        "model_type": shape.model_type,
        "num_layers": len(layers),
        "num_kv_heads": shape.num_kv_heads,
        "num_attention_heads": shape.num_attention_heads,
        "head_dim": shape.head_dim,
        "attention_scaling": shape.attention_scaling,
        "rope": shape.rope,
        "bits": list(bits_list),
        "outliers": outliers,
        "sink_tokens": sink_tokens,
        "text_sha256": text_sha256,
        "num_tokens": num_tokens,
        "sequence_length": sequence_length,
        "fisher_weighting": fisher_weighting,
        "even_key_bits": sorted(b for b in set(even_key_bits) if b in bits_list),
        "even_value_bits": sorted(b for b in set(even_value_bits) if b in bits_list),
    }

    def stack(name: str, bits: int | None = None) -> torch.Tensor:
        return torch.stack([layer[name] if bits is None else layer[name][bits] for layer in layers])

    return KVQuantCalibration(
        metadata=metadata,
        key_zero=stack("key_zero"),
        key_scale=stack("key_scale"),
        key_centroids={b: stack("key_centroids", b) for b in bits_list},
        value_centroids={b: stack("value_centroids", b) for b in bits_list},
        key_qnorm={b: stack("key_qnorm", b) for b in bits_list},
        value_qnorm={b: stack("value_qnorm", b) for b in bits_list},
        inv_freq=shape.inv_freq,
    )


def add_sensitivity(model, calibration: KVQuantCalibration, sequences: torch.Tensor, *,
                    progress: bool = True) -> KVQuantCalibration:
    """Measure and attach per-layer sensitivities (`kvpack.calibrate.sensitivity`)."""
    from kvpack.calibrate.sensitivity import measure_sensitivity

    keys, values = measure_sensitivity(model, calibration, sequences, progress=progress)
    calibration.key_sensitivity, calibration.value_sensitivity = keys, values
    calibration.metadata["sensitivity_tokens"] = int(sequences.numel())
    return calibration


def calibrate_model(
    model, sequences: torch.Tensor, *, model_id: str, bits_list: list[int], outliers: float,
    sink_tokens: int, text_sha256: str, progress: bool = True,
    sensitivity_sequences: torch.Tensor | None = None, fisher_weighting: str = "keys",
    even_key_bits=EVEN_KEY_BITS, even_value_bits=EVEN_VALUE_BITS,
) -> KVQuantCalibration:
    """Calibrate every layer of a HF Llama-family causal LM on token sequences [S, L]; with
    `sensitivity_sequences`, also measure per-layer sensitivities on them (for avg_bits)."""
    for bits in bits_list:  # fail before the expensive part
        reference.check_bits(bits)
    shape = model_shape(model, model_id)
    activations = model_activations(model, shape, sequences, sink_tokens=sink_tokens,
                                    progress=progress)
    calibration = calibration_from_activations(
        activations, shape, bits_list=bits_list, outliers=outliers, sink_tokens=sink_tokens,
        text_sha256=text_sha256, num_tokens=int(sequences.numel()),
        sequence_length=int(sequences.shape[1]), progress=progress,
        fisher_weighting=fisher_weighting, even_key_bits=even_key_bits,
        even_value_bits=even_value_bits,
    )
    if sensitivity_sequences is not None and sensitivity_sequences.numel():
        add_sensitivity(model, calibration, sensitivity_sequences, progress=progress)
    return calibration


def _is_json(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))

"""Random KVQuant calibrations and inputs for kernel and codec tests (no model needed)."""

from __future__ import annotations

import torch
from kvpack.kernels.kvquant_calibration import KVQuantCalibration


def default_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def random_calibration(
    *, num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 64, bits=(2, 3, 4),
    outliers: float = 0.01, inv_freq: torch.Tensor | None = None, attention_scaling: float = 1.0,
    generator: torch.Generator | None = None, uniform_codebooks: bool = False,
) -> KVQuantCalibration:
    """Plausible constants: sorted random codebooks inside [-1, 1] (or evenly spaced ones, for
    tests that judge quantization error), Q-Norm near identity."""
    g = generator or torch.Generator().manual_seed(0)
    shape = (num_layers, num_kv_heads, head_dim)

    def codebooks() -> dict[int, torch.Tensor]:
        if uniform_codebooks:
            return {b: torch.linspace(-1, 1, (1 << b) + 1)[:-1].add(1 / (1 << b))
                    .expand(num_layers, -1).clone() for b in bits}
        return {b: (torch.rand(num_layers, 1 << b, generator=g) * 2 - 1).sort(-1).values
                for b in bits}

    def qnorm() -> dict[int, torch.Tensor]:
        noise = torch.randn(num_layers, 2, generator=g) * 0.02
        return {b: torch.tensor([1.0, 0.0]) + noise for b in bits}

    metadata = {
        "model_id": "random", "num_layers": num_layers, "num_kv_heads": num_kv_heads,
        "head_dim": head_dim, "attention_scaling": attention_scaling, "rope": {},
        "bits": list(bits), "outliers": outliers, "sink_tokens": 1, "text_sha256": "",
        "num_tokens": 0,
    }
    return KVQuantCalibration(
        metadata=metadata,
        key_zero=torch.randn(shape, generator=g) * 0.3,
        key_scale=torch.rand(shape, generator=g) * 1.5 + 0.25,
        key_centroids=codebooks(), value_centroids=codebooks(),
        key_qnorm=qnorm(), value_qnorm=qnorm(),
        inv_freq=default_inv_freq(head_dim) if inv_freq is None else inv_freq.float(),
    )


def keys_like(calibration: KVQuantCalibration, layer: int, batch: int, num_tokens: int,
              generator: torch.Generator, outlier_rate: float = 0.02) -> torch.Tensor:
    """Pre-RoPE keys mostly inside the calibrated range, with a few large outliers."""
    zero, scale = calibration.key_zero[layer], calibration.key_scale[layer]
    shape = (batch, calibration.num_kv_heads, num_tokens, calibration.head_dim)
    normalized = torch.randn(shape, generator=generator) * 0.45
    spikes = torch.rand(shape, generator=generator) < outlier_rate
    spike_size = 2 + 3 * torch.rand(shape, generator=generator)
    normalized = torch.where(spikes, normalized.sign() * spike_size, normalized)
    return zero[None, :, None, :] + scale[None, :, None, :] * normalized


def values_like(calibration: KVQuantCalibration, batch: int, num_tokens: int,
                generator: torch.Generator) -> torch.Tensor:
    shape = (batch, calibration.num_kv_heads, num_tokens, calibration.head_dim)
    v = torch.randn(shape, generator=generator)
    spikes = torch.rand(shape, generator=generator) < 0.01
    return torch.where(spikes, v * 8, v)

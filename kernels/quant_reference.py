"""Asymmetric min-max quantization (KIVI's quantizer), the PyTorch reference shared by KIVI keys and
per-token values.

For a group of numbers with minimum `mn` and maximum `mx` and `levels = 2**bits - 1`:

    scale = max(mx - mn, EPS) / levels          stored in the input dtype (rounded)
    zero  = mn                                  stored in the input dtype (rounded)
    code  = clamp(floor((x - zero) / scale + 0.5), 0, levels)
    x^    = code * scale + zero

Codes are computed from the *stored* (rounded) scale and zero so the dequantized value is the
one the kernels reconstruct. EPS keeps a constant group finite (KIVI divides by zero there): every
code is 0 and x^ = zero = x exactly. All arithmetic is float32.
"""

from __future__ import annotations

import torch

EPS = 1e-6
SUPPORTED_BITS = (2, 4)


def check_bits(bits: int, name: str = "bits") -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {bits}")


def minmax_quantize(
    x: torch.Tensor, dim: int, bits: int, stat_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize groups that span dimension `dim` of x.

    Returns:
        codes (int32, shape of x), scale and zero (stat_dtype, x's shape without `dim`).
    """
    levels = (1 << bits) - 1
    x32 = x.float()
    mn = x32.amin(dim=dim, keepdim=True)
    mx = x32.amax(dim=dim, keepdim=True)
    scale = ((mx - mn).clamp_min(EPS) / levels).to(stat_dtype)
    zero = mn.to(stat_dtype)
    codes = torch.floor((x32 - zero.float()) / scale.float() + 0.5).clamp(0, levels).to(torch.int32)
    return codes, scale.squeeze(dim), zero.squeeze(dim)


def minmax_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """codes * scale + zero in float32 (scale and zero already broadcastable to codes)."""
    return codes.float() * scale.float() + zero.float()

"""PyTorch reference of per-token value quantization and attention on packed values.

Each token's D channels are split into groups of `group_size` consecutive channels; every group
gets its own min-max scale and zero (kernels/quant_reference.py), codes are packed along the
channels (kernels/bitpack.py). Shapes: codes [..., T, D * bits / 8] uint8, scale/zero
[..., T, D / group_size] in the input dtype.
"""

from __future__ import annotations

import torch

from .bitpack import pack_codes, unpack_codes
from .gqa import per_query_head, rows_per_kv_head
from .quant_reference import minmax_dequantize, minmax_quantize


def quantize_values(x: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """x [..., T, D] -> {"codes", "scale", "zero"}."""
    *lead, head_dim = x.shape
    grouped = x.reshape(*lead, head_dim // group_size, group_size)
    codes, scale, zero = minmax_quantize(grouped, dim=-1, bits=bits, stat_dtype=x.dtype)
    return {"codes": pack_codes(codes.reshape(*lead, head_dim), bits), "scale": scale, "zero": zero}


def dequantize_values(codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """Inverse of quantize_values up to quantization error: float32 [..., T, D]."""
    values = unpack_codes(codes, bits)
    *lead, head_dim = values.shape
    grouped = values.reshape(*lead, head_dim // group_size, group_size)
    return minmax_dequantize(grouped, scale[..., None], zero[..., None]).reshape(*lead, head_dim)


def attend_values(p, fields, num_tokens: int, bits: int, group_size: int) -> torch.Tensor:
    """p [B, H_q, T_q, num_tokens] @ dequantized values -> float32 [B, H_q, T_q, D]."""
    codes, scale, zero = (fields[name][:, :, :num_tokens] for name in ("codes", "scale", "zero"))
    values = dequantize_values(codes, scale, zero, bits, group_size)
    rows = rows_per_kv_head(p.float(), codes.shape[1])
    return per_query_head(torch.matmul(rows, values), p.shape[1], p.shape[2])

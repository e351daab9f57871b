"""PyTorch reference of KIVI keys: per-channel asymmetric min-max codes over groups of tokens.

Each group of `group_size` consecutive tokens gets, per channel, its own scale and zero
(kernels/quant_reference.py); codes are packed along the channels of each token
(kernels/bitpack.py). Shapes: codes [B, H, T, D * bits / 8] uint8, scale/zero
[B, H, T / group_size, D] in the input dtype.
"""

from __future__ import annotations

import torch

from .bitpack import pack_codes, unpack_codes
from .gqa import per_query_head, rows_per_kv_head
from .quant_reference import minmax_dequantize, minmax_quantize


def quantize_keys(x: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """x [B, H, T, D] with T a multiple of group_size -> {"codes", "scale", "zero"}."""
    batch, heads, num_tokens, head_dim = x.shape
    grouped = x.reshape(batch, heads, num_tokens // group_size, group_size, head_dim)
    codes, scale, zero = minmax_quantize(grouped, dim=-2, bits=bits, stat_dtype=x.dtype)
    return {"codes": pack_codes(codes.reshape(x.shape), bits), "scale": scale, "zero": zero}


def dequantize_keys(fields, num_tokens: int, bits: int, group_size: int) -> torch.Tensor:
    """float32 [B, H, num_tokens, D] reconstructed from the first num_tokens packed keys."""
    codes = unpack_codes(fields["codes"][:, :, :num_tokens], bits)
    batch, heads, _, head_dim = codes.shape
    num_groups = num_tokens // group_size
    grouped = codes.reshape(batch, heads, num_groups, group_size, head_dim)
    scale = fields["scale"][:, :, :num_groups, None, :]
    zero = fields["zero"][:, :, :num_groups, None, :]
    return minmax_dequantize(grouped, scale, zero).reshape(codes.shape)


def key_scores(q, fields, num_tokens: int, bits: int, group_size: int) -> torch.Tensor:
    """q [B, H_q, T_q, D] against dequantized keys -> float32 [B, H_q, T_q, num_tokens]."""
    keys = dequantize_keys(fields, num_tokens, bits, group_size)
    rows = rows_per_kv_head(q.float(), keys.shape[1])
    return per_query_head(torch.matmul(rows, keys.transpose(-1, -2)), q.shape[1], q.shape[2])

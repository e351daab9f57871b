"""KVQuant in plain PyTorch: the executable spec that the Triton kernels in `kvquant_triton.py`
(pack, key scores version 2, values) and `kvquant_scores_v3_triton.py` (key scores version 3) are
tested against, and the CPU path of the `kvquant` codec.

Quantization (research/kvquant.md §1.2-1.5):
- keys, per channel and pre-RoPE: x_n = (k - zero_c) / scale_c with calibrated per-channel zero and
  scale; code = nearest entry of the layer's sorted codebook; dense
  k^ = lut[code] * scale_c + zero_c.
  Elements with |x_n| > 1 are outliers; the `num_slots` largest per vector are stored sparsely as
  (channel index, fp16 k - k^) so that k^ + delta recovers them.
- values, per token (one vector = one token of one KV head): the `num_slots` elements farthest from
  the vector's mean are outliers; zero/scale (fp16) come from the min/max of the other elements.
- `lut` is the dequantization table (codebook after Q-Norm), `boundaries` the midpoints of the raw
  sorted codebook: encoding snaps to the raw centroids, decoding reads the corrected table.

Packed row layout (one token of one KV head, D channels, b bits per code, exactly D*b/8 bytes):
(each plane in the shared little-endian layout of `bitpack.py`)
- b = 2: D/4 bytes, channel c in byte c // 4 at bit 2 * (c % 4);
- b = 4: D/2 bytes, channel c in byte c // 2 at bit 4 * (c % 2);
- b = 3: a 2-bit plane laid out as b = 2 (D/4 bytes), then a 1-bit plane (D/8 bytes, channel c in
  byte c // 8 at bit c % 8); code = low | high << 2. Two planes keep every code inside one
  byte, so a kernel reads any channel with one or two byte loads (or whole int32 words) and no
  straddling, and 3 bits cost exactly 3 bits.
"""

from __future__ import annotations

import math

import torch

from . import bitpack

SUPPORTED_BITS = (2, 3, 4)
# Smallest per-token value scale: a constant vector must not divide by zero (KIVI's defect).
MIN_VALUE_SCALE = 1e-4


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def row_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one packed row (one token of one KV head)."""
    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8 for kvquant, got {head_dim}")
    return head_dim * bits // 8


def _planes(bits: int) -> tuple[int, ...]:
    """Bit widths of the planes a code is split into, low bits first."""
    check_bits(bits)
    return (2, 1) if bits == 3 else (bits,)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: [..., D] integers in [0, 2**bits) -> uint8 [..., D * bits / 8]."""
    row_bytes(codes.shape[-1], bits)
    codes = codes.to(torch.int32)
    planes, low_bit = [], 0
    for plane_bits in _planes(bits):
        planes.append(bitpack.pack_codes((codes >> low_bit) & ((1 << plane_bits) - 1), plane_bits))
        low_bit += plane_bits
    return torch.cat(planes, dim=-1)


def unpack_codes(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """uint8 [..., D * bits / 8] -> int64 codes [..., D]."""
    codes = torch.zeros(*packed.shape[:-1], head_dim, dtype=torch.int64, device=packed.device)
    offset, low_bit = 0, 0
    for plane_bits in _planes(bits):
        num_bytes = bitpack.packed_bytes(head_dim, plane_bits)
        plane = bitpack.unpack_codes(packed[..., offset : offset + num_bytes], plane_bits)
        codes |= plane.to(torch.int64) << low_bit
        offset += num_bytes
        low_bit += plane_bits
    return codes


def nearest_codes(normalized: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Index of the nearest sorted centroid, given the midpoints between neighbours."""
    return (normalized[..., None] > boundaries).sum(-1)


def select_top(score: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `num_slots` largest entries of the last dim, one at a time (first index wins ties, as
    Triton's argmax). Returns (indices, scores) of shape [..., num_slots]."""
    score = score.clone()
    indices, picked = [], []
    for _ in range(num_slots):
        index = score.argmax(-1, keepdim=True)
        indices.append(index)
        picked.append(score.gather(-1, index))
        score.scatter_(-1, index, -1.0)
    if not indices:
        empty = score.new_zeros(*score.shape[:-1], 0)
        return empty.long(), empty
    return torch.cat(indices, -1), torch.cat(picked, -1)


def quantize_keys(
    k: torch.Tensor,
    zero: torch.Tensor,
    scale: torch.Tensor,
    boundaries: torch.Tensor,
    lut: torch.Tensor,
    bits: int,
    num_slots: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-RoPE keys -> (packed codes, outlier channel indices, outlier deltas).

    Args:
        k: [B, H, T, D] pre-RoPE keys.
        zero, scale: [H, D] calibrated per-channel zero point and scale.
        boundaries: [2**bits - 1] midpoints of the sorted codebook; lut: [2**bits] dequant table.
    Returns:
        codes uint8 [B, H, T, D*bits/8]; index int64 [B, H, T, num_slots]; delta fp16 (0 where a
        slot is unused: fewer than num_slots elements of that vector lie outside [-1, 1]).
    """
    x = k.float()
    zero, scale = zero.float()[:, None, :], scale.float()[:, None, :]
    normalized = (x - zero) / scale
    codes = nearest_codes(normalized, boundaries.float())
    dense = lut.float()[codes] * scale + zero
    magnitude = normalized.abs()
    index, picked = select_top(torch.where(magnitude > 1.0, magnitude, 0.0), num_slots)
    chosen = picked > 1.0
    delta = torch.where(chosen, (x - dense).gather(-1, index), 0.0)
    index = torch.where(chosen, index, 0)
    return pack_codes(codes, bits), index, delta.half()


def outlier_slots(outliers: float, head_dim: int) -> int:
    """Sparse slots per vector: the outlier fraction of head_dim rounded up (1% of 64 -> 1)."""
    return math.ceil(outliers * head_dim - 1e-9) if outliers > 0 else 0


def value_ranges(
    x: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token value outliers and dense range: x [..., D] float32 -> (index [..., num_slots],
    zero fp16 [...], scale fp16 [...]).

    The `num_slots` elements farthest from the vector's mean are outliers; zero/scale come from
    the min/max of the rest, so one extreme element does not stretch every other code.
    """
    index, _ = select_top((x - x.mean(-1, keepdim=True)).abs(), num_slots)
    is_outlier = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, index, True)
    high = torch.where(is_outlier, -torch.inf, x).amax(-1)
    low = torch.where(is_outlier, torch.inf, x).amin(-1)
    zero = ((high + low) / 2).half()
    scale = ((high - low) / 2).clamp_min(MIN_VALUE_SCALE).half()
    return index, zero, scale


def quantize_values(
    v: torch.Tensor, boundaries: torch.Tensor, lut: torch.Tensor, bits: int, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values, per token and online -> (codes, scale fp16, zero fp16, index, delta fp16)."""
    x = v.float()
    index, zero, scale = value_ranges(x, num_slots)
    zero_f, scale_f = zero.float()[..., None], scale.float()[..., None]
    codes = nearest_codes((x - zero_f) / scale_f, boundaries.float())
    dense = lut.float()[codes] * scale_f + zero_f
    delta = (x - dense).gather(-1, index).half()
    return pack_codes(codes, bits), scale, zero, index, delta


def add_outliers(dense: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """dense [..., D] + sparse (index, delta) [..., S]; unused slots carry delta 0."""
    return dense.scatter_add(-1, index.long(), delta.float())


def dequantize_keys(codes, index, delta, zero, scale, lut, bits, head_dim) -> torch.Tensor:
    """-> float32 pre-RoPE keys [B, H, T, D]."""
    dense = lut.float()[unpack_codes(codes, bits, head_dim)]
    dense = dense * scale.float()[:, None, :] + zero.float()[:, None, :]
    return add_outliers(dense, index, delta)


def dequantize_values(codes, scale, zero, index, delta, lut, bits, head_dim) -> torch.Tensor:
    """-> float32 values [B, H, T, D]."""
    dense = lut.float()[unpack_codes(codes, bits, head_dim)]
    dense = dense * scale.float()[..., None] + zero.float()[..., None]
    return add_outliers(dense, index, delta)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, D] in float32, as HF's LlamaRotaryEmbedding."""
    freqs = positions.float()[:, None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def apply_rope(x, positions, inv_freq, attention_scaling: float) -> torch.Tensor:
    """HF's rotate_half RoPE on x [B, H, T, D] at positions [T], in float32."""
    cos, sin = rope_cos_sin(positions, inv_freq, attention_scaling)
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def expand_kv_heads(x: torch.Tensor, num_query_heads: int) -> torch.Tensor:
    """[B, H_kv, T, D] -> [B, H_q, T, D]: query head h reads KV head h // (H_q / H_kv)."""
    return x.repeat_interleave(num_query_heads // x.shape[1], dim=1)


def scores(q: torch.Tensor, keys_rotated: torch.Tensor) -> torch.Tensor:
    """q [B, H_q, T_q, D] (post-RoPE) . keys [B, H_kv, T, D] (post-RoPE) -> [B, H_q, T_q, T]."""
    return q.float() @ expand_kv_heads(keys_rotated.float(), q.shape[1]).transpose(-1, -2)


def attend(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """p [B, H_q, T_q, T] . values [B, H_kv, T, D] -> [B, H_q, T_q, D]."""
    return p.float() @ expand_kv_heads(values.float(), p.shape[1])

"""Bit packing of small unsigned codes into bytes: the one layout every packed cache uses.

A vector of `n` codes of `bits` bits each (bits in 1, 2, 4, 8) packs into `n * bits / 8` bytes,
little-endian within each byte: with `per_byte = 8 // bits`, element `i` lives in

    byte  i // per_byte,  bits [bits * (i % per_byte), bits * (i % per_byte) + bits)

(the layout of QJL's and KIVI's reference code). Kernels read it two ways: a broadcast shift
`bytes[:, :, None] >> [0, bits, 2 bits, ...]` followed by a row-major reshape gives the codes in
natural order, and `(bytes >> (bits * j)) & mask` gives "plane" j, the elements j, j + per_byte,
j + 2 per_byte, ..., which a score kernel multiplies with a matching strided slice of the query.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 4, 8)


def packed_bytes(num_elements: int, bits: int) -> int:
    """Bytes one vector of `num_elements` codes of `bits` bits occupies."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if (num_elements * bits) % 8:
        raise ValueError(
            f"num_elements * bits must be a multiple of 8, got {num_elements} * {bits}"
        )
    return num_elements * bits // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last dimension.

    Args:
        codes: integer (or bool) tensor [..., n] with values in [0, 2**bits).
        bits: bits per code (1, 2, 4 or 8).

    Returns:
        uint8 tensor [..., n * bits / 8].
    """
    num_bytes = packed_bytes(codes.shape[-1], bits)
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], num_bytes, 8 // bits)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [..., num_bytes] -> int32 [..., num_bytes * 8 / bits]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int32)
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)

"""Bit packing layout (kernels/bitpack.py): hand-checked bytes and round trips."""

from __future__ import annotations

import pytest
import torch
from kvpack.kernels.bitpack import pack_codes, packed_bytes, unpack_codes


def test_layout_is_little_endian_within_each_byte():
    # 2-bit codes 1, 2, 3, 0 -> 0b00_11_10_01; then 3, 3, 3, 3 -> 0xFF
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]])
    assert pack_codes(codes, 2).tolist() == [[0b00111001, 0xFF]]
    # sign bits: element i of a byte is bit i
    bits = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]])
    assert pack_codes(bits, 1).tolist() == [[0b10000001, 0b00000010]]
    assert pack_codes(torch.tensor([[5, 12]]), 4).tolist() == [[0xC5]]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, packed_bytes(64, bits)) == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes.to(torch.int32))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(1, 8, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(1, 6, dtype=torch.int32), 1)

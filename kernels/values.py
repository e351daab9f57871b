"""Per-token value format shared by the kivi and qjl codecs: asymmetric 2/4-bit min-max codes over
groups of `group_size` channels of each token (KIVI's value quantizer, with an epsilon for constant
groups). Stored per token: D * bits / 8 code bytes plus a scale and a zero per channel group, in the
input dtype.
"""

from __future__ import annotations

import math

import torch

from . import values_reference, values_triton
from .cache import FieldSpec
from .decode_attention_triton import PER_TOKEN_VALUES, DecodeLayout
from .packed_codec import ValueFormat
from .quant_reference import check_bits


def default_channel_group(head_dim: int) -> int:
    """32 channels where head_dim allows (KIVI's default), else gcd(32, head_dim)."""
    return math.gcd(32, head_dim)


def check_channel_group(head_dim: int, group_size: int, name: str) -> None:
    if group_size <= 0 or group_size & (group_size - 1) or head_dim % group_size:
        raise ValueError(
            f"{name} must be a power of two dividing head_dim={head_dim}, got {group_size}"
        )


class PerTokenValues(ValueFormat):
    def __init__(self, head_dim: int, bits: int, group_size: int) -> None:
        check_bits(bits, "value_bits")
        check_channel_group(head_dim, group_size, "value_group_size")
        self.head_dim, self.bits, self.group_size = head_dim, bits, group_size
        self.decode_layout = DecodeLayout(PER_TOKEN_VALUES, bits, group_size)

    def params(self):
        return {"value_bits": self.bits, "value_group_size": self.group_size}

    def field_specs(self, dtype: torch.dtype) -> list[FieldSpec]:
        num_groups = self.head_dim // self.group_size
        return [
            FieldSpec("codes", (self.head_dim * self.bits // 8,), torch.uint8),
            FieldSpec("scale", (num_groups,), dtype),
            FieldSpec("zero", (num_groups,), dtype),
        ]

    def pack(self, x: torch.Tensor, use_triton: bool) -> dict[str, torch.Tensor]:
        impl = values_triton if use_triton else values_reference
        return impl.quantize_values(x, self.bits, self.group_size)

    def packed_attend(self, p, fields, num_tokens, use_triton) -> torch.Tensor:
        impl = values_triton if use_triton else values_reference
        return impl.attend_values(p, fields, num_tokens, self.bits, self.group_size)

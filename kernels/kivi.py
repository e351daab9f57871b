"""The `kivi` codec (KIVI, arXiv 2402.02750): 2/4-bit per-channel keys over groups of tokens,
2/4-bit per-token values over groups of channels, a full-precision window of recent tokens.

Bytes per token and KV head (D = head_dim, G = group_size, Gc = value_group_size, s = bytes of the
input dtype): keys D*bits/8 + 2*s*D/G, values D*bits/8 + 2*s*D/Gc.
"""

from __future__ import annotations

from typing import Any

import torch

from . import kivi_reference, kivi_triton
from .cache import FieldSpec
from .codec import register_codec
from .decode_attention_triton import KIVI_KEYS, DecodeLayout
from .packed_codec import KeyFormat, PackedKVCodec
from .quant_reference import check_bits
from .values import PerTokenValues, default_channel_group


def check_token_group(group_size: int) -> None:
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size}")


def check_window(window: int) -> None:
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")


class KiviKeys(KeyFormat):
    def __init__(self, head_dim: int, bits: int, group_size: int) -> None:
        check_bits(bits)
        check_token_group(group_size)
        self.head_dim, self.bits, self.group_size = head_dim, bits, group_size
        self.decode_layout = DecodeLayout(KIVI_KEYS, bits, group_size)

    def field_specs(self, dtype: torch.dtype) -> list[FieldSpec]:
        return [
            FieldSpec("codes", (self.head_dim * self.bits // 8,), torch.uint8),
            FieldSpec("scale", (self.head_dim,), dtype, tokens_per_row=self.group_size),
            FieldSpec("zero", (self.head_dim,), dtype, tokens_per_row=self.group_size),
        ]

    def pack(self, x: torch.Tensor, use_triton: bool) -> dict[str, torch.Tensor]:
        impl = kivi_triton if use_triton else kivi_reference
        return impl.quantize_keys(x, self.bits, self.group_size)

    def packed_scores(self, q, fields, num_tokens, out, use_triton) -> None:
        if use_triton:
            kivi_triton.key_scores(q, fields, num_tokens, out, self.bits, self.group_size)
        else:
            out.copy_(kivi_reference.key_scores(q, fields, num_tokens, self.bits, self.group_size))


@register_codec
class KiviCodec(PackedKVCodec):
    """Args:
    head_dim: a multiple of 16.
    bits: 2 or 4, for keys and values.
    group_size: tokens per key quantization group (power of two >= 16); also the packing cadence.
    window: most recent tokens kept in full precision (KIVI's residual), default 0.
    value_group_size: channels per value quantization group (default 32, or 16 if head_dim
        needs it).
    """

    name = "kivi"

    def __init__(
        self,
        *,
        head_dim: int,
        bits: int = 2,
        group_size: int = 32,
        window: int = 0,
        value_group_size: int | None = None,
        use_triton: bool | None = None,
    ) -> None:
        super().__init__(head_dim=head_dim, use_triton=use_triton)
        if head_dim % 16:
            raise ValueError(f"head_dim must be a multiple of 16, got {head_dim}")
        check_window(window)
        self.key_format = KiviKeys(head_dim, bits, group_size)
        value_group = (
            default_channel_group(head_dim) if value_group_size is None else value_group_size
        )
        self.value_format = PerTokenValues(head_dim, bits, value_group)
        self.bits, self.group_size, self.window = bits, group_size, window

    def params(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "window": self.window,
            **self.value_format.params(),
        }

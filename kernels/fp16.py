"""The exact codec: keys and values stored in their input dtype, the correctness baseline.

"fp16" names the uncompressed method; a bfloat16 or float32 cache stays bfloat16 or float32.
Scores are q·kᵀ and outputs p·v computed by torch.matmul in the cache dtype (queries and
probabilities are cast to it), returned as float32.
"""

from __future__ import annotations

from typing import Any

import torch

from .cache import FieldSpec
from .codec import register_codec
from .gqa import per_query_head, rows_per_kv_head
from .packed_codec import KeyFormat, PackedKVCodec, ValueFormat


class ExactKeys(KeyFormat):
    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim

    def field_specs(self, dtype: torch.dtype) -> list[FieldSpec]:
        return [FieldSpec("data", (self.head_dim,), dtype)]

    def pack(self, x: torch.Tensor, use_triton: bool) -> dict[str, torch.Tensor]:
        return {"data": x}

    def packed_scores(self, q, fields, num_tokens, out, use_triton) -> None:
        data = fields["data"][:, :, :num_tokens]
        rows = rows_per_kv_head(q, data.shape[1]).to(data.dtype)
        scores = torch.matmul(rows, data.transpose(-1, -2)).float()
        out.copy_(per_query_head(scores, q.shape[1], q.shape[2]))


class ExactValues(ValueFormat):
    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim

    def field_specs(self, dtype: torch.dtype) -> list[FieldSpec]:
        return [FieldSpec("data", (self.head_dim,), dtype)]

    def pack(self, x: torch.Tensor, use_triton: bool) -> dict[str, torch.Tensor]:
        return {"data": x}

    def packed_attend(self, p, fields, num_tokens, use_triton) -> torch.Tensor:
        data = fields["data"][:, :, :num_tokens]
        rows = rows_per_kv_head(p, data.shape[1]).to(data.dtype)
        return per_query_head(torch.matmul(rows, data).float(), p.shape[1], p.shape[2])


@register_codec
class Fp16Codec(PackedKVCodec):
    """Uncompressed keys and values (no parameters)."""

    name = "fp16"

    def __init__(self, *, head_dim: int, use_triton: bool | None = None) -> None:
        super().__init__(head_dim=head_dim, use_triton=use_triton)
        self.key_format = ExactKeys(head_dim)
        self.value_format = ExactValues(head_dim)

    def params(self) -> dict[str, Any]:
        return {}

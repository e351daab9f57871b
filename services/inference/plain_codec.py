"""An uncompressed cache in the model's dtype, behind the codec interface.

Used for method "fp16" only while `kvpack.kernels` has no fp16 codec registered; it keeps keys and
values exactly as computed, which makes the engine's output equal to HF `generate`'s.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from kvpack.kernels.codec import KVCodec


class PlainCodec(KVCodec):
    name = "fp16"

    def params(self) -> dict[str, Any]:
        return {"plain": True}

    def encode_keys(self, k: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return k.contiguous()

    def append_keys(self, keys: torch.Tensor, k: torch.Tensor,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([keys, k], dim=2)

    def key_scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        group = q.shape[1] // keys.shape[1]
        return q @ keys.repeat_interleave(group, dim=1).transpose(-1, -2)

    def encode_values(self, v: torch.Tensor) -> torch.Tensor:
        return v.contiguous()

    def append_values(self, values: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([values, v], dim=2)

    def attend_values(self, p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        group = p.shape[1] // values.shape[1]
        return p @ values.repeat_interleave(group, dim=1)

    def nbytes(self, packed: torch.Tensor) -> int:
        return packed.numel() * packed.element_size()

    def to_bytes(self, packed: torch.Tensor) -> bytes:
        buffer = io.BytesIO()
        torch.save(packed.cpu(), buffer)
        return buffer.getvalue()

    def from_bytes(self, data: bytes, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.load(io.BytesIO(bytes(data)), map_location=device, weights_only=True)

"""A codec assembled from a key format and a value format on top of `PackedCache`.

The fp16, kivi and qjl codecs are a `KeyFormat` plus a `ValueFormat`; this module owns everything
they share: preallocated caches, appending in whole groups behind a full-precision window, the
full-precision part of scores and outputs, GQA, byte accounting and (de)serialization.
"""

from __future__ import annotations

import dataclasses
import struct
from abc import ABC, abstractmethod
from typing import Any

import torch

from . import cache as cache_lib
from . import decode_attention_triton
from .cache import DecodeStep, FieldSpec, PackedCache
from .codec import KVCodec, should_use_triton
from .decode_attention_triton import EXACT, DecodeLayout
from .gqa import per_query_head, query_group, rows_per_kv_head

_KV_LENGTH = struct.Struct("<Q")


class TokenFormat(ABC):
    """How one of keys / values is packed. Subclasses hold their parameters.

    `decode_layout` names the layout for the fused decode-attention kernel
    (kernels/decode_attention_triton.py); None: the format has no fused decode path.
    """

    decode_layout: DecodeLayout | None = None

    @abstractmethod
    def field_specs(self, dtype: torch.dtype) -> list[FieldSpec]:
        """The packed fields for inputs of `dtype`."""

    @abstractmethod
    def pack(self, x: torch.Tensor, use_triton: bool) -> dict[str, torch.Tensor]:
        """x [B, H, n, D] (n a multiple of the group size) -> field tensors [B, H, rows, ...]."""

    def params(self) -> dict[str, Any]:
        return {}


class KeyFormat(TokenFormat):
    @abstractmethod
    def packed_scores(
        self,
        q: torch.Tensor,
        fields: dict[str, torch.Tensor],
        num_tokens: int,
        out: torch.Tensor,
        use_triton: bool,
    ) -> None:
        """Write scores of q [B, H_q, T_q, D] against the first num_tokens packed tokens into
        out [B, H_q, T_q, num_tokens] (float32, possibly a strided view)."""


class ValueFormat(TokenFormat):
    @abstractmethod
    def packed_attend(
        self, p: torch.Tensor, fields: dict[str, torch.Tensor], num_tokens: int, use_triton: bool
    ) -> torch.Tensor:
        """p [B, H_q, T_q, num_tokens] times the first num_tokens packed values
        -> float32 [B, H_q, T_q, D]."""


class PackedKVCodec(KVCodec):
    """Base of the codecs of this package. Subclasses set `key_format`, `value_format`,
    `group_size` and `window` in their constructor and describe their parameters in `params()`."""

    key_format: KeyFormat
    value_format: ValueFormat
    group_size: int = 1
    window: int = 0

    def __init__(self, *, head_dim: int, use_triton: bool | None = None) -> None:
        super().__init__(head_dim=head_dim, use_triton=use_triton)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = super().fingerprint()
        return self._fingerprint

    def _triton(self, tensor: torch.Tensor) -> bool:
        return should_use_triton(tensor, self.use_triton)

    # -- containers ----------------------------------------------------------------------------
    def _new(
        self, kind: str, fmt: TokenFormat, batch, num_heads, dtype, device, capacity
    ) -> PackedCache:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        return cache_lib.allocate(
            kind=kind,
            fingerprint=self.fingerprint(),
            specs=fmt.field_specs(dtype),
            group_size=self.group_size,
            window=self.window,
            batch=batch,
            num_heads=num_heads,
            head_dim=self.head_dim,
            dtype=dtype,
            device=device,
            capacity=capacity,
        )

    def new_keys(self, batch, num_heads, *, dtype, device="cpu", capacity=0) -> PackedCache:
        return self._new("keys", self.key_format, batch, num_heads, dtype, device, capacity)

    def new_values(self, batch, num_heads, *, dtype, device="cpu", capacity=0) -> PackedCache:
        return self._new("values", self.value_format, batch, num_heads, dtype, device, capacity)

    def reserve(self, packed: PackedCache, capacity: int) -> None:
        cache_lib.reserve(packed, capacity)

    def length(self, packed: PackedCache) -> int:
        return packed.length

    def _check_kind(self, packed: Any, kind: str, name: str) -> None:
        if not isinstance(packed, PackedCache) or packed.kind != kind:
            raise ValueError(f"{name} must be a {kind} cache made by this codec")
        if packed.fingerprint != self.fingerprint():
            raise ValueError(f"{name} was made by another codec (fingerprint {packed.fingerprint})")

    # -- keys ----------------------------------------------------------------------------------
    def encode_keys(self, k: torch.Tensor, positions: torch.Tensor | None = None) -> PackedCache:
        if k.dim() != 4:
            raise ValueError(f"k must be [B, H, T, D], got shape {tuple(k.shape)}")
        keys = self.new_keys(
            k.shape[0], k.shape[1], dtype=k.dtype, device=k.device, capacity=k.shape[2]
        )
        return self.append_keys(keys, k, positions)

    def append_keys(
        self, keys: PackedCache, k: torch.Tensor, positions: torch.Tensor | None = None
    ):
        self._check_kind(keys, "keys", "keys")
        cache_lib.check_tokens(keys, k, "k")
        use_triton = self._triton(k)
        return cache_lib.append_tokens(
            keys, k, lambda x: self.key_format.pack(x.contiguous(), use_triton)
        )

    def key_scores(self, q: torch.Tensor, keys: PackedCache) -> torch.Tensor:
        self._check_kind(keys, "keys", "keys")
        self._check_queries(q, keys, "q")
        batch, num_query_heads, num_queries, _ = q.shape
        out = torch.empty(
            batch, num_query_heads, num_queries, keys.length, dtype=torch.float32, device=q.device
        )
        if keys.num_packed:
            self.key_format.packed_scores(
                q, keys.fields, keys.num_packed, out[..., : keys.num_packed], self._triton(q)
            )
        if keys.tail_len:
            rows = rows_per_kv_head(q, keys.num_heads).to(keys.dtype)
            tail = keys.tail[:, :, : keys.tail_len]
            scores = torch.matmul(rows, tail.transpose(-1, -2)).float()
            out[..., keys.num_packed :] = per_query_head(scores, num_query_heads, num_queries)
        return out

    # -- values --------------------------------------------------------------------------------
    def encode_values(self, v: torch.Tensor) -> PackedCache:
        if v.dim() != 4:
            raise ValueError(f"v must be [B, H, T, D], got shape {tuple(v.shape)}")
        values = self.new_values(
            v.shape[0], v.shape[1], dtype=v.dtype, device=v.device, capacity=v.shape[2]
        )
        return self.append_values(values, v)

    def append_values(self, values: PackedCache, v: torch.Tensor) -> PackedCache:
        self._check_kind(values, "values", "values")
        cache_lib.check_tokens(values, v, "v")
        use_triton = self._triton(v)
        return cache_lib.append_tokens(
            values, v, lambda x: self.value_format.pack(x.contiguous(), use_triton)
        )

    def attend_values(self, p: torch.Tensor, values: PackedCache) -> torch.Tensor:
        self._check_kind(values, "values", "values")
        self._check_queries(p, values, "p", width=values.length)
        batch, num_query_heads, num_queries, _ = p.shape
        if values.num_packed:
            out = self.value_format.packed_attend(
                p[..., : values.num_packed], values.fields, values.num_packed, self._triton(p)
            )
        else:
            out = torch.zeros(
                batch,
                num_query_heads,
                num_queries,
                self.head_dim,
                dtype=torch.float32,
                device=p.device,
            )
        if values.tail_len:
            rows = rows_per_kv_head(p[..., values.num_packed :], values.num_heads).to(values.dtype)
            part = torch.matmul(rows, values.tail[:, :, : values.tail_len]).float()
            out = out + per_query_head(part, num_query_heads, num_queries)
        return out

    def _check_queries(
        self, x: torch.Tensor, packed: PackedCache, name: str, width: int | None = None
    ) -> None:
        if x.dim() != 4:
            raise ValueError(
                f"{name} must be [B, H_q, T_q, {'T' if width is not None else 'D'}], "
                f"got {tuple(x.shape)}"
            )
        expected_width = self.head_dim if width is None else width
        if x.shape[0] != packed.batch or x.shape[3] != expected_width:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; "
                f"expected batch {packed.batch} and last dimension {expected_width}"
            )
        query_group(x.shape[1], packed.num_heads)
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != packed.device:
            raise ValueError(f"{name} is on {x.device}, the cache lives on {packed.device}")

    # -- fused decode (one query token; lengths on the device, for CUDA graphs) -------------------
    def _decode_layout(self, fmt: TokenFormat, dtype: torch.dtype) -> DecodeLayout | None:
        if fmt.decode_layout is not None:
            return fmt.decode_layout
        # A format whose only field is the token itself, in its own dtype, is exact (fp16 codec).
        specs = fmt.field_specs(dtype)
        exact = FieldSpec("data", (self.head_dim,), dtype)
        return DecodeLayout(EXACT) if specs == [exact] else None

    def supports_decode_attention(self, dtype: torch.dtype) -> bool:
        """Whether `decode_attention` runs fused for caches of `dtype` (head_dim a power of two,
        at least 16, and both formats with a decode layout)."""
        head_dim = self.head_dim
        return (
            head_dim >= 16
            and not head_dim & (head_dim - 1)
            and self._decode_layout(self.key_format, dtype) is not None
            and self._decode_layout(self.value_format, dtype) is not None
        )

    def decode_attention(
        self,
        q: torch.Tensor,
        keys: PackedCache,
        values: PackedCache,
        lengths: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """softmax(q·Kᵀ·scaling)·V for one query token q [B, H_q, 1, D] over the tokens that
        `lengths` (int64 device tensor [2]: packed, tail) says the caches hold, whatever their host
        lengths say. Returns [B, H_q, 1, D] in q's dtype.

        The fused Triton kernel where supported and Triton runs; otherwise the unfused path
        (key_scores, softmax, attend_values), which reads the lengths on the host."""
        if self._triton(q) and self.supports_decode_attention(keys.dtype):
            return decode_attention_triton.decode_attention(
                q,
                lengths,
                keys,
                values,
                self._decode_layout(self.key_format, keys.dtype),
                self._decode_layout(self.value_format, values.dtype),
                scaling,
            )
        num_packed, tail_len = (int(n) for n in lengths.tolist())
        keys = dataclasses.replace(keys, num_packed=num_packed, tail_len=tail_len)
        values = dataclasses.replace(values, num_packed=num_packed, tail_len=tail_len)
        probabilities = torch.softmax(self.key_scores(q, keys) * scaling, dim=-1).to(q.dtype)
        return self.attend_values(probabilities, values).to(q.dtype)

    def append_decode_token(self, packed: PackedCache, x: torch.Tensor, step: DecodeStep) -> None:
        """Append one token x [B, H, 1, D] to a key or value cache at the device-side slots of
        `step` (kernels/cache.py); host lengths are updated later by cache.advance_lengths."""
        fmt = self.key_format if packed.kind == "keys" else self.value_format
        use_triton = self._triton(x)
        cache_lib.append_token_on_device(
            packed, x, step, lambda group: fmt.pack(group.contiguous(), use_triton)
        )

    # -- storage -------------------------------------------------------------------------------
    def nbytes(self, packed: PackedCache) -> int:
        return packed.packed_nbytes()

    def to_bytes(self, packed: PackedCache) -> bytes:
        return cache_lib.serialize(packed)

    def block_to_bytes(self, packed: PackedCache, start: int, end: int) -> bytes:
        return cache_lib.serialize(packed, start, end)

    def from_bytes(self, data: bytes, device: torch.device | str = "cpu") -> PackedCache:
        header, _ = cache_lib.read_header(data)
        if header.get("start") != 0:
            raise ValueError("data is a block that does not start at token 0; use append_block")
        if header.get("fingerprint") != self.fingerprint():
            raise ValueError(
                f"data was made by another codec (fingerprint {header.get('fingerprint')})"
            )
        dtype = cache_lib._DTYPES.get(header.get("dtype"))
        kind = header.get("kind")
        if kind not in ("keys", "values") or dtype not in (
            torch.float16,
            torch.bfloat16,
            torch.float32,
        ):
            raise ValueError(
                f"data holds an unknown cache kind {kind!r} or dtype {header.get('dtype')!r}"
            )
        fmt = self.key_format if kind == "keys" else self.value_format
        packed = self._new(
            kind, fmt, header["batch"], header["num_heads"], dtype, device, header["num_packed"]
        )
        return cache_lib.deserialize_into(packed, data)

    def append_block(self, packed: PackedCache, data: bytes) -> PackedCache:
        if not isinstance(packed, PackedCache):
            raise ValueError("packed must be a cache made by this codec")
        return cache_lib.deserialize_into(packed, data)

    def kv_block_to_bytes(
        self, keys: PackedCache, values: PackedCache, start: int, end: int
    ) -> bytes:
        """Tokens [start, end) of one layer's keys and values as one payload."""
        key_bytes = self.block_to_bytes(keys, start, end)
        return _KV_LENGTH.pack(len(key_bytes)) + key_bytes + self.block_to_bytes(values, start, end)

    def append_kv_block(self, keys: PackedCache, values: PackedCache, data: bytes) -> None:
        """Load a payload of `kv_block_to_bytes` into a layer's key and value caches."""
        if len(data) < _KV_LENGTH.size:
            raise ValueError("data is too short to hold a key/value block")
        (key_len,) = _KV_LENGTH.unpack_from(data)
        split = _KV_LENGTH.size + key_len
        if split > len(data):
            raise ValueError("data is truncated")
        self.append_block(keys, data[_KV_LENGTH.size : split])
        self.append_block(values, data[split:])

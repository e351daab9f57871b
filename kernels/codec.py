"""The codec interface every KV compression method implements.

A codec turns keys and values of one attention layer into a packed, appendable cache and computes
attention directly on that packed form:

    codec = make_codec("qjl", head_dim=128, sketch_dim=256, window=128)
    keys = codec.encode_keys(k)                 # k: [B, H_kv, T, D]  (kvquant: pre-RoPE)
    keys = codec.append_keys(keys, k_new)       # the cache grows token by token / block by block
    scores = codec.key_scores(q, keys)          # q: [B, H_q, T_q, D] -> [B, H_q, T_q, T] ~ q @ k^T
    values = codec.encode_values(v)
    out = codec.attend_values(p, values)        # p: [B, H_q, T_q, T] -> [B, H_q, T_q, D] ~ p @ v

Query head h reads KV head h // (H_q // H_kv), as in Hugging Face's GQA. All sequences of a batch
have the same length. `key_scores` and `attend_values` return float32 and cover every token held,
in token order (the packed part and the full-precision part alike); the caller applies the
1/sqrt(D) scale, the causal mask of a multi-token query and the softmax.

Preallocated decoding (static shapes, no cache allocation per step):

    keys = codec.new_keys(B, H_kv, dtype=torch.bfloat16, device="cuda", capacity=max_tokens)
    values = codec.new_values(B, H_kv, dtype=torch.bfloat16, device="cuda", capacity=max_tokens)
    codec.append_keys(keys, k_prefill); codec.append_values(values, v_prefill)
    for step in ...: codec.append_keys(keys, k_step); ...   # in place; returns the same object

Caches are mutable containers (`kvpack.kernels.cache.PackedCache` for the codecs of this package);
`append_*` mutates and returns its argument. `codec.length(cache)` is the token count. Tokens are
quantized in whole groups of `group_size` once they are older than the `window` most recent tokens;
until then they stay in full precision (`cache.num_packed` packed, `cache.tail_len` in the tail).

Blocks for the store (a token range of one layer, aligned to group boundaries, inside the packed
region, i.e. `end <= cache.num_packed`):

    data = codec.block_to_bytes(keys, start, end)          # or kv_block_to_bytes(keys, values, ...)
    keys = codec.new_keys(B, H_kv, dtype=..., device=...)  # an empty cache ...
    codec.append_block(keys, data)                         # ... loads blocks in token order,
    codec.append_keys(keys, k_rest)                        # then keeps growing token by token.

A cache rebuilt from blocks holds bit-identical bytes, so it gives bit-identical scores and
outputs to the cache the blocks came from (for the same length).

Contract shared by all codecs:
- `nbytes(packed)` counts every byte the packed cache stores for the tokens it holds (codes, norms,
  scales, zero points, outlier values and indices, full-precision tails), so bits per number are
  honest; capacity reserved but not yet used is not counted, nor is the serialization header.
- `to_bytes(packed)` / `from_bytes(data, device=...)` round-trip bit-exactly; `from_bytes` refuses
  bytes made by a codec with another fingerprint.
- `fingerprint()` is stable across processes and releases of the same format: it hashes the codec
  name, head_dim, every parameter that changes the stored bytes, and the payload format version. The
  inference service puts it into the store's namespace so blocks of different codecs never mix.
- Each codec runs its Triton kernel when the tensors live on a GPU or TRITON_INTERPRET=1 is set,
  and a plain-PyTorch reference otherwise; `use_triton=` forces either path (tests compare both).
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

# Bumped whenever any codec's to_bytes layout changes; part of every fingerprint.
PAYLOAD_FORMAT_VERSION = 1


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def should_use_triton(tensor: torch.Tensor, use_triton: bool | None) -> bool:
    """Triton where it can run: on CUDA tensors, or anywhere under the interpreter."""
    if use_triton is not None:
        return use_triton
    return tensor.is_cuda or triton_interpret_enabled()


class KVCodec(ABC):
    """Base class of all codecs. Subclasses register themselves in `CODECS` by `name`."""

    name: ClassVar[str]

    def __init__(self, *, head_dim: int, use_triton: bool | None = None) -> None:
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        self.head_dim = head_dim
        self.use_triton = use_triton

    # -- identity ---------------------------------------------------------------------------
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Every parameter that changes the stored bytes, JSON-serialisable."""

    def fingerprint(self) -> str:
        canonical = json.dumps(
            {
                "codec": self.name,
                "head_dim": self.head_dim,
                "format": PAYLOAD_FORMAT_VERSION,
                "params": self.params(),
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()

    # -- keys -------------------------------------------------------------------------------
    @abstractmethod
    def encode_keys(self, k: torch.Tensor, positions: torch.Tensor | None = None) -> Any: ...

    @abstractmethod
    def append_keys(
        self, keys: Any, k: torch.Tensor, positions: torch.Tensor | None = None
    ) -> Any: ...

    @abstractmethod
    def key_scores(self, q: torch.Tensor, keys: Any) -> torch.Tensor: ...

    # -- values -----------------------------------------------------------------------------
    @abstractmethod
    def encode_values(self, v: torch.Tensor) -> Any: ...

    @abstractmethod
    def append_values(self, values: Any, v: torch.Tensor) -> Any: ...

    @abstractmethod
    def attend_values(self, p: torch.Tensor, values: Any) -> torch.Tensor: ...

    # -- storage ----------------------------------------------------------------------------
    @abstractmethod
    def nbytes(self, packed: Any) -> int: ...

    @abstractmethod
    def to_bytes(self, packed: Any) -> bytes: ...

    @abstractmethod
    def from_bytes(self, data: bytes, device: torch.device | str = "cpu") -> Any: ...

    # -- containers: preallocation, length, blocks --------------------------------------------
    # Optional for a codec that does not build on kvpack.kernels.packed_codec.PackedKVCodec;
    # every codec of this package implements them.
    def new_keys(
        self,
        batch: int,
        num_heads: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 0,
    ) -> Any:
        """An empty key cache with room for `capacity` tokens before it reallocates."""
        raise NotImplementedError(f"{self.name} does not support preallocated caches")

    def new_values(
        self,
        batch: int,
        num_heads: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 0,
    ) -> Any:
        """An empty value cache with room for `capacity` tokens before it reallocates."""
        raise NotImplementedError(f"{self.name} does not support preallocated caches")

    def reserve(self, packed: Any, capacity: int) -> None:
        """Grow a cache in place so it holds `capacity` tokens without reallocating."""
        raise NotImplementedError(f"{self.name} does not support preallocated caches")

    def length(self, packed: Any) -> int:
        """Tokens held by a key or value cache."""
        raise NotImplementedError(f"{self.name} does not report lengths")

    def block_to_bytes(self, packed: Any, start: int, end: int) -> bytes:
        """Serialize tokens [start, end) of a cache (group-aligned, inside its packed region)."""
        raise NotImplementedError(f"{self.name} does not support blocks")

    def append_block(self, packed: Any, data: bytes) -> Any:
        """Load a block made by `block_to_bytes` at the end of a cache that has no tail yet."""
        raise NotImplementedError(f"{self.name} does not support blocks")


CODECS: dict[str, type[KVCodec]] = {}


def register_codec(cls: type[KVCodec]) -> type[KVCodec]:
    CODECS[cls.name] = cls
    return cls


def make_codec(name: str, *, head_dim: int, **params: Any) -> KVCodec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}")
    return CODECS[name](head_dim=head_dim, **params)

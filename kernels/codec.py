"""The codec interface every KV compression method implements.

A codec turns keys and values of one attention layer into a packed, appendable cache and computes
attention directly on that packed form:

    codec = make_codec("qjl", head_dim=128, sketch_dim=256)
    keys = codec.encode_keys(k)                 # k: [B, H_kv, T, D]  (kvquant: pre-RoPE, with positions)
    keys = codec.append_keys(keys, k_new)       # the cache grows token by token / block by block
    scores = codec.key_scores(q, keys)          # q: [B, H_q, T_q, D] -> [B, H_q, T_q, T] ~ q @ k^T (unscaled)
    values = codec.encode_values(v)
    out = codec.attend_values(p, values)        # p: [B, H_q, T_q, T] -> [B, H_q, T_q, D] ~ p @ v

Query head h reads KV head h // (H_q // H_kv), as in Hugging Face's GQA.

Contract shared by all codecs:
- `nbytes(packed)` counts every byte the packed cache stores (codes, norms, scales, zero points,
  outlier values and indices, full-precision windows), so bits per number are honest.
- `to_bytes(packed)` / `from_bytes(data, device=...)` round-trip bit-exactly; the bytes are what the
  inference service ships to the kvstore as a block payload.
- `fingerprint()` is stable across processes and releases of the same format: it hashes the codec
  name, head_dim, every parameter that changes the stored bytes, and the payload format version. The
  inference service puts it into the store's namespace so blocks of different codecs never mix.
- Each codec runs its Triton kernel when the tensors live on a GPU or TRITON_INTERPRET=1 is set, and a
  plain-PyTorch reference otherwise; `use_triton=` forces either path (tests compare both).
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
    def append_keys(self, keys: Any, k: torch.Tensor, positions: torch.Tensor | None = None) -> Any: ...

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


CODECS: dict[str, type[KVCodec]] = {}


def register_codec(cls: type[KVCodec]) -> type[KVCodec]:
    CODECS[cls.name] = cls
    return cls


def make_codec(name: str, *, head_dim: int, **params: Any) -> KVCodec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}")
    return CODECS[name](head_dim=head_dim, **params)

"""Compression methods as the engine sees them: name + codec parameters -> one codec per layer."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from kvpack.kernels.codec import CODECS, KVCodec, make_codec

# Codec modules register themselves on import; a method whose module is missing is unavailable.
CODEC_MODULES = ("fp16", "kivi", "qjl", "kvquant")
# Methods that store keys before RoPE and rotate them inside their score kernel.
PRE_ROPE_METHODS = {"kvquant"}
# The service's own defaults where the codec's differ (DESIGN.md: codecs default to window 0):
# KIVI keeps its recent tokens in full precision (the paper's residual of 128), and so does QJL.
SERVICE_DEFAULTS: dict[str, dict[str, Any]] = {"kivi": {"window": 128}, "qjl": {"window": 128}}


@dataclass(frozen=True)
class MethodSpec:
    """A compression method and its codec parameters (hashable, so codecs can be cached)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, params: dict[str, Any] | None = None) -> MethodSpec:
        """`name` with `params` over the service defaults of that method."""
        merged = {**SERVICE_DEFAULTS.get(name, {}), **(params or {})}
        return cls(name, tuple(sorted(merged.items())))

    def merged(self, overrides: dict[str, Any]) -> MethodSpec:
        return MethodSpec.of(self.name, {**dict(self.params), **overrides})


def available_methods() -> list[str]:
    for module in CODEC_MODULES:
        try:
            importlib.import_module(f"kvpack.kernels.{module}")
        except ImportError:
            continue
    return sorted(CODECS)


def build_layer_codecs(spec: MethodSpec, *, num_layers: int, head_dim: int) -> list[KVCodec]:
    """One codec per layer (the same object unless the method is calibrated per layer).

    Raises:
        ValueError: unknown method, or parameters the codec rejects (the message names them).
    """
    if spec.name not in available_methods():
        raise ValueError(
            f"unknown method {spec.name!r}; available: {', '.join(available_methods())}"
        )
    try:
        codec = make_codec(spec.name, head_dim=head_dim, **dict(spec.params))
    except TypeError as error:  # an unexpected keyword argument
        raise ValueError(f"method {spec.name}: {error}") from None
    if hasattr(codec, "for_layer"):
        return [codec.for_layer(layer) for layer in range(num_layers)]
    return [codec] * num_layers

"""Compression methods as the engine sees them: a name plus codec parameters -> one codec per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpack.kernels.codec import CODECS, KVCodec, make_codec


@dataclass(frozen=True)
class MethodSpec:
    """A compression method and its codec parameters (hashable, so codecs can be cached)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, params: dict[str, Any] | None = None) -> MethodSpec:
        return cls(name, tuple(sorted((params or {}).items())))

    def merged(self, overrides: dict[str, Any]) -> MethodSpec:
        return MethodSpec.of(self.name, {**dict(self.params), **overrides})


def available_methods() -> list[str]:
    _import_codecs()
    return sorted(set(CODECS) | {"fp16"})


def _import_codecs() -> None:
    # Codecs register themselves when their modules are imported.
    import kvpack.kernels  # noqa: F401


def build_layer_codecs(spec: MethodSpec, *, num_layers: int, head_dim: int) -> list[KVCodec]:
    """One codec per layer (the same object where the method has no per-layer state).

    Raises:
        ValueError: unknown method, or parameters the codec rejects (message names them).
    """
    _import_codecs()
    params = dict(spec.params)
    if spec.name == "fp16" and "fp16" not in CODECS:
        from kvpack.inference.plain_codec import PlainCodec

        if params:
            raise ValueError(f"method fp16 takes no parameters, got {sorted(params)}")
        return [PlainCodec(head_dim=head_dim)] * num_layers
    if spec.name not in CODECS:
        raise ValueError(f"unknown method {spec.name!r}; available: {', '.join(available_methods())}")
    try:
        codec = make_codec(spec.name, head_dim=head_dim, **params)
    except TypeError as error:  # an unexpected keyword argument
        raise ValueError(f"method {spec.name}: {error}") from None
    return [codec] * num_layers

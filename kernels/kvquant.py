"""The `kvquant` codec: calibrated non-uniform pre-RoPE keys, per-token values, sparse outliers.

    codec = make_codec("kvquant", head_dim=64, calibration="smollm2.kvq.safetensors", bits=3,
                       outliers=0.01, sink_tokens=1).for_layer(i)
    keys = codec.encode_keys(k_pre_rope)               # k: [B, H_kv, T, D]
    scores = codec.key_scores(q_post_rope, keys)       # RoPE applied to the keys inside the kernel

Calibration is per layer, so a codec serves one layer: pass `layer=` or call `for_layer(i)`
(copies share the loaded artifact). A token's RoPE position is its index in the cache (sequences
start at position 0; `positions`, where given, must say so). Per vector (one token of one KV head)
the cache stores D*bits/8 bytes of codes and `ceil(outliers * D)` outlier slots of (channel:
1 byte, delta: fp16); values add an fp16 scale and zero point. The first `sink_tokens` tokens are
also kept exactly (fp16) and read from there (the attention sink). Per-channel key constants and
codebooks live in the calibration artifact, shared by every sequence like the weights.
Research notes: research/kvquant.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from . import kvquant_reference as reference
from .codec import KVCodec, register_codec, should_use_triton
from .gqa import query_group
from .kvquant_calibration import KVQuantCalibration


@dataclass
class KVQuantCache:
    """Packed keys or values of one layer for a batch of equal-length sequences.

    `fields` hold [B, H, capacity, ...] tensors whose first `num_tokens` token rows are used:
    keys: codes uint8 [.., D*bits/8], outlier_index uint8 [.., S], outlier_delta fp16 [.., S];
    values: the same plus scale and zero fp16 [B, H, capacity]. `sink` is fp16 [B, H, s, D] with
    the exact (keys: pre-RoPE) vectors of tokens [0, s), s = min(sink_tokens, num_tokens).
    """

    kind: str
    fingerprint: str
    fields: dict[str, torch.Tensor]
    sink: torch.Tensor
    num_tokens: int = 0

    @property
    def batch(self) -> int:
        return self.sink.shape[0]

    @property
    def num_heads(self) -> int:
        return self.sink.shape[1]

    @property
    def capacity(self) -> int:
        return self.fields["codes"].shape[2]

    def used(self) -> dict[str, torch.Tensor]:
        """The stored tensors, trimmed to the tokens held."""
        return {name: t[:, :, : self.num_tokens] for name, t in self.fields.items()}


@register_codec
class KVQuantCodec(KVCodec):
    """KVQuant (arXiv 2401.18079) with calibrated per-layer codebooks. See module docstring."""

    name = "kvquant"

    def __init__(
        self,
        *,
        head_dim: int,
        calibration: str | Path | KVQuantCalibration,
        bits: int = 3,
        outliers: float | None = None,
        sink_tokens: int = 1,
        layer: int | None = None,
        qnorm: bool | None = None,
        key_bits: int | None = None,
        value_bits: int | None = None,
        avg_bits: float | None = None,
        value_outliers: float | None = None,
        key_outliers: float | None = None,
        model_id: str | None = None,
        num_layers: int | None = None,
        use_triton: bool | None = None,
    ) -> None:
        """Args beyond DESIGN.md's (calibration, bits, outliers, sink_tokens): `layer` binds the
        codec to one layer; `qnorm` applies the calibrated Q-Norm to the codebooks (True), never
        (False), or to 2-bit codebooks only (None, the default); `key_bits` /
        `value_bits` override `bits` for keys / values; `avg_bits` (mean code bits over all K and V
        numbers) gives every layer its own key and value bit widths from the artifact's measured
        sensitivities (`KVQuantCalibration.allocate_bits`; excludes bits/key_bits/value_bits);
        `value_outliers` sets the values' sparse slots apart from the keys' (default `outliers`;
        value outliers are chosen online, so any fraction fits the artifact); `key_outliers` sets
        the keys' slots per vector apart from `outliers` (default `outliers`), whose fraction
        stays the one the artifact's key ranges were calibrated for (the slots hold the
        elements farthest outside those ranges, so more slots catch more of them);
        `model_id` and `num_layers`, where given, must match the artifact (a clear error
        otherwise)."""
        super().__init__(head_dim=head_dim, use_triton=use_triton)
        if not isinstance(calibration, KVQuantCalibration):
            calibration = KVQuantCalibration.load(calibration)
        outliers = calibration.outliers if outliers is None else float(outliers)
        if not 0.0 <= outliers < 0.5:
            raise ValueError(f"outliers must be a fraction in [0, 0.5), got {outliers}")
        key_bits = bits if key_bits is None else int(key_bits)
        value_bits = bits if value_bits is None else int(value_bits)
        calibration.check(head_dim=head_dim, bits=key_bits, outliers=outliers, model_id=model_id,
                          num_layers=num_layers)
        calibration.check(bits=value_bits)
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
        reference.row_bytes(head_dim, key_bits)
        self.allocation: tuple[list[int], list[int]] | None = None
        self.avg_bits = None if avg_bits is None else float(avg_bits)
        if self.avg_bits is not None:
            if (key_bits, value_bits) != (bits, bits):
                raise ValueError("avg_bits allocates every layer's bits: give it without "
                                 "key_bits/value_bits")
            self.allocation = calibration.allocate_bits(self.avg_bits)
        self.calibration = calibration
        self.bits = bits
        self.key_bits, self.value_bits = key_bits, value_bits
        self.outliers = outliers
        self.sink_tokens = int(sink_tokens)
        self.qnorm = None if qnorm is None else bool(qnorm)
        self.value_outliers = outliers if value_outliers is None else float(value_outliers)
        if not 0.0 <= self.value_outliers < 0.5:
            raise ValueError(
                f"value_outliers must be a fraction in [0, 0.5), got {self.value_outliers}")
        self.key_outliers = outliers if key_outliers is None else float(key_outliers)
        if not 0.0 <= self.key_outliers < 0.5:
            raise ValueError(
                f"key_outliers must be a fraction in [0, 0.5), got {self.key_outliers}")
        self.num_slots = reference.outlier_slots(self.key_outliers, head_dim)
        self.value_slots = reference.outlier_slots(self.value_outliers, head_dim)
        if max(self.num_slots, self.value_slots) >= head_dim:
            raise ValueError(f"key_outliers={self.key_outliers} / value_outliers="
                             f"{self.value_outliers} leave "
                             f"no dense channels at head_dim {head_dim}")
        self.index_dtype = torch.uint8 if head_dim <= 256 else torch.int16
        self.layer = None
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._calibration_digest = _digest(calibration)
        if layer is not None:
            self._bind(layer)

    # -- identity ---------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        params = {
            "calibration": self._calibration_digest,
            "bits": self.bits,
            "outliers": self.outliers,
            "sink_tokens": self.sink_tokens,
            "qnorm": self.qnorm,
        }
        if self.value_outliers != self.outliers:
            params["value_outliers"] = self.value_outliers
        if self.key_outliers != self.outliers:
            params["key_outliers"] = self.key_outliers
        if self.allocation is not None:  # every layer's widths, so all layers share one identity
            params["avg_bits"] = self.avg_bits
            params["key_bits"], params["value_bits"] = self.allocation
        elif (self.key_bits, self.value_bits) != (self.bits, self.bits):
            params["key_bits"], params["value_bits"] = self.key_bits, self.value_bits
        return params

    def _bind(self, layer: int) -> None:
        self.layer = self._check_layer(layer)
        if self.allocation is not None:
            self.key_bits = self.allocation[0][self.layer]
            self.value_bits = self.allocation[1][self.layer]

    def _check_layer(self, layer: int) -> int:
        if not 0 <= int(layer) < self.calibration.num_layers:
            raise ValueError(f"layer must be in [0, {self.calibration.num_layers}), got {layer}")
        return int(layer)

    def for_layer(self, layer: int) -> KVQuantCodec:
        """This codec bound to one layer's calibration (shares the loaded artifact)."""
        bound = copy.copy(self)
        bound._tables = {}
        bound._bind(layer)
        return bound

    def tables(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """This layer's constants on `device`: key zero/scale, boundaries and luts, inv_freq."""
        if self.layer is None:
            if self.calibration.num_layers != 1:
                raise ValueError("kvquant codecs are per layer: pass layer= or use for_layer(i)")
            self._bind(0)
        device = torch.device(device)
        if device not in self._tables:
            tables = self.calibration.layer_tables(self.layer, self.key_bits, self.qnorm,
                                                   value_bits=self.value_bits)
            tables["inv_freq"] = self.calibration.inv_freq.float()
            self._tables[device] = {name: t.to(device) for name, t in tables.items()}
        return self._tables[device]

    # -- containers -------------------------------------------------------------------------
    def _new(self, kind: str, batch: int, num_heads: int, device, capacity: int) -> KVQuantCache:
        if num_heads != self.calibration.num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads}, the calibration has "
                f"{self.calibration.num_kv_heads} KV heads"
            )
        if batch <= 0 or capacity < 0:
            raise ValueError(f"batch must be positive and capacity >= 0, got {batch}, {capacity}")
        if self.layer is None and self.calibration.num_layers == 1:
            self._bind(0)
        if self.layer is None and self.allocation is not None:
            raise ValueError("kvquant codecs with avg_bits are per layer: use for_layer(i)")
        shape = (batch, num_heads, capacity)
        bits = self.key_bits if kind == "keys" else self.value_bits
        fields = {"codes": torch.zeros(*shape, self.head_dim * bits // 8, dtype=torch.uint8,
                                       device=device)}
        if kind == "values":
            fields["scale"] = torch.zeros(shape, dtype=torch.float16, device=device)
            fields["zero"] = torch.zeros(shape, dtype=torch.float16, device=device)
        slots = self.num_slots if kind == "keys" else self.value_slots
        fields["outlier_index"] = torch.zeros(*shape, slots, dtype=self.index_dtype,
                                              device=device)
        fields["outlier_delta"] = torch.zeros(*shape, slots, dtype=torch.float16,
                                              device=device)
        sink = torch.zeros(batch, num_heads, 0, self.head_dim, dtype=torch.float16, device=device)
        return KVQuantCache(kind, self.fingerprint(), fields, sink)

    def new_keys(self, batch, num_heads, *, dtype=None, device="cpu", capacity=0) -> KVQuantCache:
        """An empty key cache with room for `capacity` tokens (`dtype` is not needed: the cache
        stores codes and fp16 only)."""
        return self._new("keys", batch, num_heads, device, capacity)

    def new_values(self, batch, num_heads, *, dtype=None, device="cpu", capacity=0) -> KVQuantCache:
        return self._new("values", batch, num_heads, device, capacity)

    def reserve(self, packed: KVQuantCache, capacity: int) -> None:
        if capacity <= packed.capacity:
            return
        for name, old in packed.fields.items():
            new = old.new_zeros(*old.shape[:2], capacity, *old.shape[3:])
            new[:, :, : packed.num_tokens] = old[:, :, : packed.num_tokens]
            packed.fields[name] = new

    def length(self, packed: KVQuantCache) -> int:
        return packed.num_tokens

    def _write(self, packed: KVQuantCache, new: dict[str, torch.Tensor], exact: torch.Tensor):
        """Store freshly packed tokens after the held ones; `exact` feeds the sink."""
        start, count = packed.num_tokens, new["codes"].shape[2]
        if start + count > packed.capacity:
            self.reserve(packed, max(start + count, 2 * packed.capacity))
        for name, value in new.items():
            packed.fields[name][:, :, start : start + count] = value
        missing = min(self.sink_tokens, start + count) - packed.sink.shape[2]
        if missing > 0:
            packed.sink = torch.cat((packed.sink, exact[:, :, :missing].half()), dim=2)
        packed.num_tokens = start + count
        return packed

    def _check_tokens(self, packed: KVQuantCache, x: torch.Tensor, name: str, kind: str) -> None:
        if packed.kind != kind:
            raise ValueError(f"{name} goes into a {kind} cache, got a {packed.kind} cache")
        expected = (packed.batch, packed.num_heads, self.head_dim)
        if x.dim() != 4 or (x.shape[0], x.shape[1], x.shape[3]) != expected:
            raise ValueError(
                f"{name} must be [B, H, T, D] with (B, H, D) = {expected}, got {tuple(x.shape)}"
            )

    # -- keys -------------------------------------------------------------------------------
    def _quantize_keys(self, k: torch.Tensor):
        t = self.tables(k.device)
        args = (t["key_zero"], t["key_scale"], t["key_boundaries"], t["key_lut"], self.key_bits,
                self.num_slots)
        if should_use_triton(k, self.use_triton):
            from . import kvquant_triton

            return kvquant_triton.quantize_keys(k, *args, index_dtype=self.index_dtype)
        codes, index, delta = reference.quantize_keys(k, *args)
        return codes, index.to(self.index_dtype), delta

    def encode_keys(self, k: torch.Tensor, positions: torch.Tensor | None = None) -> KVQuantCache:
        keys = self.new_keys(k.shape[0], k.shape[1], device=k.device, capacity=k.shape[2])
        return self.append_keys(keys, k, positions)

    def append_keys(
        self, keys: KVQuantCache, k: torch.Tensor, positions: torch.Tensor | None = None
    ) -> KVQuantCache:
        """Append pre-RoPE keys k [B, H, T, D]; `positions` ([T] or [B, T]), if given, must be the
        cache indices of the new tokens, since the kernel derives RoPE positions from them."""
        self._check_tokens(keys, k, "k", "keys")
        if positions is not None:
            expected = torch.arange(keys.num_tokens, keys.num_tokens + k.shape[2],
                                    device=k.device)
            positions = torch.as_tensor(positions, device=k.device)
            if not bool((positions == expected).all()):
                raise ValueError(
                    f"positions must be the cache indices [{keys.num_tokens}, "
                    f"{keys.num_tokens + k.shape[2]}) of the new keys (kvquant stores no positions)"
                )
        codes, index, delta = self._quantize_keys(k)
        new = {"codes": codes, "outlier_index": index, "outlier_delta": delta}
        return self._write(keys, new, k)

    def key_scores(self, q: torch.Tensor, keys: KVQuantCache) -> torch.Tensor:
        """q [B, H_q, T_q, D] after RoPE -> float32 scores [B, H_q, T_q, T] (unscaled)."""
        if q.dim() != 4 or q.shape[-1] != self.head_dim or q.shape[0] != keys.batch:
            raise ValueError(
                f"q must be [{keys.batch}, H_q, T_q, {self.head_dim}], got {tuple(q.shape)}"
            )
        query_group(q.shape[1], keys.num_heads)
        t = self.tables(q.device)
        used = keys.used()
        num_sink = keys.sink.shape[2]
        out = torch.empty(*q.shape[:3], keys.num_tokens, dtype=torch.float32, device=q.device)
        scaling = self.calibration.attention_scaling
        if should_use_triton(q, self.use_triton):
            from . import kvquant_triton

            # one launch: the kernel reads the sink tokens' exact keys itself
            kvquant_triton.key_scores(
                q, used["codes"], used["outlier_index"], used["outlier_delta"], t["key_zero"],
                t["key_scale"], t["key_lut"], t["inv_freq"], scaling, self.key_bits,
                token_start=0, out=out, sink=keys.sink,
            )
            return out
        positions = torch.arange(keys.num_tokens, device=q.device)
        if num_sink:
            sink = reference.apply_rope(keys.sink, positions[:num_sink], t["inv_freq"], scaling)
            out[..., :num_sink] = reference.scores(q, sink)
        if keys.num_tokens > num_sink:
            rest = {name: x[:, :, num_sink:] for name, x in used.items()}
            dense = reference.dequantize_keys(
                rest["codes"], rest["outlier_index"], rest["outlier_delta"], t["key_zero"],
                t["key_scale"], t["key_lut"], self.key_bits, self.head_dim,
            )
            rotated = reference.apply_rope(dense, positions[num_sink:], t["inv_freq"], scaling)
            out[..., num_sink:] = reference.scores(q, rotated)
        return out

    def dequantize_keys(self, keys: KVQuantCache) -> torch.Tensor:
        """Pre-RoPE float32 keys as the cache holds them (sink exact): for tests and fidelity."""
        t = self.tables(keys.sink.device)
        used = keys.used()
        dense = reference.dequantize_keys(
            used["codes"], used["outlier_index"], used["outlier_delta"], t["key_zero"],
            t["key_scale"], t["key_lut"], self.key_bits, self.head_dim,
        )
        dense[:, :, : keys.sink.shape[2]] = keys.sink.float()
        return dense

    # -- values -----------------------------------------------------------------------------
    def _quantize_values(self, v: torch.Tensor):
        t = self.tables(v.device)
        args = (t["value_boundaries"], t["value_lut"], self.value_bits, self.value_slots)
        if should_use_triton(v, self.use_triton):
            from . import kvquant_triton

            return kvquant_triton.quantize_values(v, *args, index_dtype=self.index_dtype)
        codes, scale, zero, index, delta = reference.quantize_values(v, *args)
        return codes, scale, zero, index.to(self.index_dtype), delta

    def encode_values(self, v: torch.Tensor) -> KVQuantCache:
        values = self.new_values(v.shape[0], v.shape[1], device=v.device, capacity=v.shape[2])
        return self.append_values(values, v)

    def append_values(self, values: KVQuantCache, v: torch.Tensor) -> KVQuantCache:
        self._check_tokens(values, v, "v", "values")
        codes, scale, zero, index, delta = self._quantize_values(v)
        new = {"codes": codes, "scale": scale, "zero": zero, "outlier_index": index,
               "outlier_delta": delta}
        return self._write(values, new, v)

    def attend_values(self, p: torch.Tensor, values: KVQuantCache) -> torch.Tensor:
        """p [B, H_q, T_q, T] -> float32 [B, H_q, T_q, D] = p . v^ (sink tokens exact)."""
        if p.dim() != 4 or p.shape[-1] != values.num_tokens or p.shape[0] != values.batch:
            raise ValueError(
                f"p must be [{values.batch}, H_q, T_q, {values.num_tokens}], got {tuple(p.shape)}"
            )
        query_group(p.shape[1], values.num_heads)
        t = self.tables(p.device)
        used = values.used()
        num_sink = values.sink.shape[2]
        if should_use_triton(p, self.use_triton):
            from . import kvquant_triton

            out = kvquant_triton.attend_values(
                p, used["codes"], used["scale"], used["zero"], used["outlier_index"],
                used["outlier_delta"], t["value_lut"], self.value_bits, token_start=num_sink,
            )
        else:
            rest = {name: x[:, :, num_sink:] for name, x in used.items()}
            dense = reference.dequantize_values(
                rest["codes"], rest["scale"], rest["zero"], rest["outlier_index"],
                rest["outlier_delta"], t["value_lut"], self.value_bits, self.head_dim,
            )
            out = reference.attend(p[..., num_sink:], dense)
        if num_sink:
            out = out + reference.attend(p[..., :num_sink], values.sink)
        return out

    def dequantize_values(self, values: KVQuantCache) -> torch.Tensor:
        t = self.tables(values.sink.device)
        used = values.used()
        dense = reference.dequantize_values(
            used["codes"], used["scale"], used["zero"], used["outlier_index"],
            used["outlier_delta"], t["value_lut"], self.value_bits, self.head_dim,
        )
        dense[:, :, : values.sink.shape[2]] = values.sink.float()
        return dense

    # -- storage ----------------------------------------------------------------------------
    def nbytes(self, packed: KVQuantCache) -> int:
        """Every byte held for the tokens in the cache: codes, outlier slots, per-token value
        scale/zero, sink vectors (capacity not yet used and serialization headers excluded)."""
        tensors = [*packed.used().values(), packed.sink]
        return sum(t.numel() * t.element_size() for t in tensors)

    def block_to_bytes(self, packed: KVQuantCache, start: int, end: int) -> bytes:
        """Tokens [start, end) (and the sink vectors among them) as a self-describing payload."""
        if not 0 <= start < end <= packed.num_tokens:
            raise ValueError(f"block [{start}, {end}) must lie in [0, {packed.num_tokens})")
        tensors = {name: t[:, :, start:end] for name, t in packed.fields.items()}
        tensors["sink"] = packed.sink[:, :, start:end]
        metadata = {"kind": packed.kind, "fingerprint": self.fingerprint(), "start": str(start)}
        return safetensors_save({n: t.contiguous().cpu() for n, t in tensors.items()}, metadata)

    def append_block(self, packed: KVQuantCache, data: bytes) -> KVQuantCache:
        """Append a block made by `block_to_bytes` whose first token is the cache's next one."""
        metadata, tensors = _read_payload(data)
        if metadata.get("fingerprint") != self.fingerprint():
            raise ValueError("kvquant payload was made by a codec with another fingerprint")
        if metadata.get("kind") != packed.kind or set(tensors) != {*packed.fields, "sink"}:
            raise ValueError(f"payload holds {metadata.get('kind')} {sorted(tensors)}, "
                             f"the cache holds {packed.kind} {sorted(packed.fields)}")
        if int(metadata.get("start", -1)) != packed.num_tokens:
            raise ValueError(f"block starts at token {metadata.get('start')}, "
                             f"the cache holds {packed.num_tokens} tokens")
        device = packed.sink.device
        new = {name: tensors[name].to(device) for name in packed.fields}
        for name, value in new.items():
            expected = packed.fields[name].shape
            if value.shape[:2] != expected[:2] or value.shape[3:] != expected[3:]:
                raise ValueError(f"payload {name} has shape {tuple(value.shape)}, "
                                 f"the cache holds {tuple(expected)}")
        sink = tensors["sink"].to(device)
        start, count = packed.num_tokens, new["codes"].shape[2]
        if start + count > packed.capacity:
            self.reserve(packed, start + count)
        for name, value in new.items():
            packed.fields[name][:, :, start : start + count] = value
        packed.sink = torch.cat((packed.sink, sink), dim=2)
        packed.num_tokens = start + count
        return packed

    def to_bytes(self, packed: KVQuantCache) -> bytes:
        return self.block_to_bytes(packed, 0, packed.num_tokens)

    def from_bytes(self, data: bytes, device: torch.device | str = "cpu") -> KVQuantCache:
        metadata, tensors = _read_payload(data)
        kind = metadata.get("kind")
        if kind not in ("keys", "values") or "codes" not in tensors:
            raise ValueError("not a kvquant keys/values payload")
        batch, heads = tensors["codes"].shape[:2]
        packed = self._new(kind, batch, heads, device, tensors["codes"].shape[2])
        return self.append_block(packed, data)


def _read_payload(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors payload; safetensors.torch.load drops the metadata,
    so it is read from the header (u64 little-endian length, then JSON)."""
    try:
        (header_len,) = struct.unpack_from("<Q", data)
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        return metadata, safetensors_load(data)
    except (struct.error, ValueError, SafetensorError) as error:
        raise ValueError(f"not a kvquant payload: {error}") from None


def _digest(calibration: KVQuantCalibration) -> str:
    """Content hash of an artifact: blocks made with other constants must never mix."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(calibration.tensors().items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()

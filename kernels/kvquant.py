"""The `kvquant` codec: calibrated non-uniform pre-RoPE keys, per-token values, sparse outliers.

    codec = make_codec("kvquant", head_dim=64, calibration="smollm2.kvq.safetensors", bits=3,
                       outliers=0.01, sink_tokens=1).for_layer(i)
    keys = codec.encode_keys(k_pre_rope, positions)    # k: [B, H_kv, T, D], positions: [T] or [B, T]
    scores = codec.key_scores(q_post_rope, keys)       # RoPE applied to the keys inside the kernel

Calibration is per layer, so a codec serves one layer: pass `layer=` or call `for_layer(i)`
(copies share the loaded artifact). Per vector (one token of one KV head) the cache stores
D*bits/8 bytes of codes and `ceil(outliers * D)` outlier slots of (index: 1 byte, delta: fp16);
values add an fp16 scale and zero point; each token stores its int32 position per batch row; the
first `sink_tokens` tokens are also kept exactly (fp16) and read from there. The per-channel key
constants and codebooks live in the calibration artifact, shared by every sequence like weights.
Research notes: research/kvquant.md.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from kvpack.kernels import kvquant_reference as reference
from kvpack.kernels.codec import KVCodec, register_codec, should_use_triton
from kvpack.kernels.kvquant_calibration import KVQuantCalibration


@dataclass
class KVQuantKeys:
    """Packed pre-RoPE keys of one layer; tensors hold `capacity >= num_tokens` token slots."""

    codes: torch.Tensor  # uint8 [B, H, C, D*bits/8]
    outlier_index: torch.Tensor  # uint8 [B, H, C, S] channel of each outlier slot
    outlier_delta: torch.Tensor  # fp16 [B, H, C, S] k - dequantized dense k (0: unused slot)
    positions: torch.Tensor  # int32 [B, C] RoPE position of each token
    sink: torch.Tensor  # fp16 [B, H, num_sink, D] exact pre-RoPE keys of the first tokens
    num_tokens: int

    def used(self) -> dict[str, torch.Tensor]:
        """The stored tensors, trimmed to the tokens in use."""
        n = self.num_tokens
        return {
            "codes": self.codes[:, :, :n],
            "outlier_index": self.outlier_index[:, :, :n],
            "outlier_delta": self.outlier_delta[:, :, :n],
            "positions": self.positions[:, :n],
            "sink": self.sink,
        }


@dataclass
class KVQuantValues:
    """Packed values of one layer; tensors hold `capacity >= num_tokens` token slots."""

    codes: torch.Tensor  # uint8 [B, H, C, D*bits/8]
    scale: torch.Tensor  # fp16 [B, H, C] per-token scale
    zero: torch.Tensor  # fp16 [B, H, C] per-token zero point
    outlier_index: torch.Tensor  # uint8 [B, H, C, S]
    outlier_delta: torch.Tensor  # fp16 [B, H, C, S]
    sink: torch.Tensor  # fp16 [B, H, num_sink, D]
    num_tokens: int

    def used(self) -> dict[str, torch.Tensor]:
        n = self.num_tokens
        return {
            "codes": self.codes[:, :, :n],
            "scale": self.scale[:, :, :n],
            "zero": self.zero[:, :, :n],
            "outlier_index": self.outlier_index[:, :, :n],
            "outlier_delta": self.outlier_delta[:, :, :n],
            "sink": self.sink,
        }


# The token axis of each appendable tensor: dim 2 ([B, H, T, ...]), except positions [B, T].
_TOKEN_DIM = {"positions": 1}


def _append(packed, new: dict[str, torch.Tensor], sink_new: torch.Tensor, sink_tokens: int):
    """Write `new` (all tensors with the same number of new tokens) after packed.num_tokens,
    doubling capacity when full, and fill the sink with the first tokens ever appended."""
    start = packed.num_tokens
    count = new["codes"].shape[2]
    for name, value in new.items():
        dim = _TOKEN_DIM.get(name, 2)
        buffer = getattr(packed, name)
        if start + count > buffer.shape[dim]:
            shape = list(buffer.shape)
            shape[dim] = max(2 * buffer.shape[dim], start + count)
            grown = buffer.new_empty(shape)
            grown.narrow(dim, 0, start).copy_(buffer.narrow(dim, 0, start))
            setattr(packed, name, grown)
            buffer = grown
        buffer.narrow(dim, start, count).copy_(value)
    missing = sink_tokens - packed.sink.shape[2]
    if missing > 0:
        packed.sink = torch.cat((packed.sink, sink_new[:, :, :missing].half()), dim=2)
    packed.num_tokens = start + count
    return packed


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
        qnorm: bool = True,
        use_triton: bool | None = None,
    ) -> None:
        super().__init__(head_dim=head_dim, use_triton=use_triton)
        if not isinstance(calibration, KVQuantCalibration):
            calibration = KVQuantCalibration.load(calibration)
        outliers = calibration.outliers if outliers is None else float(outliers)
        if not 0.0 <= outliers < 0.5:
            raise ValueError(f"outliers must be a fraction in [0, 0.5), got {outliers}")
        calibration.check(head_dim=head_dim, bits=bits, outliers=outliers)
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
        reference.row_bytes(head_dim, bits)
        self.calibration = calibration
        self.bits = bits
        self.outliers = outliers
        self.sink_tokens = int(sink_tokens)
        self.qnorm = bool(qnorm)
        # Slots per vector: the outlier fraction rounded up, so 1% of 64 channels is 1 slot.
        self.num_slots = math.ceil(outliers * head_dim - 1e-9) if outliers > 0 else 0
        if self.num_slots >= head_dim:
            raise ValueError(f"outliers={outliers} leaves no dense channels at head_dim {head_dim}")
        self.index_dtype = torch.uint8 if head_dim <= 256 else torch.int16
        self.layer = None if layer is None else self._check_layer(layer)
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._calibration_digest = _digest(calibration)

    # -- identity ---------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {
            "calibration": self._calibration_digest,
            "bits": self.bits,
            "outliers": self.outliers,
            "sink_tokens": self.sink_tokens,
            "qnorm": self.qnorm,
        }

    def _check_layer(self, layer: int) -> int:
        if not 0 <= int(layer) < self.calibration.num_layers:
            raise ValueError(f"layer must be in [0, {self.calibration.num_layers}), got {layer}")
        return int(layer)

    def for_layer(self, layer: int) -> KVQuantCodec:
        """This codec bound to one layer's calibration (shares the loaded artifact)."""
        bound = copy.copy(self)
        bound.layer = self._check_layer(layer)
        bound._tables = {}
        return bound

    def tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self.layer is None:
            if self.calibration.num_layers != 1:
                raise ValueError("kvquant codecs are per layer: pass layer= or use for_layer(i)")
            self.layer = 0
        device = torch.device(device)
        if device not in self._tables:
            tables = self.calibration.layer_tables(self.layer, self.bits, self.qnorm)
            tables["inv_freq"] = self.calibration.inv_freq.float()
            self._tables[device] = {name: t.to(device) for name, t in tables.items()}
        return self._tables[device]

    def _check_kv(self, x: torch.Tensor, name: str) -> None:
        expected_heads = self.calibration.num_kv_heads
        if x.dim() != 4 or x.shape[1] != expected_heads or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"{name} must be [B, {expected_heads}, T, {self.head_dim}], got {tuple(x.shape)}"
            )

    # -- keys -------------------------------------------------------------------------------
    def _positions(self, k: torch.Tensor, positions: torch.Tensor | None, first: torch.Tensor):
        batch, _, num_tokens, _ = k.shape
        if positions is None:
            steps = torch.arange(num_tokens, device=k.device, dtype=torch.int32)
            return (first[:, None] + steps[None, :]).to(torch.int32)
        positions = torch.as_tensor(positions, device=k.device)
        if positions.dim() == 1:
            positions = positions[None].expand(batch, -1)
        if positions.shape != (batch, num_tokens):
            raise ValueError(
                f"positions must be [T] or [B, T] = [{batch}, {num_tokens}], "
                f"got {tuple(positions.shape)}"
            )
        return positions.to(torch.int32)

    def _quantize_keys(self, k: torch.Tensor):
        t = self.tables(k.device)
        args = (t["key_zero"], t["key_scale"], t["key_boundaries"], t["key_lut"], self.bits,
                self.num_slots)
        if should_use_triton(k, self.use_triton):
            from kvpack.kernels import kvquant_triton

            return kvquant_triton.quantize_keys(k, *args, index_dtype=self.index_dtype)
        codes, index, delta = reference.quantize_keys(k, *args)
        return codes, index.to(self.index_dtype), delta

    def encode_keys(self, k: torch.Tensor, positions: torch.Tensor | None = None) -> KVQuantKeys:
        self._check_kv(k, "k")
        batch, heads, _, _ = k.shape
        empty = KVQuantKeys(
            codes=k.new_empty(batch, heads, 0, self.head_dim * self.bits // 8, dtype=torch.uint8),
            outlier_index=k.new_empty(batch, heads, 0, self.num_slots, dtype=self.index_dtype),
            outlier_delta=k.new_empty(batch, heads, 0, self.num_slots, dtype=torch.float16),
            positions=k.new_empty(batch, 0, dtype=torch.int32),
            sink=k.new_empty(batch, heads, 0, self.head_dim, dtype=torch.float16),
            num_tokens=0,
        )
        return self.append_keys(empty, k, positions)

    def append_keys(
        self, keys: KVQuantKeys, k: torch.Tensor, positions: torch.Tensor | None = None
    ) -> KVQuantKeys:
        self._check_kv(k, "k")
        if keys.num_tokens:
            first = keys.positions[:, keys.num_tokens - 1] + 1
        else:
            first = torch.zeros(k.shape[0], dtype=torch.int32, device=k.device)
        positions = self._positions(k, positions, first)
        codes, index, delta = self._quantize_keys(k)
        new = {"codes": codes, "outlier_index": index, "outlier_delta": delta,
               "positions": positions}
        return _append(keys, new, k, self.sink_tokens)

    def key_scores(self, q: torch.Tensor, keys: KVQuantKeys) -> torch.Tensor:
        """q [B, H_q, T_q, D] after RoPE -> float32 scores [B, H_q, T_q, T] (unscaled)."""
        if q.dim() != 4 or q.shape[-1] != self.head_dim or q.shape[0] != keys.codes.shape[0]:
            raise ValueError(
                f"q must be [{keys.codes.shape[0]}, H_q, T_q, {self.head_dim}], got {tuple(q.shape)}"
            )
        t = self.tables(q.device)
        used = keys.used()
        num_sink = keys.sink.shape[2]
        out = torch.empty(*q.shape[:3], keys.num_tokens, dtype=torch.float32, device=q.device)
        scaling = self.calibration.attention_scaling
        if num_sink:
            sink = reference.apply_rope(keys.sink, used["positions"][:, :num_sink], t["inv_freq"],
                                        scaling)
            out[..., :num_sink] = reference.scores(q, sink)
        if should_use_triton(q, self.use_triton):
            from kvpack.kernels import kvquant_triton

            kvquant_triton.key_scores(
                q, used["codes"], used["outlier_index"], used["outlier_delta"], used["positions"],
                t["key_zero"], t["key_scale"], t["key_lut"], t["inv_freq"], scaling, self.bits,
                token_start=num_sink, out=out,
            )
        elif keys.num_tokens > num_sink:
            dense = reference.dequantize_keys(
                used["codes"][:, :, num_sink:], used["outlier_index"][:, :, num_sink:],
                used["outlier_delta"][:, :, num_sink:], t["key_zero"], t["key_scale"],
                t["key_lut"], self.bits, self.head_dim,
            )
            rotated = reference.apply_rope(dense, used["positions"][:, num_sink:], t["inv_freq"],
                                           scaling)
            out[..., num_sink:] = reference.scores(q, rotated)
        return out

    def dequantize_keys(self, keys: KVQuantKeys) -> torch.Tensor:
        """Pre-RoPE float32 keys as the cache holds them (sink exact): for tests and fidelity."""
        t = self.tables(keys.codes.device)
        used = keys.used()
        dense = reference.dequantize_keys(
            used["codes"], used["outlier_index"], used["outlier_delta"], t["key_zero"],
            t["key_scale"], t["key_lut"], self.bits, self.head_dim,
        )
        dense[:, :, : keys.sink.shape[2]] = keys.sink.float()
        return dense

    # -- values -----------------------------------------------------------------------------
    def _quantize_values(self, v: torch.Tensor):
        t = self.tables(v.device)
        args = (t["value_boundaries"], t["value_lut"], self.bits, self.num_slots)
        if should_use_triton(v, self.use_triton):
            from kvpack.kernels import kvquant_triton

            return kvquant_triton.quantize_values(v, *args, index_dtype=self.index_dtype)
        codes, scale, zero, index, delta = reference.quantize_values(v, *args)
        return codes, scale, zero, index.to(self.index_dtype), delta

    def encode_values(self, v: torch.Tensor) -> KVQuantValues:
        self._check_kv(v, "v")
        batch, heads, _, _ = v.shape
        empty = KVQuantValues(
            codes=v.new_empty(batch, heads, 0, self.head_dim * self.bits // 8, dtype=torch.uint8),
            scale=v.new_empty(batch, heads, 0, dtype=torch.float16),
            zero=v.new_empty(batch, heads, 0, dtype=torch.float16),
            outlier_index=v.new_empty(batch, heads, 0, self.num_slots, dtype=self.index_dtype),
            outlier_delta=v.new_empty(batch, heads, 0, self.num_slots, dtype=torch.float16),
            sink=v.new_empty(batch, heads, 0, self.head_dim, dtype=torch.float16),
            num_tokens=0,
        )
        return self.append_values(empty, v)

    def append_values(self, values: KVQuantValues, v: torch.Tensor) -> KVQuantValues:
        self._check_kv(v, "v")
        codes, scale, zero, index, delta = self._quantize_values(v)
        new = {"codes": codes, "scale": scale, "zero": zero, "outlier_index": index,
               "outlier_delta": delta}
        return _append(values, new, v, self.sink_tokens)

    def attend_values(self, p: torch.Tensor, values: KVQuantValues) -> torch.Tensor:
        """p [B, H_q, T_q, T] -> float32 [B, H_q, T_q, D] = p . v^ (sink tokens exact)."""
        if p.dim() != 4 or p.shape[-1] != values.num_tokens or p.shape[0] != values.codes.shape[0]:
            raise ValueError(
                f"p must be [{values.codes.shape[0]}, H_q, T_q, {values.num_tokens}], "
                f"got {tuple(p.shape)}"
            )
        t = self.tables(p.device)
        used = values.used()
        num_sink = values.sink.shape[2]
        if should_use_triton(p, self.use_triton):
            from kvpack.kernels import kvquant_triton

            out = kvquant_triton.attend_values(
                p, used["codes"], used["scale"], used["zero"], used["outlier_index"],
                used["outlier_delta"], t["value_lut"], self.bits, token_start=num_sink,
            )
        else:
            dense = reference.dequantize_values(
                used["codes"][:, :, num_sink:], used["scale"][:, :, num_sink:],
                used["zero"][:, :, num_sink:], used["outlier_index"][:, :, num_sink:],
                used["outlier_delta"][:, :, num_sink:], t["value_lut"], self.bits, self.head_dim,
            )
            out = reference.attend(p[..., num_sink:], dense)
        if num_sink:
            out = out + reference.attend(p[..., :num_sink], values.sink)
        return out

    def dequantize_values(self, values: KVQuantValues) -> torch.Tensor:
        t = self.tables(values.codes.device)
        used = values.used()
        dense = reference.dequantize_values(
            used["codes"], used["scale"], used["zero"], used["outlier_index"],
            used["outlier_delta"], t["value_lut"], self.bits, self.head_dim,
        )
        dense[:, :, : values.sink.shape[2]] = values.sink.float()
        return dense

    # -- storage ----------------------------------------------------------------------------
    def nbytes(self, packed: KVQuantKeys | KVQuantValues) -> int:
        return sum(t.numel() * t.element_size() for t in packed.used().values())

    def to_bytes(self, packed: KVQuantKeys | KVQuantValues) -> bytes:
        kind = "keys" if isinstance(packed, KVQuantKeys) else "values"
        tensors = {name: t.contiguous().cpu() for name, t in packed.used().items()}
        return safetensors_save(tensors, metadata={"kind": kind, "fingerprint": self.fingerprint()})

    def from_bytes(self, data: bytes, device: torch.device | str = "cpu"):
        tensors = safetensors_load(data)
        kind = "keys" if "positions" in tensors else "values"
        container = KVQuantKeys if kind == "keys" else KVQuantValues
        names = {f.name for f in fields(container)} - {"num_tokens"}
        if set(tensors) != names:
            raise ValueError(f"kvquant payload has tensors {sorted(tensors)}, expected {sorted(names)}")
        tensors = {name: t.to(device) for name, t in tensors.items()}
        num_tokens = tensors["codes"].shape[2]
        return container(**tensors, num_tokens=num_tokens)


def _digest(calibration: KVQuantCalibration) -> str:
    """Content hash of an artifact: blocks made with other constants must never mix."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(calibration.tensors().items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()

"""The KVQuant calibration artifact: what `kvpack calibrate` writes and the `kvquant` codec reads.

One safetensors file. Tensors (L layers, H KV heads, D head_dim, b each calibrated bit width):

    key.zero, key.scale        [L, H, D]  per-channel, pre-RoPE zero point and scale (fp32)
    key.centroids.{b}          [L, 2**b]  sorted per-layer codebook in normalized units
    value.centroids.{b}        [L, 2**b]
    key.qnorm.{b}, value.qnorm.{b}  [L, 2]  Q-Norm (scale, offset): lut = centroids * scale + offset
    rope.inv_freq              [D/2]      the model's RoPE inverse frequencies (scaling applied)
    key.sensitivity, value.sensitivity  [L, len(bits)]  (optional) measured loss of quantizing
                               one layer's keys (values) alone at each calibrated bit width: mean
                               KL divergence (nats per token) from the unquantized model on
                               calibration text; `allocate_bits` spends an average bit budget
                               where it helps most

The safetensors header's metadata holds one JSON document under "kvpack.kvquant": format version,
model id, model config (layers, heads, head_dim, rope parameters), bits, outlier fraction, sink
tokens, calibration text hash and token count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .kvquant_reference import check_bits

ARTIFACT_FORMAT = 1
METADATA_KEY = "kvpack.kvquant"


@dataclass
class KVQuantCalibration:
    """Per-layer KVQuant constants of one model.

    `metadata` keys: model_id, num_layers, num_kv_heads, head_dim, attention_scaling, rope (dict:
    the model's rope parameters, for the record), bits (list), outliers, sink_tokens, text_sha256,
    num_tokens.
    """

    metadata: dict[str, Any]
    key_zero: torch.Tensor
    key_scale: torch.Tensor
    key_centroids: dict[int, torch.Tensor]
    value_centroids: dict[int, torch.Tensor]
    key_qnorm: dict[int, torch.Tensor]
    value_qnorm: dict[int, torch.Tensor]
    inv_freq: torch.Tensor
    key_sensitivity: torch.Tensor | None = None
    value_sensitivity: torch.Tensor | None = None
    source: str = field(default="<memory>")

    @property
    def num_layers(self) -> int:
        return int(self.metadata["num_layers"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.metadata["num_kv_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.metadata["head_dim"])

    @property
    def bits(self) -> list[int]:
        return [int(b) for b in self.metadata["bits"]]

    @property
    def outliers(self) -> float:
        return float(self.metadata["outliers"])

    @property
    def attention_scaling(self) -> float:
        return float(self.metadata.get("attention_scaling", 1.0))

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "key.zero": self.key_zero,
            "key.scale": self.key_scale,
            "rope.inv_freq": self.inv_freq,
        }
        for bits in self.bits:
            tensors[f"key.centroids.{bits}"] = self.key_centroids[bits]
            tensors[f"value.centroids.{bits}"] = self.value_centroids[bits]
            tensors[f"key.qnorm.{bits}"] = self.key_qnorm[bits]
            tensors[f"value.qnorm.{bits}"] = self.value_qnorm[bits]
        if self.key_sensitivity is not None and self.value_sensitivity is not None:
            tensors["key.sensitivity"] = self.key_sensitivity
            tensors["value.sensitivity"] = self.value_sensitivity
        return {name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}

    def save(self, path: str | Path) -> None:
        metadata = {"format": ARTIFACT_FORMAT, **self.metadata}
        save_file(self.tensors(), str(path), metadata={METADATA_KEY: json.dumps(metadata)})

    @classmethod
    def load(cls, path: str | Path) -> KVQuantCalibration:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"calibration: no such file {str(path)!r}")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"calibration: {str(path)!r} is not a kvpack KVQuant artifact")
        metadata = json.loads(raw)
        if metadata.pop("format", None) != ARTIFACT_FORMAT:
            raise ValueError(f"calibration: {str(path)!r} has an unknown artifact format")
        tensors = load_file(str(path))
        bits = [int(b) for b in metadata["bits"]]
        return cls(
            metadata=metadata,
            key_zero=tensors["key.zero"],
            key_scale=tensors["key.scale"],
            key_centroids={b: tensors[f"key.centroids.{b}"] for b in bits},
            value_centroids={b: tensors[f"value.centroids.{b}"] for b in bits},
            key_qnorm={b: tensors[f"key.qnorm.{b}"] for b in bits},
            value_qnorm={b: tensors[f"value.qnorm.{b}"] for b in bits},
            inv_freq=tensors["rope.inv_freq"],
            key_sensitivity=tensors.get("key.sensitivity"),
            value_sensitivity=tensors.get("value.sensitivity"),
            source=str(path),
        )

    def check(
        self,
        *,
        head_dim: int | None = None,
        bits: int | None = None,
        outliers: float | None = None,
        model_id: str | None = None,
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
    ) -> None:
        """Raise ValueError naming the first way this artifact does not fit its user."""
        expected = {
            "head_dim": (head_dim, self.head_dim),
            "num_layers": (num_layers, self.num_layers),
            "num_kv_heads": (num_kv_heads, self.num_kv_heads),
            "model_id": (model_id, self.metadata.get("model_id")),
        }
        for name, (wanted, actual) in expected.items():
            if wanted is not None and wanted != actual:
                raise ValueError(
                    f"calibration {self.source!r} is for {name}={actual!r}, not {wanted!r}"
                )
        if bits is not None:
            check_bits(bits)
            if bits not in self.bits:
                raise ValueError(
                    f"calibration {self.source!r} has no {bits}-bit codebooks "
                    f"(calibrated bits: {self.bits})"
                )
        if outliers is not None and abs(outliers - self.outliers) > 1e-9:
            raise ValueError(
                f"calibration {self.source!r} was made with outliers={self.outliers}, not "
                f"{outliers}: key scales are the calibrated outlier thresholds"
            )

    def layer_tables(
        self, layer: int, bits: int, qnorm: bool | None, value_bits: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The tables one layer's codec needs: key zero/scale, and boundaries/lut for K (`bits`)
        and V (`value_bits`, default `bits`). `qnorm`: apply Q-Norm to the luts (True), never
        (False), or only to 2-bit codebooks (None: the paper uses it for its 2-bit models; on
        SmolLM2 it costs fidelity at 3 bits, docs/eval.md)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        value_bits = bits if value_bits is None else value_bits
        self.check(bits=bits)
        self.check(bits=value_bits)
        tables = {"key_zero": self.key_zero[layer], "key_scale": self.key_scale[layer]}
        for kind, centroids, norms, width in (
            ("key", self.key_centroids, self.key_qnorm, bits),
            ("value", self.value_centroids, self.value_qnorm, value_bits),
        ):
            sorted_centroids = centroids[width][layer].float().sort().values
            tables[f"{kind}_boundaries"] = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
            use_norm = width == 2 if qnorm is None else qnorm
            norm_scale, norm_offset = norms[width][layer].float().tolist() if use_norm \
                else (1.0, 0.0)
            tables[f"{kind}_lut"] = sorted_centroids * norm_scale + norm_offset
        return {name: t.float().contiguous() for name, t in tables.items()}

    @property
    def has_sensitivity(self) -> bool:
        return self.key_sensitivity is not None and self.value_sensitivity is not None

    def allocate_bits(self, avg_bits: float) -> tuple[list[int], list[int]]:
        """Per-layer (key bits, value bits) with mean code bits over all K and V <= `avg_bits`,
        minimizing the summed measured sensitivity (see `allocate_bits`)."""
        if not self.has_sensitivity:
            raise ValueError(
                f"calibration {self.source!r} holds no per-layer sensitivities: re-run "
                "`kvpack calibrate` (with --sensitivity-tokens > 0) to use avg_bits"
            )
        return allocate_bits(self.key_sensitivity, self.value_sensitivity, self.bits, avg_bits)


def allocate_bits(
    key_sensitivity: torch.Tensor,
    value_sensitivity: torch.Tensor,
    bits: list[int],
    avg_bits: float,
) -> tuple[list[int], list[int]]:
    """Mixed-precision allocation: one bit width per layer for keys and one for values.

    Every (layer, tensor) holds the same number of elements, so the mean code bits per number is
    sum(chosen bits) / (2 L). The allocation minimizes sum of sensitivity[l, chosen] subject to
    sum(chosen bits) <= floor(avg_bits * 2 L) (exact, by dynamic programming over the integer
    bit total). Sensitivities are first made non-increasing in bits (more bits never hurt; a
    measured increase is noise). Ties prefer fewer bits, then lower layers.

    Raises:
        ValueError: avg_bits outside [min(bits), max(bits)], or shapes that do not match.
    """
    bits = [int(b) for b in bits]
    for b in bits:
        check_bits(b)
    if list(key_sensitivity.shape) != list(value_sensitivity.shape) or \
            key_sensitivity.dim() != 2 or key_sensitivity.shape[1] != len(bits):
        raise ValueError(
            f"sensitivities must both be [layers, {len(bits)}], got "
            f"{tuple(key_sensitivity.shape)} and {tuple(value_sensitivity.shape)}"
        )
    if not min(bits) - 1e-9 <= avg_bits <= max(bits) + 1e-9:
        raise ValueError(f"avg_bits must be in [{min(bits)}, {max(bits)}] (the calibrated bit "
                         f"widths), got {avg_bits}")
    order = sorted(range(len(bits)), key=lambda i: bits[i])
    options = [bits[i] for i in order]
    items = []
    for table in (key_sensitivity, value_sensitivity):
        table = table.double()[:, order].clamp_min(0)
        table = torch.cummin(table, dim=1).values
        items.extend(table.tolist())
    num_items = len(items)
    budget = math.floor(avg_bits * num_items + 1e-6)
    # best[t] = (loss, choices) with total bits exactly t over the items seen so far
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for losses in items:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for total, (loss, choices) in best.items():
            for option, option_loss in zip(options, losses, strict=True):
                new_total = total + option
                if new_total > budget:
                    continue
                candidate = (loss + option_loss, (*choices, option))
                held = nxt.get(new_total)
                if held is None or candidate[0] < held[0] - 1e-15:
                    nxt[new_total] = candidate
        best = nxt
    if not best:
        raise ValueError(f"avg_bits {avg_bits} is below the smallest calibrated bit width")
    _, choices = min(best.values(), key=lambda entry: (entry[0], sum(entry[1])))
    layers = num_items // 2
    return list(choices[:layers]), list(choices[layers:])

"""The KVQuant calibration artifact: what `kvpack calibrate` writes and the `kvquant` codec reads.

One safetensors file. Tensors (L layers, H KV heads, D head_dim, b each calibrated bit width):

    key.zero, key.scale        [L, H, D]  per-channel, pre-RoPE zero point and scale (fp32)
    key.centroids.{b}          [L, 2**b]  sorted per-layer codebook in normalized units
    value.centroids.{b}        [L, 2**b]
    key.qnorm.{b}, value.qnorm.{b}  [L, 2]  Q-Norm (scale, offset): lut = centroids * scale + offset
    rope.inv_freq              [D/2]      the model's RoPE inverse frequencies (scaling applied)

The safetensors header's metadata holds one JSON document under "kvpack.kvquant": format version,
model id, model config (layers, heads, head_dim, rope parameters), bits, outlier fraction, sink
tokens, calibration text hash and token count.
"""

from __future__ import annotations

import json
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

    def layer_tables(self, layer: int, bits: int, qnorm: bool) -> dict[str, torch.Tensor]:
        """The tables one layer's codec needs: key zero/scale, and boundaries/lut for K and V."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        self.check(bits=bits)
        tables = {"key_zero": self.key_zero[layer], "key_scale": self.key_scale[layer]}
        for kind, centroids, norms in (
            ("key", self.key_centroids, self.key_qnorm),
            ("value", self.value_centroids, self.value_qnorm),
        ):
            sorted_centroids = centroids[bits][layer].float().sort().values
            tables[f"{kind}_boundaries"] = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
            norm_scale, norm_offset = norms[bits][layer].float().tolist() if qnorm else (1.0, 0.0)
            tables[f"{kind}_lut"] = sorted_centroids * norm_scale + norm_offset
        return {name: t.float().contiguous() for name, t in tables.items()}

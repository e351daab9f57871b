"""The `qjl` codec (QJL, arXiv 2406.03482): 1-bit JL sketches of keys with per-group outlier
channels, per-token 2/4-bit values (shared with kivi), a full-precision window of recent tokens.

Bytes per token and KV head (s = bytes of the input dtype): keys m/8 + s (inlier signs and norm)
+ m_o/8 + s (outlier signs and norm, only with outliers) + n_out/G (outlier channel indices);
values as in kernels/values.py.

The sketches are drawn from `seed` (kernels/qjl_sketch.py); give each layer its own seed (e.g.
base seed + layer index) so that layers use independent sketches, as the paper does.
"""

from __future__ import annotations

from typing import Any

import torch

from . import qjl_reference, qjl_triton
from .cache import FieldSpec
from .codec import register_codec
from .kivi import check_token_group, check_window
from .packed_codec import KeyFormat, PackedKVCodec
from .qjl_sketch import make_sketches, rounded
from .queries_triton import sketch_rows_plane_major
from .values import PerTokenValues, default_channel_group


class QjlKeys(KeyFormat):
    def __init__(
        self, head_dim, sketch_dim, outlier_channels, outlier_sketch_dim, seed, group_size
    ) -> None:
        if sketch_dim <= 0 or sketch_dim % 8:
            raise ValueError(f"sketch_dim must be a positive multiple of 8, got {sketch_dim}")
        if not 0 <= outlier_channels <= min(head_dim, 255):
            raise ValueError(
                f"outlier_channels must be in [0, min(head_dim, 255)], got {outlier_channels}"
            )
        if outlier_channels and (outlier_sketch_dim <= 0 or outlier_sketch_dim % 8):
            raise ValueError(
                "outlier_sketch_dim must be a positive multiple of 8 when outlier_channels > 0, "
                f"got {outlier_sketch_dim}"
            )
        check_token_group(group_size)
        self.head_dim, self.sketch_dim, self.group_size = head_dim, sketch_dim, group_size
        self.num_outliers = outlier_channels
        self.outlier_sketch_dim = outlier_sketch_dim if outlier_channels else 0
        self.sketches = make_sketches(head_dim, sketch_dim, self.outlier_sketch_dim, seed)
        self._prepared: dict[tuple, Any] = {}

    def params(self) -> dict[str, Any]:
        return {
            "sketch_dim": self.sketch_dim,
            "outlier_channels": self.num_outliers,
            "outlier_sketch_dim": self.outlier_sketch_dim,
            "sketch_digest": self.sketches.digest,
        }

    def field_specs(self, dtype: torch.dtype) -> list[FieldSpec]:
        specs = [
            FieldSpec("signs", (self.sketch_dim // 8,), torch.uint8),
            FieldSpec("norm", (), dtype),
        ]
        if self.num_outliers:
            specs += [
                FieldSpec("outlier_signs", (self.outlier_sketch_dim // 8,), torch.uint8),
                FieldSpec("outlier_norm", (), dtype),
                FieldSpec(
                    "outlier_index",
                    (self.num_outliers,),
                    torch.uint8,
                    tokens_per_row=self.group_size,
                ),
            ]
        return specs

    def _sketches(
        self, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sketches as keys of `dtype` see them (float32), on `device`."""
        key = ("rounded", dtype, device)
        if key not in self._prepared:
            self._prepared[key] = (
                rounded(self.sketches.inlier, dtype).to(device),
                rounded(self.sketches.outlier, dtype).to(device),
            )
        return self._prepared[key]

    def _planes(self, which: str, matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = ("planes", which, dtype, matrix.device)
        if key not in self._prepared:
            if matrix.shape[0] == 0:  # no outliers: the kernels never read it
                self._prepared[key] = torch.zeros(1, dtype=dtype, device=matrix.device)
            else:
                self._prepared[key] = qjl_triton.plane_major(matrix, dtype)
        return self._prepared[key]

    def pack(self, x: torch.Tensor, use_triton: bool) -> dict[str, torch.Tensor]:
        sketch, outlier_sketch = self._sketches(x.dtype, x.device)
        if not use_triton:
            return qjl_reference.quantize_keys(
                x, sketch, outlier_sketch, self.num_outliers, self.group_size
            )
        return qjl_triton.quantize_keys(
            x,
            self._planes("inlier", sketch, x.dtype),
            self._planes("outlier", outlier_sketch, x.dtype),
            self.sketch_dim,
            self.outlier_sketch_dim,
            self.num_outliers,
            self.group_size,
        )

    def packed_scores(self, q, fields, num_tokens, out, use_triton) -> None:
        key_dtype = fields["norm"].dtype
        sketch, outlier_sketch = self._sketches(key_dtype, q.device)
        if not use_triton:
            out.copy_(
                qjl_reference.key_scores(
                    q,
                    fields,
                    num_tokens,
                    sketch,
                    outlier_sketch,
                    self.num_outliers,
                    self.group_size,
                )
            )
            return
        key = ("score operands", key_dtype, q.device)
        if key not in self._prepared:
            rows = sketch_rows_plane_major(sketch, qjl_triton.bytes_pad(self.sketch_dim // 8))
            # a bound on |S_i q| / ||q|| (1e-3 above the largest row norm for rounding)
            row_norm = sketch.norm(dim=1).max().item() * 1.001
            if self.num_outliers:
                operands = qjl_triton.outlier_operand_table(
                    outlier_sketch, *qjl_triton.outlier_operand_format(key_dtype)
                )
            else:  # the kernel never reads them
                placeholder = torch.zeros(1, 1, 1, device=q.device)
                operands = {"table": placeholder, "colsum": placeholder}
            self._prepared[key] = (rows, row_norm, operands)
        rows, row_norm, operands = self._prepared[key]
        qjl_triton.key_scores(
            q,
            fields,
            num_tokens,
            out,
            rows,
            row_norm,
            operands,
            self.sketch_dim,
            self.num_outliers,
            self.group_size,
        )


@register_codec
class QjlCodec(PackedKVCodec):
    """Args:
    head_dim: a multiple of 16 (at most 255 channels can be outliers).
    sketch_dim: m, sketch rows (sign bits per key) for the inlier part, a multiple of 8.
    outlier_channels: channels per token group treated as outliers (0 disables the outlier part).
    outlier_sketch_dim: m_o, sign bits per key for the outlier part, a multiple of 8.
    seed: sketch seed; use a different one per layer.
    value_bits: 2 or 4, per-token value codes.
    group_size: tokens per outlier group (power of two >= 16); also the packing cadence.
    window: most recent tokens kept in full precision, default 0.
    value_group_size: channels per value quantization group (default 32, or 16 if head_dim
        needs it).
    """

    name = "qjl"

    def __init__(
        self,
        *,
        head_dim: int,
        sketch_dim: int = 256,
        outlier_channels: int = 8,
        outlier_sketch_dim: int = 256,
        seed: int = 0,
        value_bits: int = 2,
        group_size: int = 32,
        window: int = 0,
        value_group_size: int | None = None,
        use_triton: bool | None = None,
    ) -> None:
        super().__init__(head_dim=head_dim, use_triton=use_triton)
        if head_dim % 16:
            raise ValueError(f"head_dim must be a multiple of 16, got {head_dim}")
        check_window(window)
        self.key_format = QjlKeys(
            head_dim, sketch_dim, outlier_channels, outlier_sketch_dim, seed, group_size
        )
        value_group = (
            default_channel_group(head_dim) if value_group_size is None else value_group_size
        )
        self.value_format = PerTokenValues(head_dim, value_bits, value_group)
        self.seed, self.group_size, self.window = seed, group_size, window

    def params(self) -> dict[str, Any]:
        return {
            **self.key_format.params(),
            "seed": self.seed,
            "group_size": self.group_size,
            "window": self.window,
            **self.value_format.params(),
        }

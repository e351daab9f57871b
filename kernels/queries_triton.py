"""One small Triton kernel that prepares queries for the score kernels (one launch instead of a
chain of PyTorch ops, which matters at decode where the score kernel itself takes microseconds).

Per query row r of a KV head (kernels/gqa.py), in float32:
- query_max[r] = max_c |q[r, c]| and query[r] = q[r] / query_max[r] (KIVI scores, QJL outliers);
- with a sketch S [m, D] (QJL): sq = S q[r] divided by the bound ||q[r]|| * max_i ||S_i||
  (Cauchy-Schwarz: within [-1, 1] without a pass over sq first, so every bit plane is a program of
  its own) as three int8 levels (kernels/int8_levels.py), laid out for the QJL score kernel's int8
  dots: planes[j, n, k] holds row 8k + j of the sketch, for column n = a * 2 R + 2 r + e of the row
  tile of R rows (level 2 a + e of local row r; level 3 is zero), so that one tensor-core dot per
  bit plane yields all levels of all rows; plus sketch_sum[j, r] = sum over plane j of the levels'
  value and sketch_scale[r] = the bound / LEVEL_UNITS (the factor back to sketch units).
The unfused PyTorch equivalent is inside kivi_reference / qjl_reference.key_scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gqa import rows_per_kv_head
from .int8_levels import UNITS_F, split_levels
from .triton_common import next_power_of_2

_TINY = torch.finfo(torch.float32).tiny


def sketch_rows_plane_major(sketch: torch.Tensor, num_bytes_pad: int) -> torch.Tensor:
    """sketch [m, D] float32 -> [8, num_bytes_pad, D] with [j, k] = row 8k + j, zero padded."""
    num_rows, head_dim = sketch.shape
    planes = torch.zeros(8, num_bytes_pad, head_dim, dtype=torch.float32, device=sketch.device)
    planes[:, : num_rows // 8] = sketch.reshape(num_rows // 8, 8, head_dim).transpose(0, 1)
    return planes


@triton.jit
def _prepare_queries_kernel(
    q_ptr,  # rows view [B, H_KV, M, HEAD_DIM], any strides, any float dtype
    sketch_ptr,  # [8, NB_PAD, HEAD_DIM] float32 plane-major sketch rows (unused without HAS_SKETCH)
    query_ptr,  # [B * H_KV * M, HEAD_DIM] float32 out
    query_max_ptr,  # [B * H_KV * M] float32 out
    planes_ptr,  # [B * H_KV, 8, 4 * ROWS_PAD, NB_PAD] int8 out (layout: module docstring)
    sketch_sum_ptr,  # [B * H_KV, 8, ROWS_PAD] float32 out
    sketch_scale_ptr,  # [B * H_KV, ROWS_PAD] float32 out
    sketch_row_norm,  # max_i ||S_i||
    num_rows,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    H_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    NB_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ROWS_PAD: tl.constexpr,
    HAS_SKETCH: tl.constexpr,
    TINY: tl.constexpr,
):
    """One program per (batch x KV head, tile of BLOCK_R rows, bit plane); with a sketch, BLOCK_R
    is the score kernel's row tile and padded rows (up to ROWS_PAD) get zero levels."""
    bh = tl.program_id(0).to(tl.int64)
    row_tile = tl.program_id(1)
    plane = tl.program_id(2)
    local = tl.arange(0, BLOCK_R)
    rows = row_tile * BLOCK_R + local
    row_mask = rows < num_rows
    row_ids = bh * num_rows + rows
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    q_rows = q_ptr + (bh // H_KV) * stride_qb + (bh % H_KV) * stride_qh + rows[:, None] * stride_qm
    mask = row_mask[:, None] & col_mask[None, :]
    q = tl.load(q_rows + cols[None, :] * stride_qd, mask=mask, other=0.0).to(tl.float32)
    if plane == 0:
        query_max = tl.maximum(tl.max(tl.abs(q), axis=1), TINY)
        tl.store(
            query_ptr + row_ids[:, None] * HEAD_DIM + cols[None, :],
            q / query_max[:, None],
            mask=mask,
        )
        tl.store(query_max_ptr + row_ids, query_max, mask=row_mask)
    if HAS_SKETCH:
        byte_cols = tl.arange(0, NB_PAD)
        bound = tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)) * sketch_row_norm, TINY)
        # this plane's sketch rows, transposed: [D_PAD, NB_PAD]
        rows_t = tl.load(
            sketch_ptr
            + plane * (NB_PAD * HEAD_DIM)
            + byte_cols[None, :] * HEAD_DIM
            + cols[:, None],
            mask=col_mask[:, None],
            other=0.0,
        )
        projection = tl.dot(q, rows_t, input_precision="ieee")
        hi, mid, lo, value = split_levels(projection / bound[:, None])
        # column of level 2 a + e of local row r: a * 2 * BLOCK_R + 2 * r + e
        column = row_tile * (4 * BLOCK_R) + 2 * local
        base = planes_ptr + (bh * 8 + plane) * (4 * ROWS_PAD * NB_PAD) + byte_cols[None, :]
        tl.store(base + column[:, None] * NB_PAD, hi.to(tl.int8))
        tl.store(base + (column + 1)[:, None] * NB_PAD, mid.to(tl.int8))
        tl.store(base + (column + 2 * BLOCK_R)[:, None] * NB_PAD, lo.to(tl.int8))
        tl.store(base + (column + 2 * BLOCK_R + 1)[:, None] * NB_PAD, tl.zeros_like(lo).to(tl.int8))
        tl.store(sketch_sum_ptr + (bh * 8 + plane) * ROWS_PAD + rows, tl.sum(value, axis=1))
        if plane == 0:
            tl.store(sketch_scale_ptr + bh * ROWS_PAD + rows, bound / UNITS_F)


def prepare_queries(
    q: torch.Tensor,
    num_kv_heads: int,
    sketch_planes: torch.Tensor | None = None,
    row_tile: int = 16,
    sketch_row_norm: float = 0.0,
) -> dict[str, torch.Tensor]:
    """q [B, H_q, T_q, D] -> {"query" [B*H_kv, M, D], "query_max" [B*H_kv, M]} (+ with a
    plane-major sketch whose rows have norms up to sketch_row_norm: "planes" int8
    [B*H_kv, 8, 4 * ROWS_PAD, NB_PAD], "sketch_sum" [B*H_kv, 8, ROWS_PAD] and "sketch_scale"
    [B*H_kv, ROWS_PAD], in tiles of `row_tile` rows, ROWS_PAD a multiple of it)."""
    rows = rows_per_kv_head(q, num_kv_heads)
    batch, _, num_rows, head_dim = rows.shape
    device = q.device
    out = {
        "query": torch.empty(
            batch * num_kv_heads, num_rows, head_dim, dtype=torch.float32, device=device
        ),
        "query_max": torch.empty(
            batch * num_kv_heads, num_rows, dtype=torch.float32, device=device
        ),
    }
    nb_pad = 16
    if sketch_planes is None:
        block_rows = max(16, min(64, next_power_of_2(num_rows)))
        rows_pad = num_rows
    else:
        nb_pad = sketch_planes.shape[1]
        block_rows = row_tile
        rows_pad = triton.cdiv(num_rows, row_tile) * row_tile
        out["planes"] = torch.empty(
            batch * num_kv_heads, 8, 4 * rows_pad, nb_pad, dtype=torch.int8, device=device
        )
        out["sketch_sum"] = torch.empty(
            batch * num_kv_heads, 8, rows_pad, dtype=torch.float32, device=device
        )
        out["sketch_scale"] = torch.empty(
            batch * num_kv_heads, rows_pad, dtype=torch.float32, device=device
        )
    placeholder = out["query_max"]
    num_planes = 1 if sketch_planes is None else 8
    grid = (batch * num_kv_heads, triton.cdiv(num_rows, block_rows), num_planes)
    _prepare_queries_kernel[grid](
        rows, sketch_planes if sketch_planes is not None else placeholder,
        out["query"], out["query_max"], out.get("planes", placeholder),
        out.get("sketch_sum", placeholder), out.get("sketch_scale", placeholder),
        sketch_row_norm, num_rows, *rows.stride(),
        H_KV=num_kv_heads, HEAD_DIM=head_dim, D_PAD=next_power_of_2(head_dim), NB_PAD=nb_pad,
        BLOCK_R=block_rows, ROWS_PAD=rows_pad,
        HAS_SKETCH=sketch_planes is not None, TINY=_TINY,
    )  # fmt: skip
    return out

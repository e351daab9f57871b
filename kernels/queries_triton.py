"""One small Triton kernel that prepares queries for the score kernels (one launch instead of a
chain of PyTorch ops, which matters at decode where the score kernel itself takes microseconds).

Per query row r of a KV head (kernels/gqa.py), in float32:
- query_max[r] = max_c |q[r, c]| and query[r] = q[r] / query_max[r] (KIVI scores, QJL outliers);
- with a sketch S [m, D]: sq = S q[r], sketch_max[r] = max_i |sq_i|, and the plane-major normalized
  sketch planes[r, j, k] = sq[8k + j] / sketch_max[r] in the score operand dtype, plus
  sketch_sum[r] = sum of those rounded operands (the score kernel subtracts it).
The unfused PyTorch equivalent is inside kivi_reference / qjl_reference.key_scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gqa import rows_per_kv_head
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
    planes_ptr,  # [B * H_KV * M, 8, NB_PAD] out, OUT_DTYPE
    sketch_sum_ptr,  # [B * H_KV * M] float32 out
    sketch_max_ptr,  # [B * H_KV * M] float32 out
    num_rows,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    H_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    NB_PAD: tl.constexpr,
    HAS_SKETCH: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    TINY: tl.constexpr,
):
    row_id = tl.program_id(0).to(tl.int64)
    bh = row_id // num_rows
    row = row_id % num_rows
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    q_row = q_ptr + (bh // H_KV) * stride_qb + (bh % H_KV) * stride_qh + row * stride_qm
    q = tl.load(q_row + cols * stride_qd, mask=col_mask, other=0.0).to(tl.float32)
    query_max = tl.maximum(tl.max(tl.abs(q), axis=0), TINY)
    tl.store(query_ptr + row_id * HEAD_DIM + cols, q / query_max, mask=col_mask)
    tl.store(query_max_ptr + row_id, query_max)
    if HAS_SKETCH:
        byte_cols = tl.arange(0, NB_PAD)
        sketch_tile = sketch_ptr + byte_cols[:, None] * HEAD_DIM + cols[None, :]
        sketch_max = TINY
        for plane in tl.static_range(8):
            rows = tl.load(sketch_tile + plane * NB_PAD * HEAD_DIM, mask=col_mask[None, :], other=0.0)
            sketch_max = tl.maximum(sketch_max, tl.max(tl.abs(tl.sum(rows * q[None, :], axis=1)), axis=0))
        total = 0.0
        for plane in tl.static_range(8):
            rows = tl.load(sketch_tile + plane * NB_PAD * HEAD_DIM, mask=col_mask[None, :], other=0.0)
            normalized = (tl.sum(rows * q[None, :], axis=1) / sketch_max).to(OUT_DTYPE)
            tl.store(planes_ptr + (row_id * 8 + plane) * NB_PAD + byte_cols, normalized)
            total += tl.sum(normalized.to(tl.float32), axis=0)
        tl.store(sketch_sum_ptr + row_id, total)
        tl.store(sketch_max_ptr + row_id, sketch_max)


def prepare_queries(
    q: torch.Tensor,
    num_kv_heads: int,
    sketch_planes: torch.Tensor | None = None,
    operand_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """q [B, H_q, T_q, D] -> {"query" [B*H_kv, M, D], "query_max" [B*H_kv, M]} (+ "planes"
    [B*H_kv, M, 8, NB_PAD], "sketch_sum", "sketch_max" with a plane-major sketch)."""
    rows = rows_per_kv_head(q, num_kv_heads)
    batch, _, num_rows, head_dim = rows.shape
    total_rows = batch * num_kv_heads * num_rows
    device = q.device
    out = {
        "query": torch.empty(batch * num_kv_heads, num_rows, head_dim, dtype=torch.float32, device=device),
        "query_max": torch.empty(batch * num_kv_heads, num_rows, dtype=torch.float32, device=device),
    }
    nb_pad = 16
    if sketch_planes is not None:
        nb_pad = sketch_planes.shape[1]
        out["planes"] = torch.empty(
            batch * num_kv_heads, num_rows, 8, nb_pad, dtype=operand_dtype, device=device
        )
        out["sketch_sum"] = torch.empty_like(out["query_max"])
        out["sketch_max"] = torch.empty_like(out["query_max"])
    placeholder = out["query_max"]
    _prepare_queries_kernel[(total_rows,)](
        rows, sketch_planes if sketch_planes is not None else placeholder,
        out["query"], out["query_max"], out.get("planes", placeholder),
        out.get("sketch_sum", placeholder), out.get("sketch_max", placeholder),
        num_rows, *rows.stride(),
        H_KV=num_kv_heads, HEAD_DIM=head_dim, D_PAD=next_power_of_2(head_dim), NB_PAD=nb_pad,
        HAS_SKETCH=sketch_planes is not None,
        OUT_DTYPE=tl.float32 if operand_dtype == torch.float32 else tl.float16, TINY=_TINY,
    )  # fmt: skip
    return out

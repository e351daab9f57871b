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
    BLOCK_R: tl.constexpr,
    HAS_SKETCH: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    TINY: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    row_ids = bh * num_rows + rows
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    q_rows = q_ptr + (bh // H_KV) * stride_qb + (bh % H_KV) * stride_qh + rows[:, None] * stride_qm
    mask = row_mask[:, None] & col_mask[None, :]
    q = tl.load(q_rows + cols[None, :] * stride_qd, mask=mask, other=0.0).to(tl.float32)
    query_max = tl.maximum(tl.max(tl.abs(q), axis=1), TINY)
    tl.store(
        query_ptr + row_ids[:, None] * HEAD_DIM + cols[None, :], q / query_max[:, None], mask=mask
    )
    tl.store(query_max_ptr + row_ids, query_max, mask=row_mask)
    if HAS_SKETCH:
        byte_cols = tl.arange(0, NB_PAD)
        # sketch rows transposed: [D_PAD, NB_PAD] per plane
        sketch_tile = sketch_ptr + byte_cols[None, :] * HEAD_DIM + cols[:, None]
        sketch_max = tl.full((BLOCK_R,), TINY, dtype=tl.float32)
        for plane in tl.static_range(8):
            rows_t = tl.load(
                sketch_tile + plane * NB_PAD * HEAD_DIM, mask=col_mask[:, None], other=0.0
            )
            projection = tl.dot(q, rows_t, input_precision="ieee")
            sketch_max = tl.maximum(sketch_max, tl.max(tl.abs(projection), axis=1))
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        planes_rows = planes_ptr + row_ids[:, None] * (8 * NB_PAD) + byte_cols[None, :]
        for plane in tl.static_range(8):
            rows_t = tl.load(
                sketch_tile + plane * NB_PAD * HEAD_DIM, mask=col_mask[:, None], other=0.0
            )
            projection = tl.dot(q, rows_t, input_precision="ieee")
            normalized = (projection / sketch_max[:, None]).to(OUT_DTYPE)
            tl.store(planes_rows + plane * NB_PAD, normalized, mask=row_mask[:, None])
            total += tl.sum(normalized.to(tl.float32), axis=1)
        tl.store(sketch_sum_ptr + row_ids, total, mask=row_mask)
        tl.store(sketch_max_ptr + row_ids, sketch_max, mask=row_mask)


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
    if sketch_planes is not None:
        nb_pad = sketch_planes.shape[1]
        out["planes"] = torch.empty(
            batch * num_kv_heads, num_rows, 8, nb_pad, dtype=operand_dtype, device=device
        )
        out["sketch_sum"] = torch.empty_like(out["query_max"])
        out["sketch_max"] = torch.empty_like(out["query_max"])
    placeholder = out["query_max"]
    block_rows = max(16, min(64, next_power_of_2(num_rows)))
    _prepare_queries_kernel[(batch * num_kv_heads, triton.cdiv(num_rows, block_rows))](
        rows, sketch_planes if sketch_planes is not None else placeholder,
        out["query"], out["query_max"], out.get("planes", placeholder),
        out.get("sketch_sum", placeholder), out.get("sketch_max", placeholder),
        num_rows, *rows.stride(),
        H_KV=num_kv_heads, HEAD_DIM=head_dim, D_PAD=next_power_of_2(head_dim), NB_PAD=nb_pad,
        BLOCK_R=block_rows,
        HAS_SKETCH=sketch_planes is not None,
        OUT_DTYPE=tl.float32 if operand_dtype == torch.float32 else tl.float16, TINY=_TINY,
    )  # fmt: skip
    return out

"""Triton kernels for QJL keys: fused quantize (outlier pick + sketch product + sign + bit pack in
one pass over the keys) and scores on packed keys for any number of query rows.

Same math as kernels/qjl_reference.py. Both kernels work one bit plane at a time: plane j of a sign
byte k is sketch row 8k + j (kernels/bitpack.py), so with the sketch stored plane-major
([D, 8, bytes]) every plane is one tensor-core dot and no register shuffling is needed.

Score kernel: a bit b becomes the float16 value 2b without a conversion, by moving it onto the top
exponent bit of a float16 (`(bits << (14 - j)) & 0x4000` is 2.0 or 0.0); then

    <S q, sigma> = sum_j dot(sq_j, 2 b_j) - sum_i sq_i

with the query sketch sq divided by its largest magnitude (float16 range) and multiplied back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kivi_triton import score_launch_shape
from .qjl_reference import SQRT_HALF_PI
from .queries_triton import prepare_queries
from .triton_common import (
    dot_dtype,
    next_power_of_2,
    num_programs_target,
    score_dot_dtype,
    triton_dtype,
)


def bytes_pad(num_bytes: int) -> int:
    """Padded byte count of a plane: a power of two, at least 16 (the smallest tl.dot dimension)."""
    return max(16, next_power_of_2(num_bytes))


def plane_major(matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sketch [m, D] -> [D, 8, bytes_pad(m / 8)] in dtype: [c, j, k] = sketch[8k + j, c]."""
    num_rows, head_dim = matrix.shape
    num_bytes = num_rows // 8
    planes = matrix.T.reshape(head_dim, num_bytes, 8).transpose(1, 2)
    padded = torch.zeros(head_dim, 8, bytes_pad(num_bytes), dtype=dtype, device=matrix.device)
    padded[:, :, :num_bytes] = planes
    return padded


@triton.jit
def _quantize_keys_kernel(
    x_ptr,  # [num_groups * GROUP, HEAD_DIM] contiguous, input dtype
    sketch_ptr,  # [HEAD_DIM, 8, NB_PAD] plane-major inlier sketch, input dtype
    outlier_sketch_ptr,  # [HEAD_DIM, 8, NBO_PAD] plane-major outlier sketch, input dtype
    signs_ptr,  # [num_groups * GROUP, NB] uint8
    norm_ptr,  # [num_groups * GROUP]
    outlier_signs_ptr,  # [num_groups * GROUP, NBO] uint8
    outlier_norm_ptr,  # [num_groups * GROUP]
    outlier_index_ptr,  # [num_groups, NOUT] uint8
    num_groups,
    groups_per_program,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    NB: tl.constexpr,
    NB_PAD: tl.constexpr,
    NBO: tl.constexpr,
    NBO_PAD: tl.constexpr,
    NOUT: tl.constexpr,
    NOUT_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    NORM_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    program = tl.program_id(0)
    tokens_in_group = tl.arange(0, GROUP).to(tl.int64)
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    byte_cols = tl.arange(0, NB_PAD)
    outlier_byte_cols = tl.arange(0, NBO_PAD)
    slots = tl.arange(0, NOUT_PAD)
    first = program * groups_per_program
    for group in range(first, tl.minimum(first + groups_per_program, num_groups)):
        tokens = group * GROUP + tokens_in_group
        x = tl.load(
            x_ptr + tokens[:, None] * HEAD_DIM + cols[None, :], mask=col_mask[None, :], other=0.0
        )
        x = x.to(tl.float32)
        inliers = x
        if NOUT > 0:
            # Pick the outlier channels one at a time; padded channels (-1) rank below real ones.
            energy = tl.where(col_mask, tl.sum(x * x, axis=0), -1.0)
            is_outlier = cols < 0
            index = tl.zeros((NOUT_PAD,), dtype=tl.int32)
            for slot in tl.static_range(NOUT):
                best = tl.argmax(energy, axis=0)
                is_outlier = is_outlier | (cols == best)
                index = tl.where(slots == slot, best, index)
                energy = tl.where(cols == best, -2.0, energy)
            tl.store(
                outlier_index_ptr + group * NOUT + slots, index.to(tl.uint8), mask=slots < NOUT
            )
            inliers = tl.where(is_outlier[None, :], 0.0, x)
            slot_mask = slots < NOUT
            outliers = tl.load(
                x_ptr + tokens[:, None] * HEAD_DIM + index[None, :],
                mask=slot_mask[None, :],
                other=0.0,
            )
            outliers_f32 = outliers.to(tl.float32)
            outlier_norm = tl.sqrt(tl.sum(outliers_f32 * outliers_f32, axis=1))
            tl.store(outlier_norm_ptr + tokens, outlier_norm.to(NORM_DTYPE))
            outlier_bytes = tl.zeros((GROUP, NBO_PAD), dtype=tl.int32)
            for plane in tl.static_range(8):
                columns = tl.load(
                    outlier_sketch_ptr
                    + index[:, None] * (8 * NBO_PAD)
                    + plane * NBO_PAD
                    + outlier_byte_cols[None, :],
                    mask=slot_mask[:, None],
                    other=0.0,
                )
                projection = tl.dot(
                    outliers.to(DOT_DTYPE), columns.to(DOT_DTYPE), input_precision=PRECISION
                )
                outlier_bytes = outlier_bytes | ((projection > 0).to(tl.int32) << plane)
            tl.store(
                outlier_signs_ptr + tokens[:, None] * NBO + outlier_byte_cols[None, :],
                outlier_bytes.to(tl.uint8),
                mask=outlier_byte_cols[None, :] < NBO,
            )
        norm = tl.sqrt(tl.sum(inliers * inliers, axis=1))
        tl.store(norm_ptr + tokens, norm.to(NORM_DTYPE))
        inliers_dot = inliers.to(DOT_DTYPE)
        sign_bytes = tl.zeros((GROUP, NB_PAD), dtype=tl.int32)
        for plane in tl.static_range(8):
            rows = tl.load(
                sketch_ptr + cols[:, None] * (8 * NB_PAD) + plane * NB_PAD + byte_cols[None, :],
                mask=col_mask[:, None],
                other=0.0,
            )
            projection = tl.dot(inliers_dot, rows.to(DOT_DTYPE), input_precision=PRECISION)
            sign_bytes = sign_bytes | ((projection > 0).to(tl.int32) << plane)
        tl.store(
            signs_ptr + tokens[:, None] * NB + byte_cols[None, :],
            sign_bytes.to(tl.uint8),
            mask=byte_cols[None, :] < NB,
        )


# Warps per program of the quantize kernel: 4 measured fastest on the H100 (bench run 3, which
# also measured a variant batching 1-4 groups per loop step: 3-8x slower, so it was dropped).
QUANTIZE_NUM_WARPS = 4


def quantize_keys(
    x,
    sketch_planes,
    outlier_sketch_planes,
    sketch_dim,
    outlier_sketch_dim,
    num_outliers,
    group_size,
):
    """x [B, H, T, D] contiguous (T a multiple of group_size) -> the fields of
    qjl_reference.quantize_keys.

    sketch_planes / outlier_sketch_planes: `plane_major` of the sketches, in x's dtype.
    """
    batch, heads, num_tokens, head_dim = x.shape
    num_groups = batch * heads * (num_tokens // group_size)
    device = x.device
    lead = (batch, heads, num_tokens)
    signs = torch.empty(*lead, sketch_dim // 8, dtype=torch.uint8, device=device)
    norm = torch.empty(*lead, dtype=x.dtype, device=device)
    fields = {"signs": signs, "norm": norm}
    if num_outliers:
        fields["outlier_signs"] = torch.empty(
            *lead, outlier_sketch_dim // 8, dtype=torch.uint8, device=device
        )
        fields["outlier_norm"] = torch.empty(*lead, dtype=x.dtype, device=device)
        fields["outlier_index"] = torch.empty(
            batch, heads, num_tokens // group_size, num_outliers, dtype=torch.uint8, device=device
        )
    if not num_groups:
        return fields
    programs = min(num_groups, num_programs_target(device))
    groups_per_program = triton.cdiv(num_groups, programs)
    operand = dot_dtype(x.dtype)
    _quantize_keys_kernel[(triton.cdiv(num_groups, groups_per_program),)](
        x, sketch_planes, outlier_sketch_planes, signs, norm,
        fields.get("outlier_signs", signs), fields.get("outlier_norm", norm),
        fields.get("outlier_index", signs),
        num_groups, groups_per_program,
        HEAD_DIM=head_dim, D_PAD=next_power_of_2(head_dim),
        NB=sketch_dim // 8, NB_PAD=bytes_pad(sketch_dim // 8),
        NBO=max(1, outlier_sketch_dim // 8), NBO_PAD=bytes_pad(outlier_sketch_dim // 8),
        NOUT=num_outliers, NOUT_PAD=max(16, next_power_of_2(num_outliers)), GROUP=group_size,
        DOT_DTYPE=operand, NORM_DTYPE=triton_dtype(x.dtype),
        PRECISION="ieee" if operand == tl.float32 else None,
        # float32 operands: one pipeline stage fits shared memory.
        num_stages=1 if operand == tl.float32 else 3, num_warps=QUANTIZE_NUM_WARPS,
    )  # fmt: skip
    return fields


@triton.jit
def _key_scores_kernel(
    query_sketch_ptr,  # [B * H_KV, num_rows, 8, NB_PAD] normalized, plane-major, DOT_DTYPE
    query_sketch_sum_ptr,  # [B * H_KV, num_rows] float32: sum of the normalized sketch
    query_sketch_max_ptr,  # [B * H_KV, num_rows] float32: the normalization
    query_ptr,  # [B * H_KV, num_rows, HEAD_DIM] float32, normalized by query_max
    query_max_ptr,  # [B * H_KV, num_rows] float32
    outlier_sketch_ptr,  # [HEAD_DIM, 8, NBO_PAD] plane-major outlier sketch, DOT_DTYPE
    signs_ptr,  # [B * H_KV, capacity, NB] uint8
    norm_ptr,  # [B * H_KV, capacity]
    outlier_signs_ptr,  # [B * H_KV, capacity, NBO] uint8
    outlier_norm_ptr,  # [B * H_KV, capacity]
    outlier_index_ptr,  # [B * H_KV, capacity // GROUP, NOUT] uint8
    out_ptr,  # rows view [B, H_KV, num_rows, >= num_tokens] float32
    num_groups,
    groups_per_program,
    num_rows,
    capacity,
    stride_ob,
    stride_oh,
    stride_om,
    stride_ot,
    scale_inlier,
    scale_outlier,
    H_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NB: tl.constexpr,
    NB_PAD: tl.constexpr,
    NBO: tl.constexpr,
    NBO_PAD: tl.constexpr,
    NOUT: tl.constexpr,
    NOUT_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    TILE_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """TILE_GROUPS token groups per loop step: every tensor carries a leading group axis and the
    dots are batched over it, so the per-step overhead (query loads, reductions, layout changes)
    is paid once per tile; each group brings its own outlier channels (outlier query sketch)."""
    program = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    row_ids = bh * num_rows + rows
    byte_cols = tl.arange(0, NB_PAD)
    outlier_byte_cols = tl.arange(0, NBO_PAD)
    in_group = tl.arange(0, GROUP)
    tile = tl.arange(0, TILE_GROUPS)
    slots = tl.arange(0, NOUT_PAD)
    slot_mask = slots < NOUT
    sketch_rows = query_sketch_ptr + row_ids[:, None] * (8 * NB_PAD) + byte_cols[None, :]
    sketch_sum = tl.load(query_sketch_sum_ptr + row_ids, mask=row_mask, other=0.0)
    sketch_max = tl.load(query_sketch_max_ptr + row_ids, mask=row_mask, other=0.0)
    query_max = tl.load(query_max_ptr + row_ids, mask=row_mask, other=0.0)
    inlier_factor = (sketch_max * scale_inlier)[None, :, None]
    outlier_factor = (query_max * scale_outlier)[None, :, None]
    out_base = out_ptr + (bh // H_KV) * stride_ob + (bh % H_KV) * stride_oh
    out_rows = out_base + rows[None, :, None] * stride_om
    first = program * groups_per_program
    last = tl.minimum(first + groups_per_program, num_groups)
    for group0 in range(first, last, TILE_GROUPS):
        groups = group0 + tile  # [TILE]
        group_mask = groups < last
        tokens = groups[:, None] * GROUP + in_group[None, :]  # [TILE, GROUP]
        bits = tl.load(
            signs_ptr + (bh * capacity + tokens[:, :, None]) * NB + byte_cols[None, None, :],
            mask=group_mask[:, None, None] & (byte_cols[None, None, :] < NB),
            other=0,
        ).to(tl.int16)
        acc = tl.zeros((TILE_GROUPS, BLOCK_M, GROUP), dtype=tl.float32)
        for plane in tl.static_range(8):
            query_plane = tl.load(sketch_rows + plane * NB_PAD, mask=row_mask[:, None], other=0.0)
            query_plane = tl.broadcast_to(query_plane[None, :, :], (TILE_GROUPS, BLOCK_M, NB_PAD))
            twice_bit = ((bits << (14 - plane)) & 0x4000).to(tl.float16, bitcast=True)
            acc += tl.dot(query_plane, tl.trans(twice_bit.to(DOT_DTYPE), (0, 2, 1)))
        norm = tl.load(norm_ptr + bh * capacity + tokens, mask=group_mask[:, None], other=0.0)
        score = (acc - sketch_sum[None, :, None]) * inlier_factor * norm.to(tl.float32)[:, None, :]
        if NOUT > 0:
            index = tl.load(
                outlier_index_ptr
                + (bh * (capacity // GROUP) + groups[:, None]) * NOUT
                + slots[None, :],
                mask=group_mask[:, None] & slot_mask[None, :],
                other=0,
            ).to(tl.int32)  # [TILE, NOUT_PAD]
            query_outliers = tl.load(
                query_ptr + row_ids[None, :, None] * HEAD_DIM + index[:, None, :],
                mask=row_mask[None, :, None] & slot_mask[None, None, :],
                other=0.0,
            ).to(DOT_DTYPE)  # [TILE, BLOCK_M, NOUT_PAD]
            outlier_bits = tl.load(
                outlier_signs_ptr
                + (bh * capacity + tokens[:, :, None]) * NBO
                + outlier_byte_cols[None, None, :],
                mask=group_mask[:, None, None] & (outlier_byte_cols[None, None, :] < NBO),
                other=0,
            ).to(tl.int16)
            outlier_acc = tl.zeros((TILE_GROUPS, BLOCK_M, GROUP), dtype=tl.float32)
            outlier_sum = tl.zeros((TILE_GROUPS, BLOCK_M), dtype=tl.float32)
            for plane in tl.static_range(8):
                columns = tl.load(
                    outlier_sketch_ptr
                    + index[:, :, None] * (8 * NBO_PAD)
                    + plane * NBO_PAD
                    + outlier_byte_cols[None, None, :],
                    mask=slot_mask[None, :, None],
                    other=0.0,
                )  # [TILE, NOUT_PAD, NBO_PAD]
                outlier_plane = tl.dot(query_outliers, columns).to(DOT_DTYPE)
                outlier_sum += tl.sum(outlier_plane.to(tl.float32), axis=2)
                twice_bit = ((outlier_bits << (14 - plane)) & 0x4000).to(tl.float16, bitcast=True)
                outlier_acc += tl.dot(outlier_plane, tl.trans(twice_bit.to(DOT_DTYPE), (0, 2, 1)))
            outlier_norm = tl.load(
                outlier_norm_ptr + bh * capacity + tokens, mask=group_mask[:, None], other=0.0
            )
            score += (
                (outlier_acc - outlier_sum[:, :, None])
                * outlier_factor
                * outlier_norm.to(tl.float32)[:, None, :]
            )
        tl.store(
            out_rows + tokens[:, None, :] * stride_ot,
            score,
            mask=row_mask[None, :, None] & group_mask[:, None, None],
        )


# Launch settings of key_scores: token groups per loop step (a power of two) and warps per
# program. 4 and 4 measured fastest on the H100 (bench/results/kernels_h100.json, "sweep").
SCORE_TILE_GROUPS = 4
SCORE_NUM_WARPS = 4


def key_scores(
    q,
    fields,
    num_tokens,
    out,
    sketch_rows,
    outlier_sketch_planes,
    sketch_dim,
    num_outliers,
    group_size,
) -> None:
    """Scores of q [B, H_q, T_q, D] against the first num_tokens packed keys, written into
    out [B, H_q, T_q, num_tokens] (float32 view, unit stride on its last axis).

    sketch_rows: `queries_triton.sketch_rows_plane_major` of the inlier sketch (rounded to the keys'
    dtype); outlier_sketch_planes: `plane_major` of the rounded outlier sketch in the score operand
    dtype (`score_dot_dtype(q.dtype)`).
    """
    signs = fields["signs"]
    batch, num_kv_heads, capacity, num_bytes = signs.shape
    head_dim = q.shape[-1]
    operand = score_dot_dtype(q.dtype)
    torch_operand = torch.float32 if operand == tl.float32 else torch.float16
    prepared = prepare_queries(q, num_kv_heads, sketch_rows, torch_operand)
    num_rows = prepared["query"].shape[1]
    out_rows = out.view(batch, num_kv_heads, num_rows, num_tokens)
    block_m = max(16, min(64, next_power_of_2(num_rows)))
    row_tiles = triton.cdiv(num_rows, block_m)
    num_groups = num_tokens // group_size
    groups_per_program, programs = score_launch_shape(
        num_groups, batch * num_kv_heads, row_tiles, q.device
    )
    # whole tiles per program
    groups_per_program = triton.cdiv(groups_per_program, SCORE_TILE_GROUPS) * SCORE_TILE_GROUPS
    programs = triton.cdiv(num_groups, groups_per_program)
    outlier_sketch_dim = 8 * fields["outlier_signs"].shape[-1] if num_outliers else 0
    _key_scores_kernel[(programs, batch * num_kv_heads, row_tiles)](
        prepared["planes"], prepared["sketch_sum"], prepared["sketch_max"],
        prepared["query"], prepared["query_max"], outlier_sketch_planes,
        signs, fields["norm"], fields.get("outlier_signs", signs),
        fields.get("outlier_norm", fields["norm"]), fields.get("outlier_index", signs), out_rows,
        num_groups, groups_per_program, num_rows, capacity, *out_rows.stride(),
        SQRT_HALF_PI / sketch_dim, SQRT_HALF_PI / max(1, outlier_sketch_dim),
        H_KV=num_kv_heads, HEAD_DIM=head_dim, NB=num_bytes, NB_PAD=bytes_pad(num_bytes),
        NBO=max(1, outlier_sketch_dim // 8), NBO_PAD=bytes_pad(outlier_sketch_dim // 8),
        NOUT=num_outliers, NOUT_PAD=max(16, next_power_of_2(num_outliers)), GROUP=group_size,
        BLOCK_M=block_m, DOT_DTYPE=operand, TILE_GROUPS=SCORE_TILE_GROUPS,
        # float32 operands: one pipeline stage fits shared memory.
        num_stages=1 if operand == tl.float32 else 3, num_warps=SCORE_NUM_WARPS,
    )  # fmt: skip

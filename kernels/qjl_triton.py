"""Triton kernels for QJL keys: fused quantize (outlier pick + sketch products + sign bits in one
pass over the keys) and scores on the packed keys for any number of query rows.

Same math as kernels/qjl_reference.py; the stored bytes are the reference's (bit j of sign byte k
is sketch row 8k + j, kernels/bitpack.py).

Score kernel (`_key_scores_kernel`), per program: one KV head, one tile of query rows (all query
heads of the GQA group and all query tokens: every packed byte is read once), a run of token
groups. The bits stay bits: bit plane j of four sign bytes is one 32-bit operation on the bytes as
loaded, `(w >> j) & 0x01010101`, which gives four 0/1 int8 lanes in the register layout of an int8
tensor-core dot (kWidth 4), against the query sketch as three int8 levels
(kernels/int8_levels.py): exact integer arithmetic, within ~1e-7 of the float32 reference. The
outlier part applies the group's outlier sketch columns to the bits first and weights the result
by the query afterwards (the operand then depends only on the group's channels): bits become
16-bit 0/2 operands (`(w << (14 - j)) & 0x40004000`, two lanes per 32-bit operation) against the
sketch columns in the keys' 16-bit dtype, in which the rounded sketch is exact (float32 keys: a
sum of bf16 terms). With sigma = 2 b - 1:

    inlier:  <S q, sigma> = 2 sum_i b_i sq_i - sum_i sq_i   (sq from the levels of S q)
    outlier: <S_o[:, O] q_O, sigma> = sum_s q[O_s] z_s,
             z_s = sum_i 2 b_i S_o[i, O_s] - sum_i S_o[i, O_s]

Quantize kernel (`_quantize_keys_kernel`), per loop step a tile of token groups: channel energies,
the top outlier channels per group (integer keys, exact ties to the lower channel like the
reference's argmax), the inlier sketch product as 8 tensor-core dots (one per bit plane) on the
keys with outlier channels zeroed, and the outlier product as 8 dots on a block-diagonal operand
(every token's outlier values in its group's columns) against the stacked outlier sketch rows of
the tile's groups. Sign bits are pushed into bytes with one funnel shift per bit. A bit is "the
projection's sign bit is clear"; that equals the reference's `projection > 0` except for a
projection of exactly +0.0: keys with a zero norm get all-zero bytes like the reference, and an
exact +0.0 of a non-zero key (measure zero) may differ in that one bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codec import triton_interpret_enabled
from .int8_levels import BASE2_F, BASE_F
from .qjl_reference import SQRT_HALF_PI
from .queries_triton import prepare_queries
from .triton_common import _multiprocessors, dot_dtype, next_power_of_2, triton_dtype


def bytes_pad(num_bytes: int) -> int:
    """Padded byte count of a plane: a power of two, at least 32 (an int8 dot's smallest K)."""
    return max(32, next_power_of_2(num_bytes))


def plane_major(matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sketch [m, D] -> [D, 8, bytes_pad(m / 8)] in dtype: [c, j, k] = sketch[8k + j, c]."""
    num_rows, head_dim = matrix.shape
    num_bytes = num_rows // 8
    planes = matrix.T.reshape(head_dim, num_bytes, 8).transpose(1, 2)
    padded = torch.zeros(head_dim, 8, bytes_pad(num_bytes), dtype=dtype, device=matrix.device)
    padded[:, :, :num_bytes] = planes
    return padded


def outlier_operand_format(key_dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """(dtype, terms) of the score kernel's outlier operand for keys of key_dtype: the keys' own
    16-bit dtype (the rounded sketch is exact in it), bf16 terms for float32 keys (three carry the
    24 bits, a fourth keeps the count a power of two), float32 under the interpreter."""
    if triton_interpret_enabled():
        return torch.float32, 1
    if key_dtype == torch.float32:
        return torch.bfloat16, 4
    return key_dtype, 1


def outlier_operand_table(
    outlier_sketch: torch.Tensor, dtype: torch.dtype, terms: int
) -> dict[str, torch.Tensor]:
    """The outlier sketch S_o [m_o, D] (float32, rounded to the keys' dtype) as the score kernel's
    operand: "table" [D, 8, terms, bytes_pad(m_o / 8)] in dtype with [c, j, t, k] = term t of
    S_o[8k + j, c] (terms of dtype that add up to the value: one where the value is exact in
    dtype, three bf16 terms for float32), and "colsum" [D] float32 = sum_i S_o[i, c]."""
    rest = outlier_sketch.float()
    parts = []
    for _ in range(terms):
        part = rest.to(dtype)
        parts.append(plane_major(part, dtype))
        rest = rest - part.float()
    return {
        "table": torch.stack(parts, dim=2).contiguous(),
        "colsum": outlier_sketch.float().sum(dim=0),
    }


# -- quantize ---------------------------------------------------------------------------------


@triton.jit
def _push_sign(acc, projection, ASM: tl.constexpr):
    """acc * 2 + the sign bit of projection (pushing planes 7 down to 0 leaves plane j in bit j):
    on a GPU one funnel shift, shf.r of acc:projection by 31."""
    if ASM:
        return tl.inline_asm_elementwise(
            "shf.r.clamp.b32 $0, $2, $1, 31;",
            "=r,r,r",
            [acc, projection],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        return (acc << 1) | ((projection.to(tl.int32, bitcast=True) >> 31) & 1)


@triton.jit
def _sign_bytes(
    a, nonzero, s0, s1, s2, s3, s4, s5, s6, s7, PRECISION: tl.constexpr, ASM: tl.constexpr
):
    """Sign bytes [rows, bytes] of a [rows, K] against the bit planes s0..s7 [K, bytes]: bit j is
    set where plane j's projection has a clear sign bit; rows without `nonzero` get 0."""
    acc = tl.zeros((a.shape[0], s0.shape[1]), dtype=tl.int32)
    acc = _push_sign(acc, tl.dot(a, s7, input_precision=PRECISION), ASM)
    acc = _push_sign(acc, tl.dot(a, s6, input_precision=PRECISION), ASM)
    acc = _push_sign(acc, tl.dot(a, s5, input_precision=PRECISION), ASM)
    acc = _push_sign(acc, tl.dot(a, s4, input_precision=PRECISION), ASM)
    acc = _push_sign(acc, tl.dot(a, s3, input_precision=PRECISION), ASM)
    acc = _push_sign(acc, tl.dot(a, s2, input_precision=PRECISION), ASM)
    acc = _push_sign(acc, tl.dot(a, s1, input_precision=PRECISION), ASM)
    acc = _push_sign(acc, tl.dot(a, s0, input_precision=PRECISION), ASM)
    return tl.where(nonzero[:, None], acc ^ 0xFF, 0)


@triton.jit
def _load_plane(rows_ptr, PLANE: tl.constexpr, STRIDE: tl.constexpr, mask, DOT_DTYPE: tl.constexpr):
    return tl.load(rows_ptr + PLANE * STRIDE, mask=mask, other=0.0).to(DOT_DTYPE)


@triton.jit
def _load_planes(rows_ptr, STRIDE: tl.constexpr, mask, DOT_DTYPE: tl.constexpr):
    """The 8 bit planes [K, bytes] of a plane-major sketch (rows_ptr: plane 0)."""
    return (
        _load_plane(rows_ptr, 0, STRIDE, mask, DOT_DTYPE),
        _load_plane(rows_ptr, 1, STRIDE, mask, DOT_DTYPE),
        _load_plane(rows_ptr, 2, STRIDE, mask, DOT_DTYPE),
        _load_plane(rows_ptr, 3, STRIDE, mask, DOT_DTYPE),
        _load_plane(rows_ptr, 4, STRIDE, mask, DOT_DTYPE),
        _load_plane(rows_ptr, 5, STRIDE, mask, DOT_DTYPE),
        _load_plane(rows_ptr, 6, STRIDE, mask, DOT_DTYPE),
        _load_plane(rows_ptr, 7, STRIDE, mask, DOT_DTYPE),
    )


@triton.jit
def _select_by_rounds(energy, cols, slots, col_mask, D_PAD: tl.constexpr, NOUT: tl.constexpr,
                      TILE_GROUPS: tl.constexpr, NOUT_PAD: tl.constexpr):
    """Top NOUT channels of each row of `energy` [TILE_GROUPS, D_PAD] by NOUT rounds of a max
    over integer keys (the energy's bits, then the channel): (chosen mask, index [.., NOUT_PAD]).
    Each round's max crosses warps when a row's channels span them: shared memory and barriers."""
    key = (energy.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (D_PAD - 1 - cols[None, :])
    key = tl.where(col_mask[None, :], key, -1)
    index = tl.zeros((TILE_GROUPS, NOUT_PAD), dtype=tl.int32)
    for slot in tl.static_range(NOUT):
        best = tl.max(key, axis=1)
        channel = (D_PAD - 1 - (best & 0xFFFF)).to(tl.int32)
        index = tl.where(slots[None, :] == slot, channel[:, None], index)
        key = tl.where(key == best[:, None], -2, key)
    return key == -2, index


@triton.jit
def _gather_outliers(x, index, in_tile, kcols, cols, outlier_sketch_ptr, obyte_cols,
                     GROUP: tl.constexpr, NOUT: tl.constexpr, NOUT_PAD: tl.constexpr,
                     K_OUT: tl.constexpr, NBO_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     PRECISION: tl.constexpr):
    """The tile's outlier values as a block-diagonal operand [BLOCK_T, K_OUT] (x[t, O_{g, s}] in
    column g * NOUT_PAD + s for t's own group g, zero elsewhere, gathered by a dot with one-hot
    columns: exact), their norms, and the outlier sketch rows of those channels as the planes,
    so that one 2-D dot per plane projects every group on its own outlier sketch rows."""
    kindex = tl.reshape(index, (K_OUT,))
    kvalid = (kcols % NOUT_PAD) < NOUT
    own = ((in_tile[:, None] // GROUP) == (kcols[None, :] // NOUT_PAD)) & kvalid[None, :]
    one_hot = (cols[:, None] == kindex[None, :]).to(DOT_DTYPE)
    gathered = tl.dot(x.to(DOT_DTYPE), one_hot, input_precision=PRECISION)
    outliers = tl.where(own, gathered, 0.0)
    outlier_norm = tl.sqrt(tl.sum(outliers * outliers, axis=1))
    orows = outlier_sketch_ptr + kindex[:, None] * (8 * NBO_PAD) + obyte_cols[None, :]
    return outliers, outlier_norm, _load_planes(orows, NBO_PAD, kvalid[:, None], DOT_DTYPE)


@triton.jit
def _quantize_keys_kernel(
    x_ptr,  # [num_groups * GROUP, HEAD_DIM] contiguous, input dtype
    sketch_ptr,  # [HEAD_DIM, 8, NB_PAD] plane-major inlier sketch (plane_major)
    outlier_sketch_ptr,  # [HEAD_DIM, 8, NBO_PAD] plane-major outlier sketch (plane_major)
    signs_ptr,  # [num_groups * GROUP, NB] uint8
    norm_ptr,  # [num_groups * GROUP]
    outlier_signs_ptr,  # [num_groups * GROUP, NBO] uint8
    outlier_norm_ptr,  # [num_groups * GROUP]
    outlier_index_ptr,  # [num_groups, NOUT] uint8
    scratch_ptr,  # [programs, TILE_GROUPS, D_PAD] float32 scratch rows
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
    TILE_GROUPS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    NORM_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    ASM: tl.constexpr,
    HOIST: tl.constexpr,
    NB_DOT: tl.constexpr,
    NBO_DOT: tl.constexpr,
):
    BLOCK_T: tl.constexpr = TILE_GROUPS * GROUP
    K_OUT: tl.constexpr = TILE_GROUPS * NOUT_PAD  # outlier operand: column g * NOUT_PAD + slot
    program = tl.program_id(0)
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    # dot widths NB_DOT <= NB_PAD (the planes' stride): the score kernel's padding to 32 bytes is
    # for its int8 dots' K; here the bytes are a dot's N, for which 16 is enough
    byte_cols = tl.arange(0, NB_DOT)
    obyte_cols = tl.arange(0, NBO_DOT)
    slots = tl.arange(0, NOUT_PAD)
    slot_mask = slots < NOUT
    in_tile = tl.arange(0, BLOCK_T)
    tile = tl.arange(0, TILE_GROUPS)
    kcols = tl.arange(0, K_OUT)
    sketch_rows = sketch_ptr + cols[:, None] * (8 * NB_PAD) + byte_cols[None, :]
    if HOIST:
        # the inlier sketch planes once (tensor-core operands: they stay in shared memory)
        planes = _load_planes(sketch_rows, NB_PAD, col_mask[:, None], DOT_DTYPE)
    scratch_rows = scratch_ptr + program * (TILE_GROUPS * D_PAD) + tile[:, None] * D_PAD
    scratch = scratch_rows + cols[None, :]
    first = program * groups_per_program
    last = tl.minimum(first + groups_per_program, num_groups)
    for group0 in range(first, last, TILE_GROUPS):
        tokens = group0 * GROUP + in_tile
        tmask = tokens < last * GROUP
        x = tl.load(
            x_ptr + tokens[:, None].to(tl.int64) * HEAD_DIM + cols[None, :],
            mask=tmask[:, None] & col_mask[None, :],
            other=0.0,
        )
        groups = group0 + tile
        gmask = groups < last
        x_in = x
        if NOUT > 0:
            xf = x.to(tl.float32)
            energy = tl.sum(tl.reshape(xf * xf, (TILE_GROUPS, GROUP, D_PAD)), axis=1)
            # The reduction leaves the energies replicated over threads; a round trip through a
            # scratch row gives the selection below a compact layout (one copy per thread), which
            # measured faster than the alternatives (an FMA dot for the energies, which let Triton
            # pipeline the loads but spilled registers: 2x slower on the H100).
            tl.store(scratch, energy)
            tl.debug_barrier()
            # The order of the reference's repeated argmax: higher energy first (non-negative
            # floats order like their bits), the lower channel first on ties; padding channels
            # rank last.
            energy = tl.load(scratch)
            tl.debug_barrier()
            chosen, index = _select_by_rounds(energy, cols, slots, col_mask, D_PAD, NOUT,
                                              TILE_GROUPS, NOUT_PAD)
            tl.store(
                outlier_index_ptr + groups[:, None] * NOUT + slots[None, :],
                index.to(tl.uint8),
                mask=gmask[:, None] & slot_mask[None, :],
            )
            token_is_outlier = tl.reshape(
                tl.broadcast_to(chosen[:, None, :], (TILE_GROUPS, GROUP, D_PAD)),
                (BLOCK_T, D_PAD),
            )
            x_in = tl.where(token_is_outlier, 0.0, x)
            outliers, outlier_norm, outlier_planes = _gather_outliers(
                x, index, in_tile, kcols, cols, outlier_sketch_ptr, obyte_cols, GROUP, NOUT,
                NOUT_PAD, K_OUT, NBO_PAD, DOT_DTYPE, PRECISION)
            tl.store(outlier_norm_ptr + tokens, outlier_norm.to(NORM_DTYPE), mask=tmask)
            outlier_bytes = _sign_bytes(
                outliers.to(DOT_DTYPE), outlier_norm > 0, *outlier_planes, PRECISION, ASM
            )
            tl.store(
                outlier_signs_ptr + tokens[:, None].to(tl.int64) * NBO + obyte_cols[None, :],
                outlier_bytes.to(tl.uint8),
                mask=tmask[:, None] & (obyte_cols[None, :] < NBO),
            )
        inliers = x_in.to(tl.float32)
        norm = tl.sqrt(tl.sum(inliers * inliers, axis=1))
        tl.store(norm_ptr + tokens, norm.to(NORM_DTYPE), mask=tmask)
        if not HOIST:  # float32 FMA dots: operands in registers, reloaded (from cache) per step
            planes = _load_planes(sketch_rows, NB_PAD, col_mask[:, None], DOT_DTYPE)
        sign_bytes = _sign_bytes(x_in.to(DOT_DTYPE), norm > 0, *planes, PRECISION, ASM)
        tl.store(
            signs_ptr + tokens[:, None].to(tl.int64) * NB + byte_cols[None, :],
            sign_bytes.to(tl.uint8),
            mask=tmask[:, None] & (byte_cols[None, :] < NB),
        )


# Launch settings of quantize_keys for 16-bit keys (float32 keys use one group per step):
# tokens per loop step, warps, programs per multiprocessor. Chosen with bench_kernels.py's sweep.
QUANTIZE_TILE_TOKENS = 64
QUANTIZE_NUM_WARPS = 4
QUANTIZE_PROGRAMS_PER_SM = 2
# ptxas register cap of the quantize kernel (None: uncapped, which takes all 255 registers and
# leaves room for 2 programs per multiprocessor)
QUANTIZE_MAXNREG = None
# Measured and removed (bench/results/qjl_explore/README.md): outlier channels chosen by rank
# counts instead of max rounds (run 3: 0.81-0.83 vs 0.61 ms at 128K), outlier projections as
# dense dots against the whole outlier sketch held in shared memory (1.07-1.38 ms: one program per
# multiprocessor), warp-local max rounds (run 2: 0.653 ms).
# The sign-byte dots' N at its minimum (16, or the bytes rounded up to a power of two) instead of
# the planes' 32-byte padding: for m = 128 half the inlier dot work and operand bytes.
QUANTIZE_NARROW_PLANES = False


def _dot_bytes(num_bytes: int) -> int:
    """N of a sign-byte dot for num_bytes bytes per token (see QUANTIZE_NARROW_PLANES)."""
    if QUANTIZE_NARROW_PLANES:
        return max(16, next_power_of_2(num_bytes))
    return bytes_pad(num_bytes)


def _programs_per_device(device: torch.device, per_sm: int) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return per_sm * _multiprocessors(index)


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
    operand = dot_dtype(x.dtype)
    wide = operand == tl.float32
    # float32 dots on a GPU: one group per step fits shared memory (the interpreter has no limit,
    # so tests there run the multi-group path)
    one_group = wide and not triton_interpret_enabled()
    tile_groups = 1 if one_group else max(1, QUANTIZE_TILE_TOKENS // group_size)
    # outlier operand width tile_groups * slots: at least 16 (a 16-bit dot's smallest K)
    slots = max(next_power_of_2(num_outliers), triton.cdiv(16, tile_groups))
    programs = min(num_groups, _programs_per_device(device, QUANTIZE_PROGRAMS_PER_SM))
    groups_per_program = triton.cdiv(num_groups, programs)
    groups_per_program = triton.cdiv(groups_per_program, tile_groups) * tile_groups
    programs = triton.cdiv(num_groups, groups_per_program)
    d_pad = next_power_of_2(head_dim)
    scratch = torch.empty(programs, tile_groups, d_pad, dtype=torch.float32, device=device)
    _quantize_keys_kernel[(programs,)](
        x, sketch_planes, outlier_sketch_planes, signs, norm,
        fields.get("outlier_signs", signs), fields.get("outlier_norm", norm),
        fields.get("outlier_index", signs), scratch,
        num_groups, groups_per_program,
        HEAD_DIM=head_dim, D_PAD=d_pad,
        NB=sketch_dim // 8, NB_PAD=bytes_pad(sketch_dim // 8),
        NBO=max(1, outlier_sketch_dim // 8), NBO_PAD=bytes_pad(outlier_sketch_dim // 8),
        NOUT=num_outliers, NOUT_PAD=slots, GROUP=group_size, TILE_GROUPS=tile_groups,
        DOT_DTYPE=operand, NORM_DTYPE=triton_dtype(x.dtype),
        PRECISION="ieee" if wide else None, ASM=not triton_interpret_enabled(), HOIST=not wide,
        NB_DOT=_dot_bytes(sketch_dim // 8), NBO_DOT=_dot_bytes(outlier_sketch_dim // 8),
        num_stages=1 if one_group else 2, num_warps=QUANTIZE_NUM_WARPS,
        **({"maxnreg": QUANTIZE_MAXNREG}
           if QUANTIZE_MAXNREG and not triton_interpret_enabled() else {}),
    )  # fmt: skip
    return fields


# -- scores -----------------------------------------------------------------------------------


@triton.jit
def _bit_plane(packed, PLANE: tl.constexpr, SWAR: tl.constexpr):
    """int8 sign bytes -> int8 0/1: bit PLANE of each byte. On a GPU four bytes at a time: one
    shift and one mask of the 32-bit register that holds them (the lanes stay in place)."""
    if SWAR:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.b32 t, $1, $2; and.b32 $0, t, 0x01010101; }",
            "=r,r,r,r,r,r",
            [packed, tl.full(packed.shape, PLANE, tl.int32)],
            dtype=tl.int8,
            is_pure=True,
            pack=4,
        )
    else:
        return (packed >> PLANE) & 1


@triton.jit
def _plane_dot(packed, PLANE: tl.constexpr, operand, acc, SWAR: tl.constexpr):
    return tl.dot(_bit_plane(packed, PLANE, SWAR), operand, acc, out_dtype=tl.int32)


@triton.jit
def _twice_bit_plane(packed16, PLANE: tl.constexpr, SWAR: tl.constexpr, DTYPE: tl.constexpr):
    """int16 sign bytes -> DTYPE 2.0 or 0.0 for bit PLANE: the bit moved onto the top exponent bit
    of a 16-bit float (0x4000 is 2.0 in float16 and bfloat16); two lanes per 32-bit operation on a
    GPU."""
    if SWAR:
        bits = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shl.b32 t, $1, $2; and.b32 $0, t, 0x40004000; }",
            "=r,r,r,r",
            [packed16, tl.full(packed16.shape, 14 - PLANE, tl.int32)],
            dtype=tl.int16,
            is_pure=True,
            pack=2,
        )
        return bits.to(DTYPE, bitcast=True)
    else:
        bits = (packed16 << (14 - PLANE)) & 0x4000
        return bits.to(tl.float16, bitcast=True).to(DTYPE)


@triton.jit
def _key_scores_kernel(
    planes_ptr,  # [B * H_KV, 8, 4 * ROWS_PAD, NB_PAD] int8 query sketch levels (queries_triton)
    sketch_sum_ptr,  # [B * H_KV, 8, ROWS_PAD] float32 (per bit plane)
    sketch_scale_ptr,  # [B * H_KV, ROWS_PAD] float32
    query_ptr,  # [B * H_KV * num_rows, HEAD_DIM] float32, q / query_max
    query_max_ptr,  # [B * H_KV * num_rows] float32
    table_ptr,  # [HEAD_DIM, 8, TERMS, NBO_PAD] outlier sketch terms (outlier_operand_table)
    colsum_ptr,  # [HEAD_DIM] float32
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
    ROWS_PAD: tl.constexpr,
    NB: tl.constexpr,
    NB_PAD: tl.constexpr,
    NBO: tl.constexpr,
    NBO_PAD: tl.constexpr,
    NOUT: tl.constexpr,
    NOUT_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    TILE_GROUPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    TERMS: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    SWAR: tl.constexpr,
):
    """Dot columns: inlier a * 2 * BLOCK_R + 2 * r + e holds level 2 a + e of row r of the tile
    (queries_triton); outlier t * NOUT_PAD + s holds term t of the sketch column of slot s."""
    BLOCK_T: tl.constexpr = TILE_GROUPS * GROUP
    PLANE: tl.constexpr = 4 * ROWS_PAD * NB_PAD
    program = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    row_tile = tl.program_id(2)
    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    byte_cols = tl.arange(0, NB_PAD)
    in_tile = tl.arange(0, BLOCK_T)
    tile = tl.arange(0, TILE_GROUPS)
    in_group = tl.arange(0, GROUP)
    # the query sketch levels of this row tile, [NB_PAD, 4 * BLOCK_R] per plane, loaded once
    columns = row_tile * (4 * BLOCK_R) + tl.arange(0, 4 * BLOCK_R)
    plane_rows = planes_ptr + bh * (8 * PLANE) + columns[:, None] * NB_PAD + byte_cols[None, :]
    q0 = tl.trans(tl.load(plane_rows + 0 * PLANE))
    q1 = tl.trans(tl.load(plane_rows + 1 * PLANE))
    q2 = tl.trans(tl.load(plane_rows + 2 * PLANE))
    q3 = tl.trans(tl.load(plane_rows + 3 * PLANE))
    q4 = tl.trans(tl.load(plane_rows + 4 * PLANE))
    q5 = tl.trans(tl.load(plane_rows + 5 * PLANE))
    q6 = tl.trans(tl.load(plane_rows + 6 * PLANE))
    q7 = tl.trans(tl.load(plane_rows + 7 * PLANE))
    planes8 = tl.arange(0, 8)
    sketch_sum = tl.sum(
        tl.load(sketch_sum_ptr + (bh * 8 + planes8[:, None]) * ROWS_PAD + rows[None, :]), axis=0
    )
    inlier_scale = tl.load(sketch_scale_ptr + bh * ROWS_PAD + rows) * scale_inlier
    # weights of the levels, [a, 1, e]: hi, mid / lo, padding
    level_a = tl.arange(0, 2)[:, None, None]
    level_e = tl.arange(0, 2)[None, None, :]
    level_weight = tl.where(
        level_a == 0, tl.where(level_e == 0, BASE2_F, BASE_F), tl.where(level_e == 0, 1.0, 0.0)
    )
    out_base = out_ptr + (bh // H_KV) * stride_ob + (bh % H_KV) * stride_oh
    out_rows = out_base + rows[None, None, :] * stride_om
    if NOUT > 0:
        query_factor = tl.load(query_max_ptr + bh * num_rows + rows, mask=row_mask, other=0.0)
        query_factor = query_factor * scale_outlier
        query_rows = query_ptr + (bh * num_rows + rows[None, None, :]) * HEAD_DIM
        obyte_cols = tl.arange(0, NBO_PAD)
        slots = tl.arange(0, NOUT_PAD)
        slot_mask = slots < NOUT
        kcols = tl.arange(0, TERMS * NOUT_PAD)
        kslot = kcols % NOUT_PAD
        kterm = kcols // NOUT_PAD
    first = program * groups_per_program
    last = tl.minimum(first + groups_per_program, num_groups)
    for group0 in range(first, last, TILE_GROUPS):
        tokens = group0 * GROUP + in_tile
        tmask = tokens < last * GROUP
        packed = tl.load(
            signs_ptr + (bh * capacity + tokens[:, None]) * NB + byte_cols[None, :],
            mask=tmask[:, None] & (byte_cols[None, :] < NB),
            other=0,
        ).to(tl.int8, bitcast=True)
        acc = tl.zeros((BLOCK_T, 4 * BLOCK_R), dtype=tl.int32)
        acc = _plane_dot(packed, 0, q0, acc, SWAR)
        acc = _plane_dot(packed, 1, q1, acc, SWAR)
        acc = _plane_dot(packed, 2, q2, acc, SWAR)
        acc = _plane_dot(packed, 3, q3, acc, SWAR)
        acc = _plane_dot(packed, 4, q4, acc, SWAR)
        acc = _plane_dot(packed, 5, q5, acc, SWAR)
        acc = _plane_dot(packed, 6, q6, acc, SWAR)
        acc = _plane_dot(packed, 7, q7, acc, SWAR)
        levels = tl.reshape(acc, (BLOCK_T, 2, BLOCK_R, 2)).to(tl.float32) * level_weight[None]
        bits_dot = tl.sum(tl.sum(levels, axis=3), axis=1)  # sum_i b_i value_i, [BLOCK_T, BLOCK_R]
        norm = tl.load(norm_ptr + bh * capacity + tokens, mask=tmask, other=0.0).to(tl.float32)
        score = (2.0 * bits_dot - sketch_sum[None, :]) * inlier_scale[None, :] * norm[:, None]
        score = tl.reshape(score, (TILE_GROUPS, GROUP, BLOCK_R))
        groups = group0 + tile
        gmask = groups < last
        group_tokens = groups[:, None] * GROUP + in_group[None, :]  # [TILE_GROUPS, GROUP]
        if NOUT > 0:
            index_rows = outlier_index_ptr + (bh * (capacity // GROUP) + groups[:, None]) * NOUT
            kchannel = tl.load(
                index_rows + kslot[None, :],
                mask=gmask[:, None] & (kslot < NOUT)[None, :],
                other=0,
            ).to(tl.int32)  # [TILE_GROUPS, TERMS * NOUT_PAD]
            outlier_packed = (
                tl.load(
                    outlier_signs_ptr
                    + (bh * capacity + group_tokens[:, :, None]) * NBO
                    + obyte_cols[None, None, :],
                    mask=gmask[:, None, None] & (obyte_cols[None, None, :] < NBO),
                    other=0,
                )
                .to(tl.int8, bitcast=True)
                .to(tl.int16)
            )  # [TILE_GROUPS, GROUP, NBO_PAD]
            # [c, j, t, k] of each column's channel and term; plane j adds TERMS * NBO_PAD
            table_rows = (
                table_ptr
                + (kchannel[:, :, None] * (8 * TERMS) + kterm[None, :, None]) * NBO_PAD
                + obyte_cols[None, None, :]
            )
            table_mask = (kslot < NOUT)[None, :, None]
            oacc = tl.zeros((TILE_GROUPS, GROUP, TERMS * NOUT_PAD), dtype=tl.float32)
            for plane in tl.static_range(8):
                operand = tl.load(
                    table_rows + plane * TERMS * NBO_PAD,
                    mask=table_mask,
                    other=0.0,
                )
                oacc = tl.dot(
                    _twice_bit_plane(outlier_packed, plane, SWAR, OPERAND_DTYPE),
                    tl.trans(operand, (0, 2, 1)),
                    oacc,
                )
            channel = tl.load(
                index_rows + slots[None, :], mask=gmask[:, None] & slot_mask[None, :], other=0
            ).to(tl.int32)  # [TILE_GROUPS, NOUT_PAD]
            # z[t, s] = sum_i 2 b_i S_o[i, c_s] - sum_i S_o[i, c_s]
            z = tl.sum(tl.reshape(oacc, (TILE_GROUPS, GROUP, TERMS, NOUT_PAD)), axis=2)
            z = z - tl.load(colsum_ptr + channel, mask=slot_mask[None, :], other=0.0)[:, None, :]
            query_slots = tl.load(
                query_rows + channel[:, :, None],
                mask=row_mask[None, None, :] & slot_mask[None, :, None],
                other=0.0,
            )  # [TILE_GROUPS, NOUT_PAD, BLOCK_R]
            part = tl.sum(z[:, :, :, None] * query_slots[:, None, :, :], axis=2)
            outlier_norm = tl.load(
                outlier_norm_ptr + bh * capacity + group_tokens, mask=gmask[:, None], other=0.0
            ).to(tl.float32)
            score += part * query_factor[None, None, :] * outlier_norm[:, :, None]
        tl.store(
            out_rows + group_tokens[:, :, None] * stride_ot,
            score,
            mask=gmask[:, None, None] & row_mask[None, None, :],
        )


# Launch settings of key_scores: tokens per loop step, warps per program, pipeline stages of
# the loads (bench_kernels.py's sweep).
SCORE_TILE_TOKENS = 128
SCORE_NUM_WARPS = 4
SCORE_NUM_STAGES = 3
# Programs per multiprocessor (all KV heads and row tiles together).
SCORE_PROGRAMS_PER_SM = 4
# Query rows per program (a power of two): all query heads of a KV head times the query tokens,
# up to this many (more rows take more programs).
SCORE_MAX_ROW_TILE = 16


def key_scores(
    q,
    fields,
    num_tokens,
    out,
    sketch_rows,
    sketch_row_norm,
    outlier_operands,
    sketch_dim,
    num_outliers,
    group_size,
) -> None:
    """Scores of q [B, H_q, T_q, D] against the first num_tokens packed keys, written into
    out [B, H_q, T_q, num_tokens] (float32 view, unit stride on its last axis).

    sketch_rows: `queries_triton.sketch_rows_plane_major` of the inlier sketch (rounded to the keys'
    dtype) and sketch_row_norm the largest norm of its rows; outlier_operands:
    `outlier_operand_table` of the rounded outlier sketch.
    """
    signs = fields["signs"]
    batch, num_kv_heads, capacity, num_bytes = signs.shape
    head_dim = q.shape[-1]
    num_rows = q.shape[1] // num_kv_heads * q.shape[2]
    block_r = min(SCORE_MAX_ROW_TILE, next_power_of_2(num_rows))
    prepared = prepare_queries(
        q, num_kv_heads, sketch_rows, row_tile=block_r, sketch_row_norm=sketch_row_norm
    )
    rows_pad = prepared["sketch_scale"].shape[1]
    out_rows = out.view(batch, num_kv_heads, num_rows, num_tokens)
    row_tiles = rows_pad // block_r
    num_groups = num_tokens // group_size
    tile_groups = max(1, SCORE_TILE_TOKENS // group_size)
    programs = max(
        1,
        _programs_per_device(q.device, SCORE_PROGRAMS_PER_SM) // (batch * num_kv_heads * row_tiles),
    )
    # whole tiles per program
    groups_per_program = triton.cdiv(triton.cdiv(num_groups, programs), tile_groups) * tile_groups
    programs = triton.cdiv(num_groups, groups_per_program)
    outlier_sketch_dim = 8 * fields["outlier_signs"].shape[-1] if num_outliers else 0
    table = outlier_operands["table"]
    _key_scores_kernel[(programs, batch * num_kv_heads, row_tiles)](
        prepared["planes"], prepared["sketch_sum"], prepared["sketch_scale"],
        prepared["query"], prepared["query_max"],
        outlier_operands["table"], outlier_operands["colsum"],
        signs, fields["norm"], fields.get("outlier_signs", signs),
        fields.get("outlier_norm", fields["norm"]), fields.get("outlier_index", signs), out_rows,
        num_groups, groups_per_program, num_rows, capacity, *out_rows.stride(),
        SQRT_HALF_PI / sketch_dim, SQRT_HALF_PI / max(1, outlier_sketch_dim),
        H_KV=num_kv_heads, HEAD_DIM=head_dim, ROWS_PAD=rows_pad,
        NB=num_bytes, NB_PAD=bytes_pad(num_bytes),
        NBO=max(1, outlier_sketch_dim // 8), NBO_PAD=bytes_pad(outlier_sketch_dim // 8),
        NOUT=num_outliers, NOUT_PAD=next_power_of_2(num_outliers), GROUP=group_size,
        TILE_GROUPS=tile_groups, BLOCK_R=block_r, TERMS=table.shape[2],
        OPERAND_DTYPE=triton_dtype(table.dtype),
        SWAR=not triton_interpret_enabled(),
        num_warps=SCORE_NUM_WARPS, num_stages=SCORE_NUM_STAGES,
    )  # fmt: skip

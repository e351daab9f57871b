"""Offline sm_90 resource counts of QJL's fused quantize kernel, no GPU: registers, spill bytes,
shared memory, SASS size, barriers and tensor-core instructions per tile size (kernels/qjl_triton.py
QUANTIZE_*), compiled with the GPU machine's Triton as sass_count.py does.

    pip install --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 .venv/bin/python bench/kernels/sass_count_qjl.py [--dump DIR]

Shape: bench_kernels.py's QJL (head_dim 128, sketch 256 bits, 8 outlier channels with a 256-bit
outlier sketch, groups of 32 tokens), bf16 keys, 128K tokens x 8 heads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sass_count  # noqa: E402  (sets up kvpack.kernels from the checkout)
import triton.language as tl  # noqa: E402
from kvpack.kernels import qjl_triton  # noqa: E402

GROUPS = 131072 * 8 // 32
POINTERS = {"x_ptr": "*bf16", "sketch_ptr": "*bf16", "outlier_sketch_ptr": "*bf16",
            "signs_ptr": "*u8", "norm_ptr": "*bf16", "outlier_signs_ptr": "*u8",
            "outlier_norm_ptr": "*bf16", "outlier_index_ptr": "*u8", "scratch_ptr": "*fp32"}
# 132 multiprocessors x 2 programs, as the launcher splits the groups (a multiple of 2 groups, the
# 64-token tile's)
INTS = dict(num_groups=GROUPS, groups_per_program=-(-GROUPS // 264 // 2) * 2)


def variants():
    """(label, constexprs, num_warps) for tiles of 64 and 32 tokens."""
    out = []
    for tile in (64, 32):
        constexprs = dict(
            HEAD_DIM=128, D_PAD=128, NB=32, NB_PAD=32, NBO=32, NBO_PAD=32, NOUT=8,
            NOUT_PAD=max(8, 16 // (tile // 32)), GROUP=32, TILE_GROUPS=tile // 32,
            DOT_DTYPE=tl.bfloat16, NORM_DTYPE=tl.bfloat16, PRECISION=None, ASM=True, HOIST=True,
            NB_DOT=32, NBO_DOT=32)
        out.append((f"tile {tile}", constexprs, 4))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, default=None, help="write .sass/.ttgir here")
    args = parser.parse_args()
    print("triton target sm_90; offline counts, not GPU time")
    for label, constexprs, warps in variants():
        compiled, sass = sass_count.compile_sass(
            qjl_triton._quantize_keys_kernel, constexprs, warps, args.dump, label,
            pointers=POINTERS, ints=INTS)
        rows = sass_count.parse(sass)
        barriers = sum(1 for _, op, _ in rows if op.startswith("BAR"))
        wgmma = sum(1 for _, op, _ in rows if op.startswith("HGMMA"))
        print(f"{label}: regs {compiled.regs}, spill {compiled.stack} B, shared "
              f"{compiled.metadata.shared} B, {len(rows)} SASS, {barriers} BAR, {wgmma} HGMMA")


if __name__ == "__main__":
    main()

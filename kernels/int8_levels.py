"""Fixed-point numbers as three int8 levels, for int8 tensor-core dots at ~float32 precision.

A value v in [-1, 1] is written as

    v * 127 = hi + mid / 254 + lo / 254**2,   hi, mid, lo integers in [-127, 127]

(each level rounds the remainder of the previous one, which stays within [-0.5, 0.5], times 254),
so v = (hi * 254**2 + mid * 254 + lo) / LEVEL_UNITS with an error below 0.5 / LEVEL_UNITS
(6e-8) plus the float32 rounding of the splitting arithmetic (~1e-7 in all). A dot of 0/1 bits
with the three levels (exact int8 tensor-core arithmetic), weighted back with LEVEL_WEIGHTS, gives
the dot with v to that precision: the QJL score kernel's query sketch (kernels/queries_triton.py,
kernels/qjl_triton.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

LEVEL_BASE = 254
LEVEL_UNITS = 127 * LEVEL_BASE * LEVEL_BASE
LEVEL_WEIGHTS = (LEVEL_BASE * LEVEL_BASE, LEVEL_BASE, 1)  # of hi, mid, lo
# the same numbers for use inside Triton kernels
BASE_F: tl.constexpr = tl.constexpr(float(LEVEL_BASE))
BASE2_F: tl.constexpr = tl.constexpr(float(LEVEL_BASE * LEVEL_BASE))
UNITS_F: tl.constexpr = tl.constexpr(float(LEVEL_UNITS))


@triton.jit
def _round_half_away(v):
    return (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32).to(tl.float32)


@triton.jit
def split_levels(v):
    """v (float32, |v| <= 1) -> (hi, mid, lo, value): the levels as float32 integers and
    value = hi * 254**2 + mid * 254 + lo (exact in float32)."""
    scaled = v * 127.0
    hi = _round_half_away(scaled)
    rest = (scaled - hi) * BASE_F
    mid = _round_half_away(rest)
    lo = _round_half_away((rest - mid) * BASE_F)
    return hi, mid, lo, hi * BASE2_F + mid * BASE_F + lo

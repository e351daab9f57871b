"""Three int8 levels represent values in [-1, 1] to ~1e-7 (kernels/int8_levels.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpack.kernels.int8_levels import LEVEL_UNITS, LEVEL_WEIGHTS, split_levels


@triton.jit
def _split_kernel(v_ptr, levels_ptr, value_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    hi, mid, lo, value = split_levels(tl.load(v_ptr + offsets))
    tl.store(levels_ptr + offsets * 3, hi)
    tl.store(levels_ptr + offsets * 3 + 1, mid)
    tl.store(levels_ptr + offsets * 3 + 2, lo)
    tl.store(value_ptr + offsets, value)


def test_levels_reconstruct_within_half_a_unit():
    torch.manual_seed(0)
    v = torch.cat([torch.rand(4091) * 2 - 1, torch.tensor([-1.0, 1.0, 0.0, 0.5, -0.5])])
    levels = torch.empty(v.numel(), 3)
    value = torch.empty_like(v)
    _split_kernel[(1,)](v, levels, value, N=v.numel())
    assert torch.equal(levels, levels.round()) and levels.abs().max() <= 127  # int8 integers
    weights = torch.tensor(LEVEL_WEIGHTS, dtype=torch.float64)
    assert torch.equal((levels.double() * weights).sum(-1), value.double())
    # half a unit of the last level, plus float32 rounding of the splitting arithmetic
    error = (value.double() / LEVEL_UNITS - v.double()).abs().max().item()
    assert error <= 0.5 / LEVEL_UNITS + 2**-24

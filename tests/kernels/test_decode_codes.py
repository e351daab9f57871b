"""The fused decode kernel turns packed codes into 16-bit floats by OR-ing them into the bits of
1024.0 (float16) / 128.0 (bfloat16) and subtracting that again (kernels/decode_attention_triton.py
`_codes_as`): exact for every code the 2- and 4-bit layouts hold. bfloat16 runs on GPUs only (the
interpreter has no bfloat16 arithmetic); bench/inference/bench_decode.py checks the whole kernel
there against the unfused path."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from kvpack.kernels.decode_attention_triton import _codes_as


@triton.jit
def _convert(codes_ptr, out_ptr, N: tl.constexpr, DTYPE: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, _codes_as(tl.load(codes_ptr + offsets), DTYPE).to(tl.float32))


@pytest.mark.parametrize("dtype", [tl.float16, tl.float32])
def test_codes_convert_exactly(dtype):
    codes = torch.randint(0, 16, (64,), dtype=torch.int32)
    codes[:16] = torch.arange(16)  # every 4-bit code at least once
    out = torch.full((64,), float("nan"))
    _convert[(1,)](codes, out, N=64, DTYPE=dtype)
    assert torch.equal(out, codes.float())

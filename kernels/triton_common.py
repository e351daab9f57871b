"""Launch helpers shared by the Triton kernels of this package."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .codec import triton_interpret_enabled

_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def triton_dtype(dtype: torch.dtype):
    return _TRITON_DTYPES[dtype]


def dot_dtype(dtype: torch.dtype):
    """Operand dtype for tl.dot on tensors of `dtype`.

    The CPU interpreter has no bfloat16 arithmetic, so there every dot runs in float32 (exact for
    the 16-bit inputs); on a GPU 16-bit inputs keep their dtype for the tensor cores.
    """
    if triton_interpret_enabled() or dtype == torch.float32:
        return tl.float32
    return _TRITON_DTYPES[dtype]


def next_power_of_2(value: int) -> int:
    return triton.next_power_of_2(max(1, value))


@functools.lru_cache(maxsize=8)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Programs per multiprocessor that the split launches aim for; the benchmark sweeps it.
PROGRAMS_PER_SM = 4


def num_programs_target(device: torch.device) -> int:
    """Programs that keep the device busy (a few per multiprocessor; 4 under the interpreter)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return PROGRAMS_PER_SM * _multiprocessors(index)


def score_dot_dtype(dtype: torch.dtype):
    """Operand dtype of the score kernels' dots: float16 on a GPU (queries are normalized to
    [-1, 1] first, so its range suffices and its 11-bit mantissa beats bfloat16's 8), float32 for
    float32 inputs and under the interpreter."""
    if triton_interpret_enabled() or dtype == torch.float32:
        return tl.float32
    return tl.float16

"""The exact fp16 codec: q·kᵀ and p·v exactly (the correctness baseline)."""

from __future__ import annotations

import pytest
import torch
from kvpack.kernels import make_codec


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Products are computed by torch.matmul in the cache dtype, so they carry that dtype's rounding.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_stores_inputs_bit_exactly_and_scores_are_q_dot_k(dtype, group):
    codec = make_codec("fp16", head_dim=32)
    k = torch.randn(2, 2, 37, 32, dtype=dtype)
    v = torch.randn(2, 2, 37, 32, dtype=dtype)
    q = torch.randn(2, 2 * group, 3, 32, dtype=dtype)
    keys, values = codec.encode_keys(k), codec.encode_values(v)
    assert torch.equal(keys.fields["data"][:, :, :37], k)
    assert torch.equal(values.fields["data"][:, :, :37], v)
    # Hugging Face's GQA: query head h reads KV head h // group.
    k_rep = k.double().repeat_interleave(group, dim=1)
    v_rep = v.double().repeat_interleave(group, dim=1)
    scores = codec.key_scores(q, keys)
    assert scores.dtype == torch.float32
    expected = torch.matmul(q.double(), k_rep.transpose(-1, -2))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(scores.double(), expected, rtol=tol, atol=tol * 4)
    p = torch.softmax(scores, dim=-1)
    out = codec.attend_values(p, values)
    torch.testing.assert_close(out.double(), torch.matmul(p.double(), v_rep), rtol=tol, atol=tol)


def test_nbytes_counts_every_stored_element():
    codec = make_codec("fp16", head_dim=64)
    keys = codec.encode_keys(torch.randn(1, 4, 10, 64, dtype=torch.bfloat16))
    assert codec.nbytes(keys) == 1 * 4 * 10 * 64 * 2
    reserved = codec.new_keys(1, 4, dtype=torch.bfloat16, capacity=1000)
    assert codec.nbytes(reserved) == 0  # reserved room is not data


def test_bytes_round_trip_and_fingerprint_check():
    codec = make_codec("fp16", head_dim=16)
    keys = codec.encode_keys(torch.randn(1, 2, 5, 16))
    data = codec.to_bytes(keys)
    again = codec.from_bytes(data)
    assert torch.equal(again.fields["data"][:, :, :5], keys.fields["data"][:, :, :5])
    assert codec.to_bytes(again) == data
    with pytest.raises(ValueError, match="fingerprint"):
        make_codec("fp16", head_dim=32).from_bytes(data)

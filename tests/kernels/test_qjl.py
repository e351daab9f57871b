"""QJL keys: sketch construction, fused quantize and score kernels vs reference, and the
estimator's statistics (unbiased, variance within pi/(2m) ||q||^2 ||k||^2 per part)."""

from __future__ import annotations

import math

import pytest
import torch
from kvpack.kernels import make_codec, qjl_reference, qjl_triton
from kvpack.kernels.bitpack import unpack_codes
from kvpack.kernels.qjl_sketch import make_sketches, rounded


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(3)


def test_sketch_rows_are_orthogonal_with_norm_sqrt_d_and_seeded():
    head_dim, sketch_dim = 32, 80  # three blocks, the last one partial
    sketches = make_sketches(head_dim, sketch_dim, 24, seed=7)
    s = sketches.inlier.double()
    assert s.shape == (80, 32) and sketches.outlier.shape == (24, 32)
    torch.testing.assert_close(
        s.norm(dim=1), torch.full((80,), math.sqrt(32.0), dtype=torch.float64)
    )
    for start in (0, 32, 64):
        block = s[start : start + 32]
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-4, rtol=0)
    again = make_sketches(head_dim, sketch_dim, 24, seed=7)
    assert torch.equal(again.inlier, sketches.inlier) and again.digest == sketches.digest
    other = make_sketches(head_dim, sketch_dim, 24, seed=8)
    assert not torch.equal(other.inlier, sketches.inlier) and other.digest != sketches.digest


def _codecs(head_dim, **params):
    return (
        make_codec("qjl", head_dim=head_dim, use_triton=False, **params),
        make_codec("qjl", head_dim=head_dim, use_triton=True, **params),
    )


def _projections(codec, k):
    """Inlier projections S k_in of the reference, to locate sign decisions near zero."""
    sketch = rounded(codec.key_format.sketches.inlier, k.dtype)
    groups = k.float().reshape(*k.shape[:2], -1, codec.group_size, k.shape[-1])
    n_out = codec.key_format.num_outliers
    if n_out:
        index = qjl_reference.select_outliers(groups, n_out)
        mask = torch.zeros(groups.shape[:3] + (k.shape[-1],), dtype=torch.bool).scatter_(
            -1, index, True
        )
        groups = groups.masked_fill(mask[..., None, :], 0.0)
    return (groups @ sketch.T).reshape(*k.shape[:3], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "head_dim,sketch_dim,outliers,outlier_dim", [(64, 64, 4, 32), (48, 128, 0, 0), (32, 40, 32, 16)]
)
def test_fused_quantize_matches_reference(dtype, head_dim, sketch_dim, outliers, outlier_dim):
    ref, tri = _codecs(
        head_dim, sketch_dim=sketch_dim, outlier_channels=outliers, outlier_sketch_dim=outlier_dim,
        group_size=16,
    )  # fmt: skip
    k = torch.randn(2, 3, 48, head_dim).to(dtype)
    expected = ref.key_format.pack(k, False)
    actual = tri.key_format.pack(k, True)
    assert set(actual) == set(expected)
    # Sign bits may differ only where the projection is zero up to float32 summation order.
    flipped = unpack_codes(actual["signs"], 1) != unpack_codes(expected["signs"], 1)
    near_zero = _projections(ref, k).abs() < 1e-4 * k.float().norm(dim=-1, keepdim=True)
    assert not (flipped & ~near_zero).any()
    torch.testing.assert_close(actual["norm"], expected["norm"], rtol=2e-3, atol=1e-6)
    if outliers:
        assert torch.equal(actual["outlier_index"], expected["outlier_index"])
        assert torch.equal(actual["outlier_signs"], expected["outlier_signs"])
        torch.testing.assert_close(
            actual["outlier_norm"], expected["outlier_norm"], rtol=2e-3, atol=1e-6
        )


def test_outliers_are_the_highest_energy_channels_of_each_group():
    ref, _ = _codecs(32, sketch_dim=32, outlier_channels=2, outlier_sketch_dim=16, group_size=16)
    k = torch.randn(1, 1, 32, 32) * 0.1
    k[0, 0, :16, 5] = 9.0  # group 0: channels 5 and 20 dominate
    k[0, 0, :16, 20] = -4.0
    k[0, 0, 16:, 30] = 3.0  # group 1: channel 30, then channel 1
    k[0, 0, 16:, 1] = 2.0
    fields = ref.key_format.pack(k, False)
    assert fields["outlier_index"][0, 0].tolist() == [[5, 20], [30, 1]]
    torch.testing.assert_close(fields["outlier_norm"][0, 0, 0], torch.tensor(math.hypot(9.0, 4.0)))


@pytest.mark.parametrize(
    "group_heads,num_queries,outliers", [(1, 1, 0), (3, 5, 4), (4, 1, 4), (8, 3, 0), (8, 1, 4)]
)
def test_scores_match_reference(group_heads, num_queries, outliers):
    ref, tri = _codecs(
        64, sketch_dim=64, outlier_channels=outliers, outlier_sketch_dim=32, group_size=16
    )
    k = torch.randn(2, 2, 48, 64)
    q = torch.randn(2, 2 * group_heads, num_queries, 64) * 3
    keys = ref.encode_keys(k)
    expected = ref.key_scores(q, keys)
    actual = tri.key_scores(q, keys)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_zero_keys_and_zero_queries_score_zero_without_nan():
    for use_triton in (False, True):
        codec = make_codec("qjl", head_dim=32, sketch_dim=32, outlier_channels=4,
                           outlier_sketch_dim=16,
                           group_size=16, use_triton=use_triton)  # fmt: skip
        k = torch.randn(1, 2, 32, 32)
        k[0, 0] = 0.0
        keys = codec.encode_keys(k)
        q = torch.randn(1, 2, 1, 32)
        q[0, 1] = 0.0
        scores = codec.key_scores(q, keys)
        assert torch.isfinite(scores).all()
        assert (scores[0, 0] == 0).all() and (scores[0, 1] == 0).all()


def _estimates(q, k, seeds, **params):
    """Inlier and outlier parts of the estimator for one (q, k) across sketch seeds."""
    inlier, outlier = [], []
    for seed in seeds:
        codec = make_codec("qjl", head_dim=q.shape[-1], seed=seed, use_triton=False, **params)
        keys = codec.encode_keys(k)
        only_inlier = dict(keys.fields)
        only_outlier = dict(keys.fields)
        fmt = codec.key_format
        sketch, outlier_sketch = fmt._sketches(k.dtype, k.device)
        if "outlier_norm" in keys.fields:
            only_inlier["outlier_norm"] = torch.zeros_like(keys.fields["outlier_norm"])
            only_outlier["norm"] = torch.zeros_like(keys.fields["norm"])
        args = (keys.num_packed, sketch, outlier_sketch, fmt.num_outliers, codec.group_size)
        inlier.append(qjl_reference.key_scores(q, only_inlier, *args)[0, 0, 0, 0].double())
        if "outlier_norm" in keys.fields:
            outlier.append(qjl_reference.key_scores(q, only_outlier, *args)[0, 0, 0, 0].double())
    return torch.stack(inlier), (torch.stack(outlier) if outlier else None)


def _sphere_factor(head_dim: int) -> float:
    """E of the estimator / <q, k> for rows uniform on the sphere of radius sqrt(d) (orthogonalized
    Gaussian rows): sqrt(d) / E||g|| with g ~ N(0, I_d), 1 + 1/(4d) + O(1/d^2)."""
    expected_chi = math.sqrt(2) * math.exp(
        math.lgamma((head_dim + 1) / 2) - math.lgamma(head_dim / 2)
    )
    return math.sqrt(head_dim) / expected_chi


def test_estimator_is_unbiased_with_variance_within_the_bound():
    head_dim, sketch_dim, outlier_dim, num_seeds = 32, 32, 16, 400
    q = torch.randn(1, 1, 1, head_dim)
    k = torch.randn(1, 1, 16, head_dim)
    k[..., 3] += 6.0  # one clear outlier channel in the group
    inlier, outlier = _estimates(
        q, k, range(num_seeds), sketch_dim=sketch_dim, outlier_channels=1,
        outlier_sketch_dim=outlier_dim, group_size=16,
    )  # fmt: skip
    q_vec, k_vec = q[0, 0, 0].double(), k[0, 0, 0].double()
    k_in = k_vec.clone()
    k_in[3] = 0.0
    parts = [
        # (samples, <q, k_part> expected, bound pi/(2m) ||q_part||^2 ||k_part||^2, mean factor)
        (inlier, q_vec @ k_in, math.pi / (2 * sketch_dim) * q_vec.norm() ** 2 * k_in.norm() ** 2,
         _sketch_factor := _sphere_factor(head_dim)),
        (outlier, q_vec[3] * k_vec[3],
         math.pi / (2 * outlier_dim) * q_vec[3] ** 2 * k_vec[3] ** 2, 1.0),
    ]  # fmt: skip
    for samples, truth, bound, factor in parts:
        standard_error = samples.std() / math.sqrt(num_seeds)
        assert abs(samples.mean() - factor * truth) < 4 * standard_error
        # the sample variance of 400 draws is within ~7% of the true one (4 sigma: +28%)
        assert samples.var() <= 1.3 * bound
    # the estimate is informative: its error is far below ||q|| ||k||
    total = inlier + outlier
    assert (total - q_vec @ k_vec).abs().mean() < 0.5 * q_vec.norm() * k_vec.norm()


def test_more_sketch_rows_shrink_the_error():
    q = torch.randn(1, 1, 1, 32)
    k = torch.randn(1, 1, 16, 32)
    truth = (q[0, 0, 0] @ k[0, 0, 0]).item()
    errors = []
    for sketch_dim in (16, 128):
        samples, _ = _estimates(
            q, k, range(120), sketch_dim=sketch_dim, outlier_channels=0, group_size=16
        )
        errors.append(((samples - truth) ** 2).mean().item())
    assert errors[1] < errors[0] / 4  # variance ~ 1/m: 8x more rows, >4x less error


def test_bfloat16_reference_path():
    # The CPU interpreter has no bfloat16 arithmetic: bfloat16 runs through the reference here and
    # through the kernels in bench/kernels/bench_kernels.py on a GPU.
    codec = make_codec("qjl", head_dim=64, sketch_dim=256, outlier_channels=4,
                       outlier_sketch_dim=64,
                       use_triton=False)  # fmt: skip
    k = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    q = torch.randn(1, 4, 1, 64, dtype=torch.bfloat16)
    keys = codec.encode_keys(k)
    assert keys.fields["norm"].dtype == torch.bfloat16
    exact = torch.matmul(q.float().reshape(1, 2, 2, 64), k.float().transpose(-1, -2)).reshape(
        1, 4, 1, 64
    )
    scores = codec.key_scores(q, keys)
    assert ((scores - exact).norm() / exact.norm()) < 0.6


@pytest.mark.parametrize("tile_tokens,max_row_tile", [(16, 16), (64, 2), (64, 1)])
def test_score_tile_sizes_agree(monkeypatch, tile_tokens, max_row_tile):
    # Any number of groups per loop step and any row tiling compute the same scores (the
    # benchmark times several); 6 rows per KV head in tiles of 2 or 1 take several row tiles.
    monkeypatch.setattr(qjl_triton, "SCORE_TILE_TOKENS", tile_tokens)
    monkeypatch.setattr(qjl_triton, "SCORE_MAX_ROW_TILE", max_row_tile)
    ref, tri = _codecs(32, sketch_dim=32, outlier_channels=3, outlier_sketch_dim=16, group_size=16)
    keys = ref.encode_keys(torch.randn(1, 2, 80, 32))  # 5 groups per head: the last tile is partial
    q = torch.randn(1, 4, 3, 32)
    torch.testing.assert_close(
        tri.key_scores(q, keys), ref.key_scores(q, keys), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("tile_tokens", [16, 64])
def test_quantize_tile_sizes_agree(monkeypatch, tile_tokens):
    # One or several groups per loop step (the block-diagonal outlier operand spans them).
    monkeypatch.setattr(qjl_triton, "QUANTIZE_TILE_TOKENS", tile_tokens)
    ref, tri = _codecs(32, sketch_dim=32, outlier_channels=3, outlier_sketch_dim=16, group_size=16)
    k = torch.randn(1, 2, 80, 32)
    expected = ref.key_format.pack(k, False)
    actual = tri.key_format.pack(k, True)
    for name in ("signs", "outlier_signs", "outlier_index"):
        assert torch.equal(actual[name], expected[name]), name
    for name in ("norm", "outlier_norm"):
        torch.testing.assert_close(actual[name], expected[name], rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("tile_tokens", [16, 32])
@pytest.mark.parametrize("sketch_dim, outlier_sketch_dim", [(32, 16), (136, 72)])
def test_narrow_planes_change_nothing(monkeypatch, tile_tokens, sketch_dim, outlier_sketch_dim):
    # Sign-byte dots only as wide as the bytes (QUANTIZE_NARROW_PLANES; 136 bits = 17 bytes -> 32,
    # 72 bits = 9 bytes -> 16) pack the bytes of the padded dots and of the reference, with ties
    # (a zero group) and padding channels (head_dim 48 pads to 64).
    monkeypatch.setattr(qjl_triton, "QUANTIZE_TILE_TOKENS", tile_tokens)
    ref, tri = _codecs(48, sketch_dim=sketch_dim, outlier_channels=3,
                       outlier_sketch_dim=outlier_sketch_dim, group_size=16)
    k = torch.randn(2, 2, 80, 48)
    k[1, 0, 16:32] = 0.0  # a zero group
    k[0, 1, 40, 3:] = 0.0  # a token that may be all outlier
    expected = ref.key_format.pack(k, False)
    baseline = tri.key_format.pack(k, True)
    monkeypatch.setattr(qjl_triton, "QUANTIZE_NARROW_PLANES", True)
    actual = tri.key_format.pack(k, True)
    for name in ("signs", "outlier_signs", "outlier_index", "norm", "outlier_norm"):
        assert torch.equal(actual[name], baseline[name]), name
    for name in ("signs", "outlier_signs", "outlier_index"):
        assert torch.equal(actual[name], expected[name]), name
    for name in ("norm", "outlier_norm"):
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=0)


def test_zero_keys_pack_zero_bits():
    # The reference's bits are `projection > 0`: a key that is zero (or zero outside its outlier
    # channels) has all-zero inlier bits, on both paths.
    ref, tri = _codecs(32, sketch_dim=32, outlier_channels=2, outlier_sketch_dim=16, group_size=16)
    k = torch.randn(1, 1, 32, 32)
    k[0, 0, 3] = 0.0
    k[0, 0, 20, 2:] = 0.0  # may be all-outlier: then its inlier part is zero
    expected = ref.key_format.pack(k, False)
    actual = tri.key_format.pack(k, True)
    assert (expected["signs"][0, 0, 3] == 0).all()
    assert torch.equal(actual["signs"], expected["signs"])
    assert torch.equal(actual["outlier_signs"], expected["outlier_signs"])

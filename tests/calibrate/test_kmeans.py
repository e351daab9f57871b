"""Weighted 1-D k-means and the other calibration statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvpack.calibrate.calibrate import calibrate_layer, channel_quantiles, qnorm_constants
from kvpack.calibrate.fisher import LayerActivations
from kvpack.calibrate.kmeans import weighted_kmeans_1d
from kvpack.kernels import kvquant_reference as reference


def _assign(points, centroids):
    return reference.nearest_codes(points, (centroids[1:] + centroids[:-1]) / 2)


def test_separated_clusters_give_their_weighted_means():
    g = torch.Generator().manual_seed(0)
    groups = [torch.randn(200, generator=g) * 0.01 + center for center in (-3.0, 0.0, 5.0)]
    points = torch.cat(groups)
    weights = torch.rand(600, generator=g) + 0.1
    centroids = weighted_kmeans_1d(points, weights, 3)
    for i, group in enumerate(groups):
        w = weights[i * 200 : (i + 1) * 200]
        torch.testing.assert_close(centroids[i], (group * w).sum() / w.sum(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_result_is_a_lloyd_fixed_point(seed):
    """Every centroid is the weighted mean of the points nearest to it."""
    g = torch.Generator().manual_seed(seed)
    points = torch.cat((torch.randn(3000, generator=g), torch.randn(300, generator=g) * 0.1 + 2))
    weights = torch.rand(3300, generator=g).square()
    centroids = weighted_kmeans_1d(points, weights, 8)
    assert torch.all(centroids[1:] > centroids[:-1])
    codes = _assign(points, centroids)
    for i in range(8):
        chosen = codes == i
        mean = (points[chosen].double() * weights[chosen]).sum() / weights[chosen].sum()
        assert abs(float(mean) - float(centroids[i])) < 1e-4


def test_weights_pull_the_centroid():
    points = torch.tensor([0.0, 1.0, 10.0])
    light = weighted_kmeans_1d(points, torch.tensor([1.0, 1.0, 1.0]), 2)
    heavy = weighted_kmeans_1d(points, torch.tensor([1.0, 9.0, 1.0]), 2)
    torch.testing.assert_close(light, torch.tensor([0.5, 10.0]))
    torch.testing.assert_close(heavy, torch.tensor([0.9, 10.0]))


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError, match="distinct"):
        weighted_kmeans_1d(torch.ones(10), torch.ones(10), 4)
    with pytest.raises(ValueError, match="non-negative"):
        weighted_kmeans_1d(torch.arange(10.0), -torch.ones(10), 4)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.2])
def test_channel_quantiles_match_numpy_percentile(fraction):
    x = torch.randn(1001, 7, 3, dtype=torch.float64)
    lower, upper = channel_quantiles(x, fraction)
    expected_lower = np.percentile(x.numpy(), 100 * fraction / 2, axis=0)
    expected_upper = np.percentile(x.numpy(), 100 * (1 - fraction / 2), axis=0)
    np.testing.assert_allclose(lower.numpy(), expected_lower, rtol=1e-12)
    np.testing.assert_allclose(upper.numpy(), expected_upper, rtol=1e-12)


def test_qnorm_restores_mean_and_std():
    points = torch.randn(20000).clamp(-1, 1) * 0.7 + 0.05
    centroids = torch.tensor([-0.8, -0.3, 0.2, 0.9])
    scale, offset = qnorm_constants(points, centroids)
    snapped = centroids[_assign(points, centroids)] * scale + offset
    torch.testing.assert_close(snapped.mean(), points.mean(), rtol=0, atol=1e-4)
    torch.testing.assert_close(snapped.std(), points.std(), rtol=1e-4, atol=0)


def test_s_squared_weighting_lowers_the_fisher_weighted_error():
    """Eq. 7: with s^2 in the weights the codebook minimizes sum F (k - k^)^2 in activation units,
    so it beats the reference code's codebook (Fisher alone) on that objective."""
    g = torch.Generator().manual_seed(4)
    tokens = 4000
    # channel 0: wide range, mass near +-0.8 of it; channel 1: narrow range, mass near 0
    wide = (torch.sign(torch.randn(tokens, generator=g)) * 0.8
            + torch.randn(tokens, generator=g) * 0.05)
    narrow = torch.randn(tokens, generator=g) * 0.2
    keys = torch.stack((wide * 10, narrow * 0.1), dim=-1)[:, None, :]  # [N, 1, 2]
    fisher = torch.ones_like(keys)
    acts = LayerActivations(keys, fisher, keys.clone(), fisher.clone())
    layer = calibrate_layer(acts, bits_list=[2], outliers=0.0)
    zero, scale = layer["key_zero"], layer["key_scale"]
    normalized = (keys - zero) / scale

    def weighted_error(centroids):
        dense = centroids[_assign(normalized, centroids)] * scale + zero
        return float(((keys - dense) ** 2 * fisher).sum())

    fisher_only = weighted_kmeans_1d(normalized, fisher, 4)
    assert weighted_error(layer["key_centroids"][2]) < 0.5 * weighted_error(fisher_only)


def test_evenly_spaced_codebooks_where_asked():
    """even_key_bits / even_value_bits replace the k-means fit by the grid of min-max integer
    quantization over [-1, 1]: its in-range error is at most half a step everywhere, where the
    k-means codebook, crowding the dense middle, leaves wider gaps near the ends of the range."""
    g = torch.Generator().manual_seed(6)
    keys = torch.randn(3000, 2, 16, generator=g)
    values = torch.randn(3000, 2, 16, generator=g)
    fisher = torch.rand(3000, 2, 16, generator=g)
    acts = LayerActivations(keys, fisher, values, fisher.clone())
    layer = calibrate_layer(acts, bits_list=[2, 3, 4], outliers=0.01, even_key_bits=(4,),
                            even_value_bits=(2,))
    fitted = calibrate_layer(acts, bits_list=[2, 3, 4], outliers=0.01, even_key_bits=(),
                             even_value_bits=())
    torch.testing.assert_close(layer["key_centroids"][4], torch.linspace(-1, 1, 16))
    torch.testing.assert_close(layer["value_centroids"][2], torch.linspace(-1, 1, 4))
    for kind, bits in (("key", 2), ("key", 3), ("value", 3), ("value", 4)):  # still k-means
        torch.testing.assert_close(layer[f"{kind}_centroids"][bits],
                                   fitted[f"{kind}_centroids"][bits])
    assert not torch.allclose(fitted["key_centroids"][4], torch.linspace(-1, 1, 16), atol=1e-2)
    # Q-Norm constants belong to the codebook actually stored
    normalized = (keys - layer["key_zero"]) / layer["key_scale"]
    inliers = normalized[normalized.abs() <= 1]
    torch.testing.assert_close(layer["key_qnorm"][4],
                               qnorm_constants(inliers, torch.linspace(-1, 1, 16)))

    def worst_error(centroids):
        return float((inliers - centroids[_assign(inliers, centroids)]).abs().max())

    assert worst_error(layer["key_centroids"][4]) <= 1 / 15 + 1e-6
    assert worst_error(fitted["key_centroids"][4]) > 1.5 / 15


def test_default_codebooks_and_bad_widths():
    """The defaults (docs/eval.md): evenly spaced 4-bit keys, k-means everywhere else."""
    from kvpack.calibrate.calibrate import (
        EVEN_KEY_BITS,
        EVEN_VALUE_BITS,
        calibration_from_activations,
    )

    assert (EVEN_KEY_BITS, EVEN_VALUE_BITS) == ((4,), ())
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2000, 1, 8, generator=g)
    acts = LayerActivations(x, torch.ones_like(x), x.clone(), torch.ones_like(x))
    layer = calibrate_layer(acts, bits_list=[3, 4], outliers=0.01)
    torch.testing.assert_close(layer["key_centroids"][4], torch.linspace(-1, 1, 16))
    assert not torch.allclose(layer["value_centroids"][4], torch.linspace(-1, 1, 16), atol=1e-2)
    with pytest.raises(ValueError, match="bits"):
        calibration_from_activations([acts], None, bits_list=[4], outliers=0.01, sink_tokens=1,
                                     text_sha256="", num_tokens=0, sequence_length=1,
                                     progress=False, even_key_bits=(5,))

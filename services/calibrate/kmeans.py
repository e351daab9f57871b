"""Weighted 1-D k-means: the per-layer non-uniform datatype of KVQuant (paper Eq. 7).

KVQuant fits one codebook per layer and tensor to every (normalized) element at once, each
weighted by its sensitivity. 1-D Lloyd iterations need only a sort and prefix sums: with the points
sorted, every cluster is a contiguous run, so one iteration is a `searchsorted` of the midpoints
plus differences of cumulative weights, O(k log n) after the O(n log n) sort.
"""

from __future__ import annotations

import torch


def weighted_kmeans_1d(
    points: torch.Tensor, weights: torch.Tensor, num_clusters: int, *, max_iterations: int = 100
) -> torch.Tensor:
    """Centroids (sorted, float32 [num_clusters]) minimizing sum_i w_i (x_i - c(x_i))^2.

    Starts from weighted quantiles (deterministic; no seed needed) and runs Lloyd iterations
    until the centroids stop moving. A cluster that empties keeps its previous centroid.

    Raises:
        ValueError: fewer distinct points than clusters, or negative / non-finite weights.
    """
    points = points.reshape(-1).double()
    weights = weights.reshape(-1).double()
    if points.numel() != weights.numel():
        raise ValueError("points and weights must have the same number of elements")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    if torch.unique(points).numel() < num_clusters:
        raise ValueError(f"need at least {num_clusters} distinct points to fit as many clusters")
    # A tiny floor keeps zero-sensitivity points from leaving a cluster with no weight at all.
    weights = weights + 1e-12 * max(float(weights.mean()), 1e-30)
    order = points.argsort()
    points, weights = points[order], weights[order]
    zero = points.new_zeros(1)
    cumulative_weight = torch.cat((zero, weights.cumsum(0)))
    cumulative_moment = torch.cat((zero, (weights * points).cumsum(0)))
    total = float(cumulative_weight[-1])

    targets = (torch.arange(num_clusters, dtype=torch.float64) + 0.5) / num_clusters * total
    start = torch.searchsorted(cumulative_weight[1:], targets).clamp_max(points.numel() - 1)
    centroids = torch.unique(points[start])
    if centroids.numel() < num_clusters:  # heavy ties: fall back to evenly spaced order stats
        centroids = torch.unique(points).quantile(torch.linspace(0, 1, num_clusters,
                                                                 dtype=torch.float64))
    for _ in range(max_iterations):
        midpoints = (centroids[1:] + centroids[:-1]) / 2
        cuts = torch.cat((
            torch.zeros(1, dtype=torch.long),
            torch.searchsorted(points, midpoints, right=True),
            torch.full((1,), points.numel(), dtype=torch.long),
        ))
        mass = cumulative_weight[cuts[1:]] - cumulative_weight[cuts[:-1]]
        moment = cumulative_moment[cuts[1:]] - cumulative_moment[cuts[:-1]]
        updated = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centroids).sort().values
        moved = float((updated - centroids).abs().max())
        centroids = updated
        if moved <= 1e-7 * float(points[-1] - points[0] + 1e-30):
            break
    return centroids.float()

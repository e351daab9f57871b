"""PyTorch reference of QJL keys (research/qjl.md §1-2; arXiv 2406.03482).

Per group of `group_size` tokens (per batch row and KV head):
- outlier channels O: the `num_outliers` channels of largest energy sum_t k[t, c]^2 over the group,
  picked one at a time by argmax (lowest index wins ties), stored as uint8 indices;
- inlier part k_in = k with the channels O zeroed: bits sign(S k_in) > 0 packed (kernels/bitpack.py)
  and the norm ||k_in|| (input dtype);
- outlier part k_O = k restricted to O: bits sign(S_o[:, O] k_O) > 0 and ||k_O||.

Scores (the unbiased estimator, one term per part, sigma = 2 * bit - 1):

    q·k ~ sqrt(pi/2)/m   * ||k_in|| * <S q,          sigma_in>
        + sqrt(pi/2)/m_o * ||k_O||  * <S_o[:, O] q_O, sigma_O>

The inlier term sketches the whole query: E<S q, sign(S k_in)> is proportional to <q, k_in> whatever
q holds on O, so the query sketch is computed once per query instead of once per group (variance
pi/(2m) ||q||^2 ||k_in||^2). The outlier term uses q_O only
(variance pi/(2 m_o) ||q_O||^2 ||k_O||^2),
which matters because ||k_O|| is large. Each bit with value 0 means -1, so a zero key scores 0.
"""

from __future__ import annotations

import math

import torch

from .bitpack import pack_codes, unpack_codes
from .gqa import per_query_head, rows_per_kv_head

SQRT_HALF_PI = math.sqrt(math.pi / 2)


def select_outliers(groups: torch.Tensor, num_outliers: int) -> torch.Tensor:
    """groups float32 [..., G, D] -> int64 [..., num_outliers] channels, by descending energy."""
    energy = (groups * groups).sum(dim=-2)
    picked = []
    for _ in range(num_outliers):
        best = energy.argmax(dim=-1, keepdim=True)
        picked.append(best)
        energy = energy.scatter(-1, best, -2.0)
    return torch.cat(picked, dim=-1)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=-1).sqrt()


def quantize_keys(
    x: torch.Tensor,
    sketch: torch.Tensor,
    outlier_sketch: torch.Tensor,
    num_outliers: int,
    group_size: int,
) -> dict[str, torch.Tensor]:
    """x [B, H, T, D] (T a multiple of group_size); sketches float32, rounded to x's dtype."""
    batch, heads, num_tokens, head_dim = x.shape
    groups = x.float().reshape(batch, heads, num_tokens // group_size, group_size, head_dim)
    fields = {}
    inliers = groups
    if num_outliers:
        index = select_outliers(groups, num_outliers)
        is_outlier = torch.zeros(groups.shape[:3] + (head_dim,), dtype=torch.bool, device=x.device)
        is_outlier.scatter_(-1, index, True)
        inliers = groups.masked_fill(is_outlier[..., None, :], 0.0)
        outliers = groups.gather(-1, index[..., None, :].expand(*groups.shape[:-1], num_outliers))
        outlier_columns = outlier_sketch.T[index]  # [B, H, groups, num_outliers, m_o]
        projection = torch.matmul(outliers, outlier_columns)
        fields["outlier_signs"] = pack_codes(projection > 0, 1).reshape(
            batch, heads, num_tokens, -1
        )
        fields["outlier_norm"] = _norm(outliers).reshape(batch, heads, num_tokens).to(x.dtype)
        fields["outlier_index"] = index.to(torch.uint8)
    projection = torch.matmul(inliers, sketch.T)
    fields["signs"] = pack_codes(projection > 0, 1).reshape(batch, heads, num_tokens, -1)
    fields["norm"] = _norm(inliers).reshape(batch, heads, num_tokens).to(x.dtype)
    return fields


def _signs(packed: torch.Tensor) -> torch.Tensor:
    return unpack_codes(packed, 1).float() * 2 - 1


def key_scores(
    q: torch.Tensor,
    fields: dict[str, torch.Tensor],
    num_tokens: int,
    sketch: torch.Tensor,
    outlier_sketch: torch.Tensor,
    num_outliers: int,
    group_size: int,
) -> torch.Tensor:
    """q [B, H_q, T_q, D] against the first num_tokens packed keys
    -> float32 [B, H_q, T_q, num_tokens]."""
    heads = fields["signs"].shape[1]
    rows = rows_per_kv_head(q.float(), heads)  # [B, H, M, D]
    query_sketch = torch.matmul(rows, sketch.T)
    signs = _signs(fields["signs"][:, :, :num_tokens])
    norm = fields["norm"][:, :, :num_tokens].float()
    scale = SQRT_HALF_PI / sketch.shape[0]
    scores = scale * torch.matmul(query_sketch, signs.transpose(-1, -2)) * norm[:, :, None, :]
    if num_outliers:
        batch, _, num_rows, _ = rows.shape
        num_groups = num_tokens // group_size
        index = fields["outlier_index"][:, :, :num_groups].long()  # [B, H, groups, n_out]
        gather_index = index[:, :, :, None, :].expand(
            batch, heads, num_groups, num_rows, num_outliers
        )
        query_outliers = (
            rows[:, :, None].expand(-1, -1, num_groups, -1, -1).gather(-1, gather_index)
        )
        outlier_query_sketch = torch.matmul(
            query_outliers, outlier_sketch.T[index]
        )  # [B, H, g, M, m_o]
        outlier_signs = _signs(fields["outlier_signs"][:, :, :num_tokens])
        outlier_signs = outlier_signs.reshape(batch, heads, num_groups, group_size, -1)
        part = torch.matmul(
            outlier_query_sketch, outlier_signs.transpose(-1, -2)
        )  # [B, H, g, M, G]
        part = part.permute(0, 1, 3, 2, 4).reshape(batch, heads, num_rows, num_tokens)
        outlier_norm = fields["outlier_norm"][:, :, :num_tokens].float()
        scores = (
            scores + SQRT_HALF_PI / outlier_sketch.shape[0] * part * outlier_norm[:, :, None, :]
        )
    return per_query_head(scores, q.shape[1], q.shape[2])

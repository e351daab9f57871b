"""Grouped-query attention head bookkeeping shared by the kernels and their references.

Query head h reads KV head h // group (group = H_q // H_kv), so the query heads of one KV head are
contiguous: q [B, H_q, T_q, D] is viewed as [B, H_kv, group * T_q, D] ("rows" of a KV head, row
r = local head r // T_q, query token r % T_q) without copying.
"""

from __future__ import annotations

import torch


def query_group(num_query_heads: int, num_kv_heads: int) -> int:
    if num_query_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_query_heads}) must be a multiple of "
            f"key/value heads ({num_kv_heads})"
        )
    return num_query_heads // num_kv_heads


def rows_per_kv_head(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H_q, T_q, N] -> [B, H_kv, group * T_q, N]."""
    batch, num_query_heads, num_queries, width = x.shape
    group = query_group(num_query_heads, num_kv_heads)
    return x.reshape(batch, num_kv_heads, group * num_queries, width)


def per_query_head(x: torch.Tensor, num_query_heads: int, num_queries: int) -> torch.Tensor:
    """[B, H_kv, group * T_q, N] -> [B, H_q, T_q, N]."""
    return x.reshape(x.shape[0], num_query_heads, num_queries, x.shape[-1])

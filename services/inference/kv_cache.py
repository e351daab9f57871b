"""A sequence's KV cache: per layer, packed keys and values attended through a codec.

Attention never dequantizes the cache: scores come from `codec.key_scores(q, keys)` and outputs
from `codec.attend_values(p, values)`; softmax runs in float32 between the two.

Each layer's cache is a list of segments. The live segment grows token by token through
`append_keys` / `append_values`. When a sequence shares prefixes through the kvstore, every full
block of `block_tokens` prompt tokens is sealed into its own segment: its packed bytes are then
exactly what the store keeps (`codec.to_bytes`), and a block fetched from the store becomes a
sealed segment as is (`codec.from_bytes`), with no re-encoding. Scores of all segments are
concatenated before one softmax, so the result equals attention over one contiguous cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvpack.kernels.codec import KVCodec


@dataclass
class Segment:
    keys: Any
    values: Any
    num_tokens: int


class LayerCache:
    """One layer of one sequence."""

    def __init__(self, codec: KVCodec, *, pre_rope_keys: bool = False) -> None:
        self.codec = codec
        self.pre_rope_keys = pre_rope_keys
        self.segments: list[Segment] = []
        self.live: Segment | None = None

    @property
    def num_tokens(self) -> int:
        live = self.live.num_tokens if self.live else 0
        return live + sum(segment.num_tokens for segment in self.segments)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None) -> None:
        """Add keys/values [1, H_kv, T, D] of the next T tokens to the live segment."""
        codec = self.codec
        if self.live is None:
            self.live = Segment(codec.encode_keys(k, positions), codec.encode_values(v), k.shape[2])
        else:
            self.live.keys = codec.append_keys(self.live.keys, k, positions)
            self.live.values = codec.append_values(self.live.values, v)
            self.live.num_tokens += k.shape[2]

    def seal(self) -> Segment:
        """Close the live segment (a full block); later tokens start a new one."""
        assert self.live is not None, "seal() without tokens"
        segment, self.live = self.live, None
        self.segments.append(segment)
        return segment

    def add_sealed(self, keys: Any, values: Any, num_tokens: int) -> None:
        assert self.live is None, "stored blocks go before any computed token"
        self.segments.append(Segment(keys, values, num_tokens))

    def _all_segments(self) -> list[Segment]:
        return self.segments + ([self.live] if self.live else [])

    def attend(self, q: torch.Tensor, scaling: float, num_new_tokens: int) -> torch.Tensor:
        """softmax(q·Kᵀ·scaling, causal) · V for q [1, H_q, T_q, D] of the last T_q appended tokens.

        Returns [1, H_q, T_q, D] in q's dtype.
        """
        segments = self._all_segments()
        scores = torch.cat([self.codec.key_scores(q, s.keys) for s in segments], dim=-1)
        scores = scores.float() * scaling
        num_queries, total = q.shape[2], scores.shape[-1]
        if num_queries > 1:
            # query i sits at position total - num_new_tokens + i and sees keys up to there
            query_positions = torch.arange(total - num_new_tokens, total - num_new_tokens + num_queries,
                                           device=q.device)
            key_positions = torch.arange(total, device=q.device)
            future = key_positions[None, :] > query_positions[:, None]
            scores = scores.masked_fill(future, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1).to(q.dtype)
        out = None
        start = 0
        for segment in segments:
            part = self.codec.attend_values(
                probabilities[..., start : start + segment.num_tokens], segment.values)
            out = part if out is None else out + part
            start += segment.num_tokens
        return out

    def nbytes(self) -> int:
        return sum(self.codec.nbytes(s.keys) + self.codec.nbytes(s.values)
                   for s in self._all_segments())


class SequenceCache:
    """All layers of one sequence, with the byte accounting the usage report needs."""

    def __init__(self, codecs: list[KVCodec], *, num_kv_heads: int, head_dim: int,
                 pre_rope_keys: bool = False) -> None:
        self.layers = [LayerCache(codec, pre_rope_keys=pre_rope_keys) for codec in codecs]
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    @property
    def num_tokens(self) -> int:
        return self.layers[0].num_tokens

    def seal(self) -> list[Segment]:
        return [layer.seal() for layer in self.layers]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def fp16_nbytes(self) -> int:
        """What the same tokens take in an uncompressed 16-bit cache (K and V, all layers)."""
        return 2 * 2 * len(self.layers) * self.num_kv_heads * self.head_dim * self.num_tokens

    def compression_ratio(self) -> float:
        stored = self.nbytes()
        return self.fp16_nbytes() / stored if stored else 0.0

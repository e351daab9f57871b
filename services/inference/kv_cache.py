"""A sequence's KV cache: per layer, packed keys and values attended through a codec.

Attention never dequantizes the cache: scores come from `codec.key_scores(q, keys)` and outputs
from `codec.attend_values(p, values)` (both float32); the 1/sqrt(D) scale, causal mask and softmax
run here between the two.

Each layer holds one preallocated key container and one value container of the codec
(`new_keys` / `new_values` with room for the whole request), grown in place by `append_*`. Blocks
for the kvstore are token ranges of the packed region (`block_to_bytes`); stored blocks are loaded
into an empty cache with `append_block`, bit-identical to the cache they came from.
"""

from __future__ import annotations

import torch
from kvpack.kernels.codec import KVCodec


class LayerCache:
    """One layer of one sequence (batch 1)."""

    def __init__(
        self,
        codec: KVCodec,
        *,
        num_kv_heads: int,
        dtype: torch.dtype,
        device: torch.device,
        capacity: int,
        pre_rope_keys: bool,
    ) -> None:
        self.codec = codec
        self.pre_rope_keys = pre_rope_keys
        self.keys = codec.new_keys(1, num_kv_heads, dtype=dtype, device=device, capacity=capacity)
        self.values = codec.new_values(
            1, num_kv_heads, dtype=dtype, device=device, capacity=capacity
        )

    @property
    def num_tokens(self) -> int:
        return self.codec.length(self.keys)

    @property
    def num_packed_tokens(self) -> int:
        """Leading tokens already in packed form (the rest sit in a full-precision window)."""
        return min(_packed(self.codec, self.keys), _packed(self.codec, self.values))

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None) -> None:
        """Add keys/values [1, H_kv, T, D] of the next T tokens (positions [T]: pre-RoPE codecs)."""
        self.codec.append_keys(self.keys, k, positions if self.pre_rope_keys else None)
        self.codec.append_values(self.values, v)

    @property
    def fused_decode(self) -> bool:
        """Whether a single decode token is attended by the codec's fused `decode_attention`."""
        supports = getattr(self.codec, "supports_decode_attention", None)
        return supports is not None and supports(self.keys.dtype) and not self.pre_rope_keys

    def attend(self, q: torch.Tensor, scaling: float, num_new_tokens: int) -> torch.Tensor:
        """softmax(q·Kᵀ·scaling, causal)·V for q [1, H_q, T_q, D] of the last T_q appended tokens.

        Returns [1, H_q, T_q, D] in q's dtype.
        """
        if q.shape[2] == 1 and self.fused_decode:
            lengths = torch.tensor([self.keys.num_packed, self.keys.tail_len], device=q.device)
            return self.codec.decode_attention(q, self.keys, self.values, lengths, scaling)
        scores = self.codec.key_scores(q, self.keys) * scaling
        num_queries, total = q.shape[2], scores.shape[-1]
        if num_queries > 1:
            # query i sits at position total - num_new_tokens + i and sees keys up to there
            first = total - num_new_tokens
            query_positions = torch.arange(first, first + num_queries, device=q.device)
            key_positions = torch.arange(total, device=q.device)
            scores = scores.masked_fill(
                key_positions[None, :] > query_positions[:, None], float("-inf")
            )
        probabilities = torch.softmax(scores, dim=-1).to(q.dtype)
        return self.codec.attend_values(probabilities, self.values).to(q.dtype)

    def block_bytes(self, start: int, end: int) -> tuple[bytes, bytes]:
        return (
            self.codec.block_to_bytes(self.keys, start, end),
            self.codec.block_to_bytes(self.values, start, end),
        )

    def load_block(self, key_bytes: bytes, value_bytes: bytes) -> None:
        self.codec.append_block(self.keys, key_bytes)
        self.codec.append_block(self.values, value_bytes)

    def nbytes(self) -> int:
        return self.codec.nbytes(self.keys) + self.codec.nbytes(self.values)


def _packed(codec: KVCodec, container) -> int:
    # Codecs without a full-precision window (kvquant) pack every token at once.
    num_packed = getattr(container, "num_packed", None)
    return codec.length(container) if num_packed is None else num_packed


class SequenceCache:
    """All layers of one sequence, with the byte accounting the usage report needs."""

    def __init__(
        self,
        codecs: list[KVCodec],
        *,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        capacity: int,
        pre_rope_keys: bool = False,
    ) -> None:
        self.layers = [
            LayerCache(
                codec,
                num_kv_heads=num_kv_heads,
                dtype=dtype,
                device=device,
                capacity=capacity,
                pre_rope_keys=pre_rope_keys,
            )
            for codec in codecs
        ]
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # CUDA graphs of this sequence's decode step (kvpack.inference.decode_graph), made on its
        # first graphed step and freed with the cache.
        self.decode_graphs = None

    @property
    def num_tokens(self) -> int:
        return self.layers[0].num_tokens

    @property
    def num_packed_tokens(self) -> int:
        return min(layer.num_packed_tokens for layer in self.layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def fp16_nbytes(self) -> int:
        """What the same tokens take in an uncompressed 16-bit cache (K and V, all layers)."""
        return 2 * 2 * len(self.layers) * self.num_kv_heads * self.head_dim * self.num_tokens

    def compression_ratio(self) -> float:
        stored = self.nbytes()
        return self.fp16_nbytes() / stored if stored else 0.0

"""The inference service's attention path, opened up for evaluation.

Evaluation must measure exactly what serving computes, so it runs
`kvpack.inference.runner.ModelRunner` over `kvpack.inference.kv_cache` caches.
Two small additions live here rather than in the service:

- `EvalRunner.prefill_logits`: the service's `prefill` returns only the last position's logits;
  perplexity needs every position of a prefill chunk. It walks the same `_layer` as `prefill`.
- `StoredAsLayerCache`: the cache stores keys and values in `cache_dtype` (16-bit by default, as
  on a GPU) while the model computes in float32 on CPU, so bits per number count 16-bit scales,
  norms and windows as deployed. Attention inputs are cast once on append; the codec math is
  unchanged.
"""

from __future__ import annotations

import torch
from kvpack.inference.kv_cache import LayerCache, SequenceCache
from kvpack.inference.methods import PRE_ROPE_METHODS, MethodSpec, build_layer_codecs
from kvpack.inference.runner import ModelRunner, append_and_attend


class StoredAsLayerCache(LayerCache):
    """A LayerCache whose keys and values are stored in the cache's dtype, whatever the model's."""

    def __init__(self, codec, *, dtype: torch.dtype, **kwargs) -> None:
        super().__init__(codec, dtype=dtype, **kwargs)
        self.storage_dtype = dtype

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None) -> None:
        super().append(k.to(self.storage_dtype), v.to(self.storage_dtype), positions)


def new_sequence_cache(runner: ModelRunner, spec: MethodSpec, *, capacity: int,
                       cache_dtype: torch.dtype) -> SequenceCache:
    """An empty cache of one sequence for `spec`, one codec per layer as the engine builds them.

    Raises:
        ValueError: unknown method or parameters the codec rejects.
    """
    codecs = build_layer_codecs(spec, num_layers=runner.num_layers, head_dim=runner.head_dim)
    pre_rope_keys = spec.name in PRE_ROPE_METHODS
    cache = SequenceCache([], num_kv_heads=runner.num_kv_heads, head_dim=runner.head_dim,
                          dtype=cache_dtype, device=runner.device, capacity=capacity,
                          pre_rope_keys=pre_rope_keys)
    cache.layers = [
        StoredAsLayerCache(codec, num_kv_heads=runner.num_kv_heads, dtype=cache_dtype,
                           device=runner.device, capacity=capacity, pre_rope_keys=pre_rope_keys)
        for codec in codecs
    ]
    return cache


class EvalRunner(ModelRunner):
    """ModelRunner plus logits at every position of a prefill chunk."""

    @torch.inference_mode()
    def prefill_logits(self, cache: SequenceCache, token_ids: torch.Tensor,
                       start_position: int) -> torch.Tensor:
        """Run tokens [T] at positions start_position.. of one sequence; returns logits [T, V]."""
        positions = torch.arange(start_position, start_position + token_ids.numel(),
                                 device=self.device)[None, :]
        num_tokens = token_ids.numel()

        def attend(layer_index, q, k, k_rotated, v):
            return append_and_attend(cache.layers[layer_index], q, k, k_rotated, v,
                                      positions[0], self.scaling, num_tokens)

        hidden = self.forward(token_ids[None, :], positions, attend)
        return self.model.lm_head(self.model.model.norm(hidden))[0].float()

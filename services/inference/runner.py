"""The forward pass of a Llama-family model with attention through packed KV caches.

We reuse the model's own modules (embeddings, norms, projections, rotary embedding, MLP), and
replace only attention: keys and values go into each sequence's `SequenceCache`, and past tokens
are attended through the codec (`key_scores` -> softmax -> `attend_values`).

Two entry points:
- `prefill(cache, token_ids, start_position)` runs a chunk of one sequence's prompt;
- `decode(caches, token_ids, positions)` runs one token for each of several sequences at once:
  projections and MLPs are batched across sequences; attention reads each sequence's own cache.
"""

from __future__ import annotations

import torch
from kvpack.inference.kv_cache import SequenceCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class ModelRunner:
    def __init__(self, model) -> None:
        self.model = model
        config = model.config
        self.layers = model.model.layers
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.max_positions = config.max_position_embeddings
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        return self.model.model.rotary_emb(hidden, positions)

    @torch.inference_mode()
    def prefill(
        self, cache: SequenceCache, token_ids: torch.Tensor, start_position: int
    ) -> torch.Tensor:
        """Run tokens [T] at positions start_position.. of one sequence; returns last logits [V]."""
        positions = torch.arange(
            start_position, start_position + token_ids.numel(), device=self.device
        )[None, :]
        hidden = self.model.model.embed_tokens(token_ids[None, :])
        cos, sin = self._rotary(hidden, positions)
        for layer_index, layer in enumerate(self.layers):
            hidden = self._layer(layer, hidden, cos, sin, positions, [cache], layer_index)
        hidden = self.model.model.norm(hidden[:, -1:, :])
        return self.model.lm_head(hidden)[0, -1].float()

    @torch.inference_mode()
    def decode(
        self, caches: list[SequenceCache], token_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One step for N sequences: token_ids [N], positions [N]; returns logits [N, V]."""
        positions = positions[:, None]
        hidden = self.model.model.embed_tokens(token_ids[:, None])
        cos, sin = self._rotary(hidden, positions)
        for layer_index, layer in enumerate(self.layers):
            hidden = self._layer(layer, hidden, cos, sin, positions, caches, layer_index)
        hidden = self.model.model.norm(hidden)
        return self.model.lm_head(hidden)[:, 0].float()

    def _layer(self, layer, hidden, cos, sin, positions, caches, layer_index):
        # hidden: [N, T, hidden]; N sequences (N > 1 only in decode, where T == 1)
        residual = hidden
        hidden = layer.input_layernorm(hidden)
        attention = layer.self_attn
        batch, length, _ = hidden.shape
        q = attention.q_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = attention.k_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = attention.v_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q_rotated, k_rotated = apply_rotary_pos_emb(q, k, cos, sin)
        outputs = []
        for index, cache in enumerate(caches):
            layer_cache = cache.layers[layer_index]
            # KVQuant-style codecs keep pre-RoPE keys and rotate inside their score kernel.
            stored_keys = k if layer_cache.pre_rope_keys else k_rotated
            layer_cache.append(
                stored_keys[index : index + 1], v[index : index + 1], positions[index]
            )
            outputs.append(layer_cache.attend(q_rotated[index : index + 1], self.scaling, length))
        attended = torch.cat(outputs, dim=0).transpose(1, 2).reshape(batch, length, -1)
        hidden = residual + attention.o_proj(attended)
        residual = hidden
        hidden = layer.mlp(layer.post_attention_layernorm(hidden))
        return residual + hidden

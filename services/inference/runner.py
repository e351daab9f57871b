"""The forward pass of a Llama-family model with attention through packed KV caches.

We reuse the model's own modules (embeddings, norms, projections, rotary embedding, MLP), and
replace only attention: keys and values go into each sequence's `SequenceCache`, and past tokens
are attended through the codec (`key_scores` -> softmax -> `attend_values`, or the codec's fused
`decode_attention` for a single decode token).

Two entry points:
- `prefill(cache, token_ids, start_position)` runs a chunk of one sequence's prompt;
- `decode(caches, token_ids, positions)` runs one token for each of several sequences at once:
  projections and MLPs are batched across sequences; attention reads each sequence's own cache.
  A single sequence on a GPU whose codec has a fused decode path replays a CUDA graph of the
  whole step instead (kvpack.inference.decode_graph): one launch instead of ~1000.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from kvpack.inference.decode_graph import DecodeGraphs
from kvpack.inference.kv_cache import SequenceCache
from kvpack.kernels.model_ops_triton import rms_norm, rotary, silu_mul
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# attend(layer_index, q_rotated, k_pre_rope, k_rotated, v) -> attended [N, H_q, T, D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ModelRunner:
    def __init__(self, model, *, cuda_graphs: bool = True) -> None:
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
        # Graphs need CUDA; `cuda_graphs=False` (or setting the attribute) keeps every step eager.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # On a GPU, decode is a chain of matrix-vector products: one product over the
        # concatenated q/k/v (and gate/up) weights reads them at a better rate and launches
        # fewer kernels. The modules' weights become views of the fused ones (no extra memory).
        self._fused = (
            [_fuse_layer(layer) for layer in self.layers] if self.device.type == "cuda" else None
        )
        # On a GPU, RMSNorm (+ the residual add before it), rotary embedding and SiLU-and-multiply
        # run as one Triton kernel each (kernels/model_ops_triton.py) instead of HF's ~700 small
        # kernels per decode step; elsewhere (and for norms or activations of another kind) the
        # model's own modules run, which keeps CPU outputs identical to HF's.
        self._fast_ops = self.device.type == "cuda" and _standard_llama_ops(model)

    @torch.inference_mode()
    def prefill(
        self, cache: SequenceCache, token_ids: torch.Tensor, start_position: int
    ) -> torch.Tensor:
        """Run tokens [T] at positions start_position.. of one sequence; returns last logits [V]."""
        positions = torch.arange(
            start_position, start_position + token_ids.numel(), device=self.device
        )[None, :]
        num_tokens = token_ids.numel()

        def attend(layer_index, q, k, k_rotated, v):
            return append_and_attend(
                cache.layers[layer_index], q, k, k_rotated, v, positions[0], self.scaling,
                num_tokens,
            )  # fmt: skip

        hidden = self.forward(token_ids[None, :], positions, attend)
        hidden = self.model.model.norm(hidden[:, -1:, :])
        return self.model.lm_head(hidden)[0, -1].float()

    @torch.inference_mode()
    def decode(
        self,
        caches: list[SequenceCache],
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        use_graph: bool = True,
    ) -> torch.Tensor:
        """One step for N sequences: token_ids [N], positions [N]; returns logits [N, V].

        `use_graph=False` forces the eager path (e.g. for a request about to finish, for which
        capturing a graph would cost more than it saves)."""
        if use_graph and self.cuda_graphs and len(caches) == 1 and DecodeGraphs.supports(caches[0]):
            (cache,) = caches
            if cache.decode_graphs is None:
                cache.decode_graphs = DecodeGraphs(self.device)
            return cache.decode_graphs.step(self, cache, token_ids, positions)
        return self.eager_decode(caches, token_ids[:, None], positions[:, None])

    def eager_decode(
        self, caches: list[SequenceCache], token_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """token_ids, positions [N, 1] -> logits [N, V], attention through each cache in turn."""

        def attend(layer_index, q, k, k_rotated, v):
            outputs = [
                append_and_attend(
                    cache.layers[layer_index],
                    q[i : i + 1],
                    k[i : i + 1],
                    k_rotated[i : i + 1],
                    v[i : i + 1],
                    positions[i],
                    self.scaling,
                    1,
                )  # fmt: skip
                for i, cache in enumerate(caches)
            ]
            return torch.cat(outputs, dim=0)

        return self.logits(self.forward(token_ids, positions, attend))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decode hidden states [N, 1, hidden] -> float32 logits [N, V]."""
        return self.model.lm_head(self._norm(self.model.model.norm, hidden))[:, 0].float()

    def _norm(self, norm, hidden: torch.Tensor) -> torch.Tensor:
        return self._add_norm(norm, hidden)[0]

    def _add_norm(self, norm, hidden: torch.Tensor, residual: torch.Tensor | None = None):
        """(norm(hidden + residual), hidden + residual); one fused kernel on the fast path."""
        if self._fast_ops:
            return rms_norm(hidden, norm.weight, norm.variance_epsilon, residual=residual)
        if residual is not None:
            hidden = residual + hidden
        return norm(hidden), hidden

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attend: Attend):
        """The decoder stack on token_ids [N, T] at positions [N, T] -> hidden [N, T, hidden]."""
        hidden = self.model.model.embed_tokens(token_ids)
        cos, sin = self.model.model.rotary_emb(hidden, positions)
        for layer_index, layer in enumerate(self.layers):
            hidden = self._layer(layer, layer_index, hidden, cos, sin, attend)
        return hidden

    def _layer(self, layer, layer_index, hidden, cos, sin, attend: Attend):
        # hidden: [N, T, hidden]; N sequences (N > 1 only in decode, where T == 1)
        residual = hidden
        hidden = self._norm(layer.input_layernorm, hidden)
        attention = layer.self_attn
        batch, length, _ = hidden.shape
        fused = self._fused[layer_index] if self._fused is not None else None
        if fused is not None:
            q, k, v = torch.nn.functional.linear(hidden, fused.qkv, fused.qkv_bias).split(
                fused.qkv_sizes, dim=-1
            )
        else:
            q, k, v = attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden)
        q = q.view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, -1, self.head_dim).transpose(1, 2)
        if self._fast_ops:
            q_rotated, k_rotated = rotary(q, k, cos, sin)
        else:
            q_rotated, k_rotated = apply_rotary_pos_emb(q, k, cos, sin)
        attended = attend(layer_index, q_rotated, k, k_rotated, v)
        attended = attended.transpose(1, 2).reshape(batch, length, -1)
        hidden, residual = self._add_norm(
            layer.post_attention_layernorm, attention.o_proj(attended), residual
        )
        mlp = layer.mlp
        if fused is not None and fused.gate_up is not None:
            gate, up = torch.nn.functional.linear(hidden, fused.gate_up).chunk(2, dim=-1)
            activated = silu_mul(gate, up) if self._fast_ops else mlp.act_fn(gate) * up
            hidden = mlp.down_proj(activated)
        else:
            hidden = mlp(hidden)
        return residual + hidden


_STANDARD_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


def _standard_llama_ops(model) -> bool:
    """Whether every norm is a plain RMSNorm (weight * x / rms(x)) and the MLP activation SiLU:
    what kernels/model_ops_triton.py computes. Anything else keeps the model's own modules."""
    config = model.config
    norms = [model.model.norm] + [
        norm
        for layer in model.model.layers
        for norm in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    return getattr(config, "hidden_act", None) in ("silu", "swish") and all(
        type(norm).__name__ in _STANDARD_NORMS and hasattr(norm, "variance_epsilon")
        for norm in norms
    )


def append_and_attend(layer_cache, q, k, k_rotated, v, positions, scaling, num_new_tokens):
    """Append one sequence's new keys/values to its layer cache, then attend its queries."""
    # KVQuant-style codecs keep pre-RoPE keys and rotate inside their score kernel.
    stored_keys = k if layer_cache.pre_rope_keys else k_rotated
    layer_cache.append(stored_keys, v, positions)
    return layer_cache.attend(q, scaling, num_new_tokens)


@dataclass
class _FusedLayer:
    qkv: torch.Tensor  # [q_out + k_out + v_out, hidden]
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up: torch.Tensor | None  # [2 * intermediate, hidden]; None for an MLP of another shape


def _fuse_layer(layer) -> _FusedLayer:
    """Concatenate a layer's q/k/v (and gate/up) weights and make the modules' weights views of
    the result, so the model's own forward (HF generate) still works and no memory is added."""
    attention = layer.self_attn
    projections = [attention.q_proj, attention.k_proj, attention.v_proj]
    qkv = _concatenate_into_views(projections, "weight")
    biases = [p.bias for p in projections]
    qkv_bias = _concatenate_into_views(projections, "bias") if all(
        b is not None for b in biases
    ) else None  # fmt: skip
    sizes = tuple(p.weight.shape[0] for p in projections)
    mlp = layer.mlp
    gate_up = None
    simple_mlp = all(
        hasattr(mlp, name) and getattr(mlp, name).bias is None
        for name in ("gate_proj", "up_proj", "down_proj")
    )
    if simple_mlp and hasattr(mlp, "act_fn"):
        gate_up = _concatenate_into_views([mlp.gate_proj, mlp.up_proj], "weight")
    return _FusedLayer(qkv, qkv_bias, sizes, gate_up)


def _concatenate_into_views(modules, name: str) -> torch.Tensor:
    fused = torch.cat([getattr(module, name).detach() for module in modules], dim=0)
    offset = 0
    for module in modules:
        size = getattr(module, name).shape[0]
        setattr(
            module, name, torch.nn.Parameter(fused[offset : offset + size], requires_grad=False)
        )
        offset += size
    return fused

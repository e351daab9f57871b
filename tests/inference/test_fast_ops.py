"""The runner's fused per-layer kernels (RMSNorm + residual, rotary, SiLU-and-multiply; on by
default on GPUs only) give the same forward pass as the model's own modules: forced on here on the
CPU, under the Triton interpreter, on a random tiny Llama with fused q/k/v and gate/up weights."""

from __future__ import annotations

import torch
from kvpack.inference.runner import ModelRunner, _fuse_layer, _standard_llama_ops
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    for layer in model.model.layers:  # non-trivial norm weights
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data = torch.rand_like(norm.weight) + 0.5
    return model


def sdpa_attend(layer_index, q, k, k_rotated, v):
    group = q.shape[1] // k_rotated.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k_rotated.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True
    )


def test_fused_layer_ops_equal_the_model_modules():
    model = tiny_llama()
    runner = ModelRunner(model)
    assert _standard_llama_ops(model)
    runner._fused = [_fuse_layer(layer) for layer in runner.layers]  # as on a GPU
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(9)[None, :].expand(2, 9)
    with torch.inference_mode():
        runner._fast_ops = False
        expected = runner.logits(runner.forward(tokens, positions, sdpa_attend)[:, -1:])
        runner._fast_ops = True
        fast = runner.logits(runner.forward(tokens, positions, sdpa_attend)[:, -1:])
        reference = model(tokens).logits[:, -1].float()
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(expected, reference, rtol=1e-4, atol=1e-4)

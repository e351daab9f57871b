"""The graph-safe decode path on the CPU: the fused decode-attention kernel (Triton interpreter)
against the unfused codec path, appends at device-side slots against `append_tokens`, and whole
decode steps through `DecodeGraphs` (same kernels, no graph off CUDA) against eager steps."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kvpack.inference.decode_graph import DecodeGraphs
from kvpack.inference.kv_cache import SequenceCache
from kvpack.inference.methods import MethodSpec, build_layer_codecs
from kvpack.inference.runner import ModelRunner
from kvpack.kernels import make_codec
from kvpack.kernels.cache import advance_lengths, completes_group, decode_step

FUSED = [
    ("fp16", {}),
    ("kivi", {"bits": 2, "group_size": 16, "window": 8}),
    ("kivi", {"bits": 4, "group_size": 32, "window": 0}),
]
ALL = [*FUSED, ("qjl", {"group_size": 16, "window": 4, "sketch_dim": 64, "outlier_sketch_dim": 64})]


def filled(codec, batch, heads, tokens, capacity, generator, head_dim=32):
    keys = codec.new_keys(batch, heads, dtype=torch.float32, capacity=capacity)
    values = codec.new_values(batch, heads, dtype=torch.float32, capacity=capacity)
    codec.append_keys(keys, torch.randn(batch, heads, tokens, head_dim, generator=generator))
    codec.append_values(values, torch.randn(batch, heads, tokens, head_dim, generator=generator))
    return keys, values


@pytest.mark.parametrize("name,params", FUSED)
@pytest.mark.parametrize("tokens", [1, 7, 40, 133])
def test_fused_decode_attention_matches_the_unfused_path(name, params, tokens):
    generator = torch.Generator().manual_seed(tokens)
    codec = make_codec(name, head_dim=32, use_triton=True, **params)
    reference = make_codec(name, head_dim=32, use_triton=False, **params)
    assert codec.supports_decode_attention(torch.float32)
    keys, values = filled(codec, 2, 2, tokens, tokens + 40, generator)
    q = torch.randn(2, 8, 1, 32, generator=generator)
    lengths = torch.tensor([keys.num_packed, keys.tail_len])
    fused = codec.decode_attention(q, keys, values, lengths, 32**-0.5)
    scores = reference.key_scores(q, keys) * 32**-0.5
    expected = reference.attend_values(torch.softmax(scores, dim=-1), values)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)


def test_fused_decode_attention_reads_the_lengths_from_the_tensor():
    """A captured graph replays with stale host lengths: only `lengths` may count."""
    generator = torch.Generator().manual_seed(0)
    codec = make_codec("kivi", head_dim=32, use_triton=True, group_size=16, window=8)
    keys, values = filled(codec, 1, 2, 100, 140, generator)
    shorter = torch.tensor([48, 5])
    q = torch.randn(1, 4, 1, 32, generator=generator)
    fused = codec.decode_attention(q, keys, values, shorter, 0.25)
    stale = dataclasses.replace(keys, num_packed=48, tail_len=5)
    stale_values = dataclasses.replace(values, num_packed=48, tail_len=5)
    probabilities = torch.softmax(codec.key_scores(q, stale) * 0.25, dim=-1)
    torch.testing.assert_close(
        fused, codec.attend_values(probabilities, stale_values), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("name,params", ALL)
def test_device_side_appends_equal_append_tokens(name, params):
    generator = torch.Generator().manual_seed(1)
    codec = make_codec(name, head_dim=32, **params)
    eager = filled(codec, 1, 2, 20, 200, torch.Generator().manual_seed(1))
    device = filled(codec, 1, 2, 20, 200, torch.Generator().manual_seed(1))
    lengths = torch.tensor([device[0].num_packed, device[0].tail_len])
    rows_per = tuple(sorted({s.tokens_per_row for c in device for s in c.specs}))
    for _ in range(60):
        k = torch.randn(1, 2, 1, 32, generator=generator)
        v = torch.randn(1, 2, 1, 32, generator=generator)
        codec.append_keys(eager[0], k)
        codec.append_values(eager[1], v)
        completes = completes_group(device[0])
        step = decode_step(lengths, device[0], completes, rows_per)
        for container, x in zip(device, (k, v), strict=True):
            codec.append_decode_token(container, x, step)
            advance_lengths(container, completes)
        for a, b in zip(eager, device, strict=True):
            assert (a.num_packed, a.tail_len) == (b.num_packed, b.tail_len)
            assert tuple(lengths.tolist()) == (b.num_packed, b.tail_len)
            assert torch.equal(a.tail[:, :, : a.tail_len], b.tail[:, :, : b.tail_len])
            for spec in a.specs:
                rows = a.num_packed // spec.tokens_per_row
                assert torch.equal(
                    a.fields[spec.name][:, :, :rows], b.fields[spec.name][:, :, :rows]
                )


@pytest.fixture(scope="module")
def runner():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    return ModelRunner(LlamaForCausalLM(config).eval())


@pytest.mark.parametrize("name,params", FUSED)
def test_graph_step_logic_matches_eager_decode(runner, name, params):
    """40 greedy steps through DecodeGraphs.step (crossing group completions) and through the
    eager runner, from identical caches, give the same logits."""
    codecs = build_layer_codecs(MethodSpec.of(name, params), num_layers=2, head_dim=32)

    def new_cache():
        return SequenceCache(codecs, num_kv_heads=2, head_dim=32, dtype=torch.float32,
                             device=torch.device("cpu"), capacity=120)  # fmt: skip

    eager, graphed = new_cache(), new_cache()
    assert DecodeGraphs.supports(graphed)
    prompt = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        token = int(runner.prefill(eager, prompt, 0).argmax())
        runner.prefill(graphed, prompt, 0)
        graphs = DecodeGraphs(torch.device("cpu"))
        for index in range(40):
            position = torch.tensor([37 + index])
            expected = runner.decode([eager], torch.tensor([token]), position, use_graph=False)
            got = graphs.step(runner, graphed, torch.tensor([token]), position)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            token = int(expected.argmax())
    assert graphed.num_tokens == eager.num_tokens == 77
    assert graphed.num_packed_tokens == eager.num_packed_tokens

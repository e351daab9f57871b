"""`kvpack.eval.perplexity` and the HF quanto baseline: equal to a plain HF forward at full
precision, honest bits per element, compressed methods worse than fp16 within sane bounds."""

from __future__ import annotations

import math

import pytest
import torch
from kvpack.eval.hf_quanto import hf_quanto_perplexity
from kvpack.eval.perplexity import codec_perplexity
from kvpack.inference.methods import MethodSpec


def hf_perplexity(loaded, tokens: torch.Tensor) -> float:
    """exp(mean NLL of tokens 1..N-1) from one full HF forward: the reference of the protocol."""
    with torch.no_grad():
        logits = loaded.model(tokens[None, :]).logits[0].double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, tokens[1:, None]).mean()
    return math.exp(nll.item())


@pytest.mark.parametrize("prefill_tokens, chunk_tokens", [(1, 256), (24, 10), (80, 32)])
@pytest.mark.parametrize("cache_dtype, rel", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_fp16_equals_hf_forward(stories, story_tokens, prefill_tokens, chunk_tokens, cache_dtype,
                                rel):
    expected = hf_perplexity(stories, story_tokens)
    result = codec_perplexity(stories, story_tokens, MethodSpec.of("fp16"),
                              prefill_tokens=prefill_tokens, chunk_tokens=chunk_tokens,
                              cache_dtype=cache_dtype)
    assert result.ppl == pytest.approx(expected, rel=rel)
    assert result.nll == pytest.approx(math.log(expected), rel=rel)
    assert result.tokens == story_tokens.numel() - 1
    assert result.total_tokens == story_tokens.numel()


@pytest.mark.parametrize("cache_dtype, bits", [(torch.float16, 16.0), (torch.float32, 32.0)])
def test_fp16_bits_per_element(tiny16, story_tokens, cache_dtype, bits):
    result = codec_perplexity(tiny16, story_tokens, MethodSpec.of("fp16"), prefill_tokens=16,
                              cache_dtype=cache_dtype)
    assert result.bits_per_element == bits
    elements = 2 * 2 * 2 * 16 * story_tokens.numel()  # K and V, 2 layers, 2 KV heads, head_dim 16
    assert result.cache_bytes * 8 == bits * elements


def test_kivi_bits_per_element_counts_every_byte(tiny16, story_tokens):
    """KIVI-2, 32-token groups, no window, 80 tokens, head_dim 16 (value groups of 16 channels).

    Per (layer, head): keys 64 packed tokens x 16 x 2 bit + 2 groups x 16 channels x fp16 scale
    and zero + a 16-token fp16 tail; values 64 x 16 x 2 bit + 64 x fp16 scale and zero + tail."""
    spec = MethodSpec.of("kivi", {"bits": 2, "group_size": 32, "window": 0, "use_triton": False})
    result = codec_perplexity(tiny16, story_tokens, spec, prefill_tokens=16)
    keys = 64 * 16 * 2 + 2 * 16 * 2 * 16 + 16 * 16 * 16
    values = 64 * 16 * 2 + 64 * 2 * 16 + 16 * 16 * 16
    assert story_tokens.numel() == 80
    assert result.bits_per_element == (keys + values) / (2 * 80 * 16)
    assert math.isfinite(result.ppl)


def test_kvquant_with_a_real_calibration(tiny16):
    from kvpack.calibrate.calibrate import calibrate_model

    generator = torch.Generator().manual_seed(1)
    sequences = torch.randint(3, 512, (2, 64), generator=generator)
    calibration = calibrate_model(tiny16.model, sequences, model_id=tiny16.model_id,
                                  bits_list=[3], outliers=0.01, sink_tokens=1, text_sha256="",
                                  progress=False)
    tokens = torch.randint(3, 512, (48,), generator=generator)
    fp16 = codec_perplexity(tiny16, tokens, MethodSpec.of("fp16"), prefill_tokens=16)
    spec = MethodSpec.of("kvquant", {"calibration": calibration, "bits": 3, "use_triton": False})
    result = codec_perplexity(tiny16, tokens, spec, prefill_tokens=16)
    assert math.isfinite(result.ppl)
    # random weights predict almost uniformly: the quantized cache moves ppl by well under 5%
    assert result.ppl == pytest.approx(fp16.ppl, rel=0.05)
    assert 3.0 < result.bits_per_element < 6.0


@pytest.fixture(scope="module")
def smollm2_fp16(smollm2, wiki_tokens):
    return codec_perplexity(smollm2, wiki_tokens[:160], MethodSpec.of("fp16"), prefill_tokens=32)


def test_fp16_on_real_text_matches_hf(smollm2, wiki_tokens, smollm2_fp16):
    assert smollm2_fp16.ppl == pytest.approx(hf_perplexity(smollm2, wiki_tokens[:160]), rel=2e-3)


@pytest.mark.parametrize("method, params, low, high", [
    ("kivi", {"bits": 4}, 0.99, 1.05),
    ("kivi", {"bits": 2}, 1.05, 3.0),
    ("qjl", {"sketch_dim": 128, "outlier_channels": 4, "outlier_sketch_dim": 64}, 1.0, 3.0),
])
def test_compressed_methods_are_finite_and_no_better(smollm2, wiki_tokens, smollm2_fp16, method,
                                                     params, low, high):
    # window 0: every past token goes through the codec (the service's default window of 128
    # would keep most of these 160 tokens in full precision)
    spec = MethodSpec.of(method, {**params, "window": 0, "use_triton": False})
    result = codec_perplexity(smollm2, wiki_tokens[:160], spec, prefill_tokens=32)
    ratio = result.ppl / smollm2_fp16.ppl
    assert math.isfinite(result.ppl) and low <= ratio <= high, ratio
    assert 2.0 < result.bits_per_element < 6.0


def test_hf_quanto_baseline(smollm2, wiki_tokens, smollm2_fp16):
    """32-token prefill + 128 decode steps: the 128-token residual has just been flushed, so the
    cache is all codes plus float32 scale and shift per 64 numbers: exactly bits + 1."""
    int4 = hf_quanto_perplexity(smollm2, wiki_tokens[:160], bits=4, prefill_tokens=32)
    int2 = hf_quanto_perplexity(smollm2, wiki_tokens[:160], bits=2, prefill_tokens=32)
    assert int4.bits_per_element == 5.0 and int2.bits_per_element == 3.0
    assert 1.0 <= int4.ppl / smollm2_fp16.ppl <= 1.1
    assert int2.ppl > 1.2 * int4.ppl
    assert int4.tokens == 159


@pytest.mark.parametrize("kwargs, message", [
    ({"prefill_tokens": 0}, "prefill_tokens"),
    ({"prefill_tokens": 81}, "prefill_tokens"),
    ({"prefill_tokens": 8, "chunk_tokens": 0}, "prefill_chunk_tokens"),
])
def test_bad_protocol_is_a_value_error(stories, story_tokens, kwargs, message):
    with pytest.raises(ValueError, match=message):
        codec_perplexity(stories, story_tokens, MethodSpec.of("fp16"), **kwargs)


def test_unknown_method_is_a_value_error(stories, story_tokens):
    with pytest.raises(ValueError, match="unknown method"):
        codec_perplexity(stories, story_tokens, MethodSpec.of("zip"), prefill_tokens=8)


def test_hf_quanto_rejects_other_bits(stories, story_tokens):
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        hf_quanto_perplexity(stories, story_tokens, bits=3, prefill_tokens=8)

"""SmolLM2-135M (real GGUF weights) through gRPC with a real kvstore: a long shared prefix is
fetched instead of recomputed, is faster to first token, and gives the same greedy text."""

from __future__ import annotations

import time

from support.streaming import generate

BLOCK_TOKENS = 128


def test_prefix_reuse_on_smollm2_is_faster_and_identical(
    smollm2, shared_data, kvstore, inference_factory, connect
):
    text = (shared_data / "text" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    prompt = smollm2.tokenizer.decode(smollm2.tokenizer.encode(text[:6000])[:600])
    server = inference_factory(
        smollm2, kvstore=kvstore.address, block_tokens=BLOCK_TOKENS, prefill_chunk_tokens=128
    )
    stub = connect(server.address)
    first = generate(stub, prompt=prompt, max_new_tokens=12)
    num_blocks = first.usage.prompt_tokens // BLOCK_TOKENS
    assert first.usage.cached_tokens == 0 and num_blocks >= 4
    deadline = time.monotonic() + 30
    while server.metrics.value("kvpack_kvstore_put_blocks_total") < num_blocks:
        assert time.monotonic() < deadline, "blocks were not stored"
        time.sleep(0.05)
    second = generate(stub, prompt=prompt, max_new_tokens=12)
    assert (
        second.usage.cached_tokens == (first.usage.prompt_tokens - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    )
    assert second.token_ids == first.token_ids and second.text == first.text
    assert second.usage.ttft_seconds < first.usage.ttft_seconds


def test_kivi_on_smollm2_end_to_end(smollm2, inference_factory, connect):
    """4-bit KIVI on real weights through gRPC: compressed; the greedy start agrees with fp16."""
    server = inference_factory(smollm2, prefill_chunk_tokens=64)
    stub = connect(server.address)
    # 100+ tokens, so that packed groups outweigh the float32 tail in the ratio
    prompt = (
        "Colors can be mixed. The three primary colors of paint are red, yellow and blue; the "
        "secondary colors are made by mixing two of them in equal parts. For example, mixing blue "
        "and yellow gives green, and mixing red and blue gives purple. Painters have known this "
        "for centuries, and children learn it in school with small pots of paint and a brush. "
        "Tertiary colors come from mixing a primary color with a secondary one next to it on the "
        "color wheel, such as yellow-green or red-violet. Mixing red and yellow gives"
    )
    exact = generate(stub, prompt=prompt, max_new_tokens=4)
    kivi = generate(
        stub,
        prompt=prompt,
        max_new_tokens=4,
        method="kivi",
        method_params={"bits": "4", "group_size": "16", "window": "0", "use_triton": "false"},
    )
    assert kivi.usage.prompt_tokens >= 100
    assert kivi.usage.compression_ratio > 2
    assert kivi.token_ids[:2] == exact.token_ids[:2]

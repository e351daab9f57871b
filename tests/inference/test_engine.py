"""The engine against Hugging Face: method fp16 reproduces `generate`'s greedy tokens exactly."""

from __future__ import annotations

import threading

import pytest
import torch
from kvpack.inference.engine import Delta, Done, Engine, GenerationRequest
from kvpack.inference.methods import MethodSpec
from kvpack.inference.sampling import SamplingParams

STORY_PROMPTS = [
    "Once upon a time",
    "The dog ran to the park and",
    "Lily and Tom wanted to",
    "One day, a little bird",
]


def hf_greedy(loaded, prompt_ids: list[int], num_tokens: int) -> list[int]:
    out = loaded.model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=num_tokens,
        do_sample=False,
        attention_mask=torch.ones(1, len(prompt_ids)),
    )
    return out[0, len(prompt_ids) :].tolist()


def run(engine: Engine, request: GenerationRequest) -> tuple[list[int], str, Done]:
    token_ids, text, done = [], "", None
    for event in engine.submit(request):
        if isinstance(event, Delta):
            token_ids += event.token_ids
            text += event.text
        else:
            done = event
    return token_ids, text, done


@pytest.mark.parametrize("chunk_tokens", [1, 3, 64])
def test_fp16_equals_hf_greedy_on_stories_while_batched(stories, chunk_tokens):
    engine = Engine(
        stories,
        default_method=MethodSpec.of("fp16"),
        max_batch=4,
        prefill_chunk_tokens=chunk_tokens,
    )
    try:
        results: dict[int, list[int]] = {}

        def worker(index: int) -> None:
            ids = stories.tokenizer.encode(STORY_PROMPTS[index])
            results[index] = run(engine, GenerationRequest(ids, SamplingParams(max_new_tokens=40)))[
                0
            ]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(STORY_PROMPTS))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for index, prompt in enumerate(STORY_PROMPTS):
            ids = stories.tokenizer.encode(prompt)
            expected = hf_greedy(stories, ids, 40)
            # HF keeps going after EOS only if it never appears; we stop at EOS (and report it)
            assert results[index] == expected[: len(results[index])]
            assert len(results[index]) == 40 or results[index][-1] == stories.tokenizer.eos_token_id
    finally:
        engine.close()


def test_fp16_equals_hf_greedy_on_smollm2(smollm2):
    engine = Engine(smollm2, default_method=MethodSpec.of("fp16"), prefill_chunk_tokens=7)
    try:
        ids = smollm2.tokenizer.encode("The three primary colors are")
        token_ids, text, done = run(
            engine, GenerationRequest(ids, SamplingParams(max_new_tokens=24))
        )
        expected = hf_greedy(smollm2, ids, 24)
        assert token_ids == expected[: len(token_ids)] and len(token_ids) >= 8
        assert text == smollm2.tokenizer.decode(token_ids)
        assert done.usage.prompt_tokens == len(ids)
    finally:
        engine.close()


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(stories):
    engine = Engine(stories, default_method=MethodSpec.of("fp16"))
    try:
        ids = stories.tokenizer.encode("Once upon a time")

        def sample(seed: int) -> list[int]:
            params = SamplingParams(
                max_new_tokens=30, temperature=1.0, top_p=0.95, top_k=50, seed=seed
            )
            return run(engine, GenerationRequest(ids, params))[0]

        assert sample(7) == sample(7)
        assert len({tuple(sample(seed)) for seed in range(4)}) > 1
    finally:
        engine.close()


def test_stop_string_ends_generation_before_it(stories):
    engine = Engine(stories, default_method=MethodSpec.of("fp16"))
    try:
        ids = stories.tokenizer.encode("Once upon a time")
        full = run(engine, GenerationRequest(ids, SamplingParams(max_new_tokens=40)))[1]
        assert "park" in full
        _, text, done = run(
            engine, GenerationRequest(ids, SamplingParams(max_new_tokens=40, stop=("park",)))
        )
        assert text == full[: full.index("park")]
        assert done.usage.finish_reason == "stop"
    finally:
        engine.close()

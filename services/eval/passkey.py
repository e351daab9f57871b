"""Passkey retrieval: a random number hidden at a chosen depth of repetitive filler text.

The prompt (after the passkey test of Mohtashami & Jaggi, "Landmark Attention", 2023):

    <intro> <filler> x k_before  <needle with the key>  <filler> x k_after  <question>

k_before + k_after filler repeats bring the prompt to about `length` tokens (the actual count is
reported); k_before = round(depth * (k_before + k_after)). The model answers greedily through the
codec's cache (chunked prefill, then decode, the inference service's own runner); an answer is
correct when the generated text contains the key's digits.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from kvpack.eval.runner import EvalRunner, new_sequence_cache
from kvpack.inference.methods import MethodSpec

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyCase:
    length: int  # requested prompt tokens
    depth: float  # where the needle sits, 0 = start of the filler, 1 = end
    prompt_tokens: int
    trials: int
    correct: int
    accuracy: float
    bits_per_element: float  # of the cache after the last trial's prompt and answer
    answers: list[str]


def check_cases(lengths: list[int], depths: list[float], trials: int) -> None:
    if not lengths or any(length <= 0 for length in lengths):
        raise ValueError(f"lengths must be positive token counts, got {lengths}")
    if not depths or any(not 0.0 <= depth <= 1.0 for depth in depths):
        raise ValueError(f"depths must be fractions in [0, 1], got {depths}")
    if trials <= 0:
        raise ValueError(f"trials must be positive, got {trials}")


def build_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids of a prompt of about `length` tokens with the key at `depth`.

    Raises:
        ValueError: `length` is too short to hold the intro, the needle and the question.
    """
    needle = NEEDLE.format(key=key)
    fixed = len(tokenizer.encode(INTRO + needle + QUESTION))
    per_filler = len(tokenizer.encode(FILLER * 8)) / 8
    repeats = int((length - fixed) // per_filler)
    if repeats < 0:
        raise ValueError(f"length {length} is too short for a passkey prompt ({fixed} tokens "
                         "without filler)")
    before = round(depth * repeats)
    text = INTRO + FILLER * before + needle + FILLER * (repeats - before) + QUESTION
    return tokenizer.encode(text)


def greedy_answer(runner: EvalRunner, loaded, spec: MethodSpec, prompt: list[int], *,
                  max_new_tokens: int, chunk_tokens: int,
                  cache_dtype: torch.dtype) -> tuple[str, float]:
    """Greedy continuation of `prompt` through `spec`'s cache; returns (text, bits per element)."""
    cache = new_sequence_cache(runner, spec, capacity=len(prompt) + max_new_tokens,
                               cache_dtype=cache_dtype)
    ids = torch.tensor(prompt, device=runner.device)
    for start in range(0, len(prompt), chunk_tokens):
        logits = runner.prefill(cache, ids[start : start + chunk_tokens], start)
    generated: list[int] = []
    position = len(prompt)
    for _ in range(max_new_tokens):
        token = int(torch.argmax(logits))
        if token == loaded.tokenizer.eos_token_id:
            break
        generated.append(token)
        if len(generated) == max_new_tokens:
            break
        logits = runner.decode([cache], torch.tensor([token], device=runner.device),
                               torch.tensor([position], device=runner.device))[0]
        position += 1
    bits = 16.0 * cache.nbytes() / cache.fp16_nbytes()
    return loaded.tokenizer.decode(generated), bits


def passkey_eval(loaded, spec: MethodSpec, *, lengths: list[int], depths: list[float],
                 trials: int = 1, seed: int = 0, max_new_tokens: int = 10,
                 chunk_tokens: int = 256, cache_dtype: torch.dtype = torch.float16,
                 progress: bool = False) -> dict[str, Any]:
    """Accuracy per (length, depth) and overall. Keys are 5-digit numbers drawn from `seed`.

    Raises:
        ValueError: bad lengths/depths/trials, unknown method or parameters the codec rejects.
    """
    from tqdm import tqdm

    check_cases(lengths, depths, trials)
    runner = EvalRunner(loaded.model)
    rng = random.Random(seed)
    started = time.perf_counter()
    cases = []
    bar = tqdm(total=len(lengths) * len(depths) * trials, desc=f"passkey {spec.name}",
               disable=not progress, leave=False)
    for length in lengths:
        for depth in depths:
            answers, correct, prompt_tokens, bits = [], 0, 0, 0.0
            for _ in range(trials):
                key = str(rng.randint(10000, 99999))
                prompt = build_prompt(loaded.tokenizer, length, depth, key)
                prompt_tokens = len(prompt)
                answer, bits = greedy_answer(runner, loaded, spec, prompt,
                                             max_new_tokens=max_new_tokens,
                                             chunk_tokens=chunk_tokens, cache_dtype=cache_dtype)
                answers.append(answer)
                correct += key in answer
                bar.update(1)
            cases.append(PasskeyCase(length, depth, prompt_tokens, trials, correct,
                                     correct / trials, bits, answers))
    bar.close()
    total = sum(case.correct for case in cases)
    return {
        "method": spec.name,
        "params": dict(spec.params),
        "accuracy": total / (len(cases) * trials),
        "cases": [asdict(case) for case in cases],
        "seed": seed,
        "cache_dtype": str(cache_dtype).removeprefix("torch."),
        "seconds": time.perf_counter() - started,
    }

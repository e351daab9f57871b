"""Perplexity with a compressed KV cache actually used for attention.

Protocol (the same for every method, and the one DESIGN.md's fidelity anchor used):

    tokens t_0 .. t_{N-1}           the first N tokens of the text as the tokenizer encodes it
    prefill t_0 .. t_{P-1}          in chunks; logits at every prefill position are kept
    decode  t_P .. t_{N-1}          one token at a time, teacher-forced (the true token is fed)
    scored: t_1 .. t_{N-1}          N - 1 predictions: t_1..t_P from the prefill logits,
                                    t_{P+1}..t_{N-1} from the decode steps

Every prediction attends to all earlier tokens through the cache: prefill chunks too attend through
the codec (a chunk's own keys are appended before it attends). The last token is fed as well, so
the cache ends holding exactly the N evaluated tokens, and bits per number are the codec's `nbytes`
over all K and V elements of that cache (N tokens x layers x KV heads x head_dim x 2).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from kvpack.eval.runner import EvalRunner, new_sequence_cache
from kvpack.inference.methods import MethodSpec


@dataclass
class PerplexityResult:
    method: str
    params: dict[str, Any]
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # scored predictions (N - 1)
    total_tokens: int  # N, tokens held by the cache at the end
    prefill_tokens: int
    bits_per_element: float
    cache_bytes: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


def check_protocol(num_tokens: int, prefill_tokens: int, chunk_tokens: int) -> None:
    if num_tokens < 2:
        raise ValueError(f"tokens must be at least 2, got {num_tokens}")
    if not 1 <= prefill_tokens <= num_tokens:
        raise ValueError(
            f"prefill_tokens must be in [1, tokens={num_tokens}], got {prefill_tokens}")
    if chunk_tokens < 1:
        raise ValueError(f"prefill_chunk_tokens must be positive, got {chunk_tokens}")


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of targets [T] under logits [T, V], float64 for a stable sum."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return -log_probs.gather(1, targets[:, None])[:, 0]


def summarize(nll_sum: float, count: int) -> tuple[float, float]:
    mean = nll_sum / count
    return mean, math.exp(mean)


def codec_perplexity(loaded, token_ids: torch.Tensor, spec: MethodSpec, *, prefill_tokens: int,
                     chunk_tokens: int = 256, cache_dtype: torch.dtype = torch.float16,
                     progress: bool = False) -> PerplexityResult:
    """Perplexity of token_ids [N] through `spec`'s codec (see the module docstring).

    Raises:
        ValueError: bad protocol sizes, unknown method or parameters the codec rejects.
    """
    from tqdm import tqdm

    num_tokens = token_ids.numel()
    check_protocol(num_tokens, prefill_tokens, chunk_tokens)
    runner = EvalRunner(loaded.model)
    token_ids = token_ids.to(runner.device)
    cache = new_sequence_cache(runner, spec, capacity=num_tokens, cache_dtype=cache_dtype)
    started = time.perf_counter()
    nll_sum, count = 0.0, 0
    bar = tqdm(total=num_tokens, desc=f"ppl {spec.name}", unit="tok", disable=not progress,
               leave=False)
    for start in range(0, prefill_tokens, chunk_tokens):
        end = min(start + chunk_tokens, prefill_tokens)
        logits = runner.prefill_logits(cache, token_ids[start:end], start)
        # position i predicts token i + 1; the prefill's last position predicts t_P
        targets = token_ids[start + 1 : end + 1]
        nll_sum += token_nll(logits[: targets.numel()], targets).sum().item()
        count += targets.numel()
        bar.update(end - start)
    for position in range(prefill_tokens, num_tokens):
        logits = runner.decode([cache], token_ids[position : position + 1],
                               torch.tensor([position], device=runner.device))
        if position + 1 < num_tokens:
            nll_sum += token_nll(logits, token_ids[position + 1 : position + 2]).item()
            count += 1
        bar.update(1)
    bar.close()
    assert cache.num_tokens == num_tokens and count == num_tokens - 1
    nll, ppl = summarize(nll_sum, count)
    return PerplexityResult(
        method=spec.name, params=dict(spec.params), ppl=ppl, nll=nll, tokens=count,
        total_tokens=num_tokens, prefill_tokens=prefill_tokens,
        bits_per_element=16.0 * cache.nbytes() / cache.fp16_nbytes(), cache_bytes=cache.nbytes(),
        seconds=time.perf_counter() - started,
        extra={"cache_dtype": str(cache_dtype).removeprefix("torch.")},
    )

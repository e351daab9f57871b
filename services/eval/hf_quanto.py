"""The baseline users would otherwise pick: HF transformers' `QuantizedCache` with optimum-quanto.

Same protocol as `kvpack.eval.perplexity` (prefill, then teacher-forced decode, N - 1 scored tokens,
the last token fed too), but with HF's own forward and cache. Two differences are HF's design, not
ours: the prefill attends to its own keys in full precision (QuantizedCache quantizes only after its
first update returns), and every `residual_length` tokens the whole cache is dequantized and
quantized again together with the residual.

Bits per number count every tensor the cache holds at the end: quanto's packed codes, its per-group
scale and shift (in the model's dtype: float32 on CPU), and the full-precision residual.
"""

from __future__ import annotations

import time

import torch
from kvpack.eval.perplexity import PerplexityResult, check_protocol, summarize, token_nll

QUANTO_BITS = (2, 4)


def tensor_storage_bytes(tensor) -> int:
    """Bytes of a tensor, looking inside tensor subclasses (quanto's packed tensors) recursively."""
    if tensor is None:
        return 0
    if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_storage_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def quantized_cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            total += tensor_storage_bytes(getattr(layer, name, None))
    return total


def hf_quanto_perplexity(loaded, token_ids: torch.Tensor, *, bits: int, prefill_tokens: int,
                         progress: bool = False) -> PerplexityResult:
    """Perplexity of token_ids [N] with HF's QuantizedCache(backend="quanto", nbits=bits).

    Raises:
        ValueError: bits not 2 or 4, or bad protocol sizes.
        ImportError: optimum-quanto is not installed (the `eval` extra).
    """
    from tqdm import tqdm
    from transformers import QuantizedCache

    if bits not in QUANTO_BITS:
        raise ValueError(f"bits must be 2 or 4 for hf-quanto, got {bits}")
    num_tokens = token_ids.numel()
    check_protocol(num_tokens, prefill_tokens, prefill_tokens)
    model = loaded.model
    config = model.config
    token_ids = token_ids.to(loaded.device)[None, :]
    cache = QuantizedCache(backend="quanto", config=config, nbits=bits)
    started = time.perf_counter()
    bar = tqdm(total=num_tokens, desc=f"ppl hf-quanto int{bits}", unit="tok",
               disable=not progress, leave=False)
    with torch.inference_mode():
        logits = model(input_ids=token_ids[:, :prefill_tokens], past_key_values=cache,
                       use_cache=True).logits[0]
        targets = token_ids[0, 1 : prefill_tokens + 1]
        nll_sum = token_nll(logits[: targets.numel()], targets).sum().item()
        count = targets.numel()
        bar.update(prefill_tokens)
        for position in range(prefill_tokens, num_tokens):
            logits = model(input_ids=token_ids[:, position : position + 1], past_key_values=cache,
                           use_cache=True).logits[0]
            if position + 1 < num_tokens:
                nll_sum += token_nll(logits, token_ids[0, position + 1 : position + 2]).item()
                count += 1
            bar.update(1)
    bar.close()
    assert cache.get_seq_length() == num_tokens and count == num_tokens - 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    elements = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * num_tokens
    stored = quantized_cache_bytes(cache)
    nll, ppl = summarize(nll_sum, count)
    layer = cache.layers[0]
    return PerplexityResult(
        method="hf-quanto", params={"bits": bits}, ppl=ppl, nll=nll, tokens=count,
        total_tokens=num_tokens, prefill_tokens=prefill_tokens,
        bits_per_element=8.0 * stored / elements, cache_bytes=stored,
        seconds=time.perf_counter() - started,
        extra={"q_group_size": layer.q_group_size, "residual_length": layer.residual_length,
               "scale_dtype": str(loaded.dtype).removeprefix("torch.")},
    )

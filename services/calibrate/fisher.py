"""Pre-RoPE key/value activations and their diagonal Fisher information (KVQuant §3.3, App. M).

The Fisher weight of an activation element is the square of the LM loss gradient with respect to
it. Forward hooks on every layer's `k_proj` / `v_proj` keep their outputs (pre-RoPE keys, values)
and ask autograd for their gradients; only activations need gradients, so the weights are frozen
and the graph starts at the embedding output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm


@dataclass
class LayerActivations:
    """One layer's calibration data, sink tokens already removed: [N, H_kv, D] each (float32)."""

    keys: torch.Tensor
    key_fisher: torch.Tensor
    values: torch.Tensor
    value_fisher: torch.Tensor


def attention_modules(model) -> list:
    """The self-attention modules of a HF Llama-family causal LM, in layer order."""
    try:
        return [layer.self_attn for layer in model.model.layers]
    except AttributeError:
        raise ValueError(
            f"model {type(model).__name__} has no model.layers[i].self_attn to calibrate"
        ) from None


def collect_activations(
    model, sequences: torch.Tensor, *, num_kv_heads: int, head_dim: int, sink_tokens: int,
    progress: bool = True,
) -> list[LayerActivations]:
    """Run each row of `sequences` [S, L] forward and backward; gather per-layer K/V and Fisher.

    The first `sink_tokens` positions of every sequence are left out: the codec keeps them in
    fp16, so they must not shape the scales or codebooks (the reference code's calibration still
    counts them in its percentiles; research/kvquant.md §1.2).
    """
    modules = attention_modules(model)
    captured: list[dict[str, torch.Tensor]] = [{} for _ in modules]
    handles = []

    def keep(layer: int, name: str):
        def hook(_module, _inputs, output):
            output.retain_grad()
            captured[layer][name] = output
        return hook

    for layer, attention in enumerate(modules):
        handles.append(attention.k_proj.register_forward_hook(keep(layer, "keys")))
        handles.append(attention.v_proj.register_forward_hook(keep(layer, "values")))
    embeddings = model.get_input_embeddings()
    handles.append(embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    requires_grad = [p.requires_grad for p in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    gathered: list[dict[str, list[torch.Tensor]]] = [
        {"keys": [], "key_fisher": [], "values": [], "value_fisher": []} for _ in modules
    ]
    try:
        for row in tqdm(sequences, desc="calibrate: fisher", unit="seq", disable=not progress):
            input_ids = row[None].to(embeddings.weight.device)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            for layer, tensors in enumerate(captured):
                for name in ("keys", "values"):
                    output = tensors[name]
                    kept = output.detach()[0, sink_tokens:].float()
                    grad = output.grad[0, sink_tokens:].float()
                    shape = (kept.shape[0], num_kv_heads, head_dim)
                    gathered[layer][name].append(kept.reshape(shape).cpu())
                    fisher_name = "key_fisher" if name == "keys" else "value_fisher"
                    gathered[layer][fisher_name].append(grad.square().reshape(shape).cpu())
                tensors.clear()
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in zip(model.parameters(), requires_grad, strict=True):
            parameter.requires_grad_(flag)
    return [
        LayerActivations(**{name: torch.cat(parts) for name, parts in layer.items()})
        for layer in gathered
    ]

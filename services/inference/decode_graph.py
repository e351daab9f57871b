"""CUDA graphs of one sequence's decode step: the whole model in one replay.

An eager decode step of an 8B model launches about a thousand kernels (norms, projections, RoPE,
the MLP, appends and attention in each of 32 layers) and costs far more in Python and launch
overhead than the GPU needs to read the weights and the cache. A captured graph replays them all
from one call. What a graph bakes in must stay fixed, so:

- inputs live in static buffers (token, position) that each step copies into;
- the cache's lengths live on the device (`lengths` = packed, tail tokens): the token is written
  into the tail at a slot computed on the device, and the fused decode-attention kernel reads the
  lengths there, with a grid sized to the cache's capacity (kernels/decode_attention_triton.py);
- a step that completes a quantization group also packs it (as the eager append does, before
  attention), which is a different sequence of kernels: that step replays a second graph.

The host keeps its own copy of the lengths (PackedCache.num_packed / tail_len), advanced after each
replay exactly as the device advanced them; eager work on the same cache in between (prefill
chunks, a batched step, loaded blocks) only needs the device copy refreshed, which `step` does
when the two differ. A cache whose storage was reallocated is captured again.

Graphs are per sequence (they hold its tensors' addresses) and batch 1; several sequences
decoding together take the eager path. Off CUDA, `step` runs the same device-length kernels
without a graph, which is how the CPU tests check this path against the eager one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from kvpack.kernels import cache as cache_lib

if TYPE_CHECKING:
    from kvpack.inference.kv_cache import SequenceCache
    from kvpack.inference.runner import ModelRunner


class DecodeGraphs:
    """The (at most two) decode-step graphs of one sequence, with their static buffers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(2, dtype=torch.int64, device=device)  # packed, tail
        self._device_lengths: tuple[int, int] | None = None  # what `lengths` holds, if known
        self._graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._storage: tuple[int, ...] | None = None
        self._pool = None
        self.captures = 0  # graphs captured so far (benchmarks report it)

    @staticmethod
    def supports(cache: SequenceCache) -> bool:
        """Every layer attends single tokens through a fused kernel (no pre-RoPE keys)."""
        return all(layer.fused_decode for layer in cache.layers)

    # -- the step ------------------------------------------------------------------------------
    def step(
        self,
        runner: ModelRunner,
        cache: SequenceCache,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """Append token_ids [1] at positions [1] to `cache` and return its logits [1, V]."""
        containers = _containers(cache)
        first = containers[0]
        completes = cache_lib.completes_group(first)
        if completes:  # room for the packed group; reallocating here forces a new capture
            needed = first.num_packed + first.group_size
            for container in containers:
                cache_lib.reserve(container, needed)
        storage = tuple(container.storage_version for container in containers)
        if storage != self._storage:
            self._graphs.clear()
            self._storage = storage
        self.token.copy_(token_ids.view(1, 1))
        self.position.copy_(positions.view(1, 1))
        host_lengths = (first.num_packed, first.tail_len)
        if host_lengths != self._device_lengths:
            self.lengths.copy_(torch.tensor(host_lengths, dtype=torch.int64))
        if self.device.type != "cuda":  # no graphs: run the same kernels now (tests use this)
            logits = self._run(runner, cache, completes)
        else:
            if completes not in self._graphs:
                self._capture(runner, cache, completes)
            graph, logits = self._graphs[completes]
            graph.replay()
        for container in containers:
            cache_lib.advance_lengths(container, completes)
        self._device_lengths = (first.num_packed, first.tail_len)
        return logits.clone()  # the static output is overwritten by the next replay

    def _run(self, runner: ModelRunner, cache: SequenceCache, completes: bool) -> torch.Tensor:
        """The step's kernels, reading only static buffers and device lengths (captured)."""
        containers = _containers(cache)
        rows_per = tuple(
            sorted({spec.tokens_per_row for container in containers for spec in container.specs})
        )
        step = cache_lib.decode_step(self.lengths, containers[0], completes, rows_per)

        def attend(layer_index, q, k, k_rotated, v):
            layer = cache.layers[layer_index]
            layer.codec.append_decode_token(layer.keys, k_rotated, step)
            layer.codec.append_decode_token(layer.values, v, step)
            return layer.codec.decode_attention(
                q, layer.keys, layer.values, self.lengths, runner.scaling
            )

        return runner.logits(runner.forward(self.token, self.position, attend))

    def _capture(self, runner: ModelRunner, cache: SequenceCache, completes: bool) -> None:
        # A warm-up run compiles the Triton kernels (not allowed during capture). It writes the
        # tails, the lengths and, when it packs, rows past the packed region: put the first two
        # back afterwards (rows past num_packed are not read, and the replay rewrites them).
        tails = [container.tail.clone() for container in _containers(cache)]
        lengths = self.lengths.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._run(runner, cache, completes)
            for container, saved in zip(_containers(cache), tails, strict=True):
                container.tail.copy_(saved)
            self.lengths.copy_(lengths)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._run(runner, cache, completes)
        self._graphs[completes] = (graph, logits)
        self.captures += 1


def _containers(cache: SequenceCache) -> list:
    return [c for layer in cache.layers for c in (layer.keys, layer.values)]

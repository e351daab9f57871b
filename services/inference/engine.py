"""The generation engine: a scheduler thread with continuous batching over packed KV caches.

    engine = Engine(loaded_model, default_method=MethodSpec.of("qjl"))
    handle = engine.submit(GenerationRequest(prompt_ids, SamplingParams(max_new_tokens=32)))
    for event in handle:            # Delta events, then one Done (or an error is raised)
        ...

Callers (gRPC handler threads) tokenize, build the request's cache and load its stored prefix
before submitting, so the scheduler thread never waits on the network. The scheduler admits
queued requests up to `max_batch` active sequences; each iteration it runs one prefill chunk of
every sequence still reading its prompt, then one decode step of all the others together. A full
queue is `Overloaded`; a cancelled request is dropped (and its cache freed) at the next iteration.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from kvpack.inference.kv_cache import SequenceCache
from kvpack.inference.loader import LoadedModel
from kvpack.inference.methods import PRE_ROPE_METHODS, MethodSpec, build_layer_codecs
from kvpack.inference.metrics import InferenceMetrics
from kvpack.inference.prefix_store import BlockLayout, PrefixStore, namespace_of
from kvpack.inference.runner import ModelRunner
from kvpack.inference.sampling import SamplingParams, make_generator, sample_next
from kvpack.inference.text_stream import TextStream
from kvpack.kernels.codec import KVCodec

log = logging.getLogger("kvpack.inference.engine")
# Decode with a CUDA graph (kvpack.inference.decode_graph) only while this many tokens remain.
GRAPH_MIN_REMAINING_TOKENS = 16


class Overloaded(Exception):
    """The request queue is full."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    method: MethodSpec | None = None  # None: the engine's default
    tenant: str = ""
    reuse: bool = True  # read and write prompt blocks in the kvstore


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_seconds: float
    tokens_per_second: float  # decode rate after the first token
    compression_ratio: float  # 16-bit cache bytes / stored bytes
    finish_reason: str  # "stop" (EOS or a stop string), "length", "cancelled"


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Done:
    usage: Usage


class RequestHandle:
    """The caller's side of a submitted request: iterate for events, `cancel()` to stop it."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        self.events.put(None)  # wake a consumer blocked on the queue

    def __iter__(self):
        while True:
            event = self.events.get()
            if event is None:
                return
            if isinstance(event, Exception):
                raise event
            yield event
            if isinstance(event, Done):
                return


@dataclass(eq=False)  # identity: sequences are removed from lists by object
class _Sequence:
    handle: RequestHandle
    request: GenerationRequest
    method: MethodSpec
    cache: SequenceCache
    generator: torch.Generator | None
    text: TextStream
    arrival: float
    cached_tokens: int
    namespace: str | None  # set when the prompt's blocks go to the store
    layout: BlockLayout | None
    block_hashes: list[bytes]
    position: int = 0  # tokens already in the cache
    next_block: int = 0  # first prompt block not yet queued for the store
    generated: list[int] = field(default_factory=list)
    first_token_at: float = 0.0
    last_token_at: float = 0.0


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        default_method: MethodSpec,
        prefix_store: PrefixStore | None = None,
        metrics: InferenceMetrics | None = None,
        max_batch: int = 8,
        max_queue: int = 32,
        prefill_chunk_tokens: int = 256,
    ) -> None:
        if max_batch <= 0 or max_queue <= 0 or prefill_chunk_tokens <= 0:
            raise ValueError("max_batch, max_queue and prefill_chunk_tokens must be positive")
        self.loaded = loaded
        self.runner = ModelRunner(loaded.model)
        self.metrics = metrics or InferenceMetrics()
        self.prefix_store = prefix_store
        self.max_batch = max_batch
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.eos_token_ids = self._eos_ids(loaded)
        self._codecs: dict[MethodSpec, list] = {}
        self._codecs_lock = threading.Lock()
        self.default_method = default_method
        self.codecs_for(default_method)  # fail at startup on a bad default
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._active: list[_Sequence] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvpack-scheduler", daemon=True)
        self._thread.start()

    @staticmethod
    def _eos_ids(loaded: LoadedModel) -> set[int]:
        ids = loaded.model.generation_config.eos_token_id
        if ids is None:
            ids = loaded.tokenizer.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return {int(i) for i in ids if i is not None}

    @property
    def max_context_tokens(self) -> int:
        return self.runner.max_positions

    def codecs_for(self, method: MethodSpec) -> list:
        with self._codecs_lock:
            if method not in self._codecs:
                self._codecs[method] = build_layer_codecs(
                    method, num_layers=self.runner.num_layers, head_dim=self.runner.head_dim
                )
            return self._codecs[method]

    # -- caller side -------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate, prepare the cache (loading the stored prefix), and queue the request.

        Raises:
            ValueError: naming the bad field.
            Overloaded: the queue is full.
        """
        arrival = time.perf_counter()
        runner = self.runner
        prompt = request.prompt_ids
        if not prompt:
            raise ValueError("prompt: empty")
        vocab_size = self.loaded.model.config.vocab_size
        if any(not 0 <= token < vocab_size for token in prompt):
            raise ValueError(f"prompt_token_ids: ids must be in [0, {vocab_size})")
        if len(prompt) >= self.max_context_tokens:
            raise ValueError(
                f"prompt: {len(prompt)} tokens; this model holds at most "
                f"{self.max_context_tokens - 1} prompt tokens"
            )
        method = request.method or self.default_method
        codecs = self.codecs_for(method)
        capacity = min(len(prompt) + request.sampling.max_new_tokens, self.max_context_tokens)

        def new_cache() -> SequenceCache:
            return SequenceCache(
                codecs,
                num_kv_heads=runner.num_kv_heads,
                head_dim=runner.head_dim,
                dtype=runner.dtype,
                device=runner.device,
                capacity=capacity,
                pre_rope_keys=method.name in PRE_ROPE_METHODS,
            )

        cache = new_cache()
        namespace = layout = None
        hashes: list[bytes] = []
        cached = 0
        if self.prefix_store is not None and request.reuse:
            namespace = namespace_of(self.loaded.model_id, codecs[0], request.tenant)
            layout = self._layout(codecs[0])
            hashes = self.prefix_store.hashes(prompt)
            cache, cached = self.prefix_store.load_prefix(
                prompt, namespace, layout, cache, new_cache
            )
        sequence = _Sequence(
            handle=RequestHandle(),
            request=request,
            method=method,
            cache=cache,
            generator=make_generator(request.sampling, runner.device),
            text=TextStream(self.loaded.tokenizer.decode, request.sampling.stop),
            arrival=arrival,
            cached_tokens=cached,
            namespace=namespace,
            layout=layout,
            block_hashes=hashes,
            position=cached,
            next_block=cached // self.prefix_store.block_tokens if self.prefix_store else 0,
        )
        self.metrics.prompt_tokens.inc(len(prompt))
        try:
            self._queue.put_nowait(sequence)
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} requests already queued") from None
        self.metrics.queued_requests.set(self._queue.qsize())
        return sequence.handle

    def _layout(self, codec: KVCodec) -> BlockLayout:
        runner = self.runner
        return BlockLayout(
            model_id=self.loaded.model_id,
            codec_name=codec.name,
            codec_fingerprint=codec.fingerprint(),
            dtype=str(runner.dtype),
            num_layers=runner.num_layers,
            num_kv_heads=runner.num_kv_heads,
            head_dim=runner.head_dim,
            block_tokens=self.prefix_store.block_tokens,
        )

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    # -- scheduler thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._active = [s for s in self._active if not self._dropped_if_cancelled(s)]
            self._admit()
            self.metrics.active_requests.set(len(self._active))
            self.metrics.kv_cache_bytes.set(sum(s.cache.nbytes() for s in self._active))
            if not self._active:
                continue
            prefilling = [s for s in self._active if s.position < len(s.request.prompt_ids)]
            decoding = [s for s in self._active if s.position >= len(s.request.prompt_ids)]
            for sequence in prefilling:
                self._guarded([sequence], self._prefill_chunk)
            if decoding:
                self._guarded(decoding, self._decode_step)
        while True:  # answer everything still queued too, so no caller waits forever
            try:
                self._active.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for sequence in self._active:
            sequence.handle.events.put(RuntimeError("server shutting down"))

    def _admit(self) -> None:
        block = not self._active  # idle: wait for work instead of spinning
        while len(self._active) < self.max_batch:
            try:
                sequence = self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
            except queue.Empty:
                break
            block = False
            if not self._dropped_if_cancelled(sequence):
                self._active.append(sequence)
        self.metrics.queued_requests.set(self._queue.qsize())

    def _dropped_if_cancelled(self, sequence: _Sequence) -> bool:
        if not sequence.handle.cancelled.is_set():
            return False
        sequence.cache = None  # free the cache now, not when the handler lets go of it
        self.metrics.requests.labels(outcome="cancelled").inc()
        return True

    def _guarded(self, sequences: list[_Sequence], step) -> None:
        try:
            step(sequences)
        except Exception as error:  # a failing step ends its requests, never the scheduler
            log.exception("generation step failed")
            for sequence in sequences:
                sequence.handle.events.put(RuntimeError(f"generation failed: {error}"))
                self.metrics.requests.labels(outcome="error").inc()
                if sequence in self._active:
                    self._active.remove(sequence)

    def _prefill_chunk(self, sequences: list[_Sequence]) -> None:
        (sequence,) = sequences
        prompt = sequence.request.prompt_ids
        start = sequence.position
        end = min(start + self.prefill_chunk_tokens, len(prompt))
        token_ids = torch.tensor(prompt[start:end], device=self.runner.device)
        logits = self.runner.prefill(sequence.cache, token_ids, start)
        sequence.position = end
        self._store_new_blocks(sequence)
        if end == len(prompt):
            self._emit(sequence, logits)

    def _store_new_blocks(self, sequence: _Sequence) -> None:
        """Queue every prompt block that is now entirely packed and not yet stored."""
        if sequence.namespace is None or sequence.cache is None:
            return
        block_tokens = self.prefix_store.block_tokens
        num_packed = sequence.cache.num_packed_tokens
        while (
            sequence.next_block < len(sequence.block_hashes)
            and (sequence.next_block + 1) * block_tokens <= num_packed
        ):
            self.prefix_store.put_block(
                sequence.namespace,
                sequence.block_hashes[sequence.next_block],
                sequence.cache.layers,
                sequence.next_block * block_tokens,
                sequence.layout,
            )
            sequence.next_block += 1

    def _decode_step(self, sequences: list[_Sequence]) -> None:
        device = self.runner.device
        token_ids = torch.tensor([s.generated[-1] for s in sequences], device=device)
        positions = torch.tensor([s.position for s in sequences], device=device)
        # A graph costs a capture (two eager steps) per sequence: only worth it for a longer run.
        remaining = min(s.request.sampling.max_new_tokens - len(s.generated) for s in sequences)
        logits = self.runner.decode(
            [s.cache for s in sequences],
            token_ids,
            positions,
            use_graph=remaining >= GRAPH_MIN_REMAINING_TOKENS,
        )
        for sequence, row in zip(sequences, logits, strict=True):
            sequence.position += 1
            # prompt blocks still in the full-precision window get packed as decoding goes on
            self._store_new_blocks(sequence)
            self._emit(sequence, row)

    def _emit(self, sequence: _Sequence, logits: torch.Tensor) -> None:
        """Sample the next token of `sequence`, stream its text, and finish it if it is done."""
        token = int(sample_next(logits, sequence.request.sampling, sequence.generator))
        now = time.perf_counter()
        method_name = sequence.method.name
        if not sequence.generated:
            sequence.first_token_at = now
            self.metrics.ttft_seconds.labels(method=method_name).observe(now - sequence.arrival)
        else:
            self.metrics.time_per_output_token_seconds.labels(method=method_name).observe(
                now - sequence.last_token_at
            )
        sequence.last_token_at = now
        self.metrics.generated_tokens.labels(method=method_name).inc()
        if token in self.eos_token_ids:
            sequence.generated.append(token)
            self._finish(sequence, "stop", sequence.text.finish())
            return
        sequence.generated.append(token)
        delta = sequence.text.push(token)
        if sequence.text.stopped:
            self._finish(sequence, "stop", delta)
            return
        out_of_room = sequence.position + 1 >= self.max_context_tokens
        if len(sequence.generated) >= sequence.request.sampling.max_new_tokens or out_of_room:
            self._finish(sequence, "length", delta + sequence.text.finish(), token)
            return
        sequence.handle.events.put(Delta(delta, [token]))

    def _finish(
        self, sequence: _Sequence, reason: str, text: str, token: int | None = None
    ) -> None:
        if text or token is not None:
            sequence.handle.events.put(Delta(text, [] if token is None else [token]))
        num_generated = len(sequence.generated)
        decode_seconds = sequence.last_token_at - sequence.first_token_at
        usage = Usage(
            prompt_tokens=len(sequence.request.prompt_ids),
            cached_tokens=sequence.cached_tokens,
            completion_tokens=num_generated,
            ttft_seconds=sequence.first_token_at - sequence.arrival,
            tokens_per_second=(num_generated - 1) / decode_seconds if decode_seconds > 0 else 0.0,
            compression_ratio=sequence.cache.compression_ratio(),
            finish_reason=reason,
        )
        self.metrics.compression_ratio.labels(method=sequence.method.name).set(
            usage.compression_ratio
        )
        self.metrics.requests.labels(outcome="ok").inc()
        sequence.handle.events.put(Done(usage))
        self._active.remove(sequence)
        sequence.cache = None


def describe(engine: Engine) -> dict[str, Any]:
    """What the server logs at startup."""
    runner = engine.runner
    return {
        "model": engine.loaded.model_id,
        "layers": runner.num_layers,
        "heads": runner.num_heads,
        "kv_heads": runner.num_kv_heads,
        "head_dim": runner.head_dim,
        "method": engine.default_method.name,
        "device": str(runner.device),
    }

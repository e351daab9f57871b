"""Prefix reuse through a real kvstore server: hits, identical output, isolation, and every kind of
store failure degrading to recomputation."""

from __future__ import annotations

import time

import pytest
from kvpack.common import record
from kvpack.common.hashing import block_hashes
from kvpack.kvstore.client import KVStoreClient
from kvpack.proto import inference_pb2
from support.streaming import generate

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high. "
    'Lily asked her mom for help. Her mom said, "Don\'t worry, Lily. We can help you." They'
)
BLOCK_TOKENS = 32


def wait_for(condition, timeout_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def expected_cached_tokens(num_prompt_tokens: int) -> int:
    # whole blocks that end before the last prompt token (which is always computed)
    return (num_prompt_tokens - 1) // BLOCK_TOKENS * BLOCK_TOKENS


def stored_blocks(server) -> float:
    return server.metrics.value("kvpack_kvstore_put_blocks_total")


def test_second_request_reuses_the_prefix_and_gives_the_same_text(
    stories, kvstore, inference_factory, connect
):
    server = inference_factory(stories, kvstore=kvstore.address, block_tokens=BLOCK_TOKENS)
    stub = connect(server.address)
    first = generate(stub, prompt=STORY, max_new_tokens=20)
    num_blocks = first.usage.prompt_tokens // BLOCK_TOKENS
    assert first.usage.cached_tokens == 0 and num_blocks >= 3
    wait_for(lambda: stored_blocks(server) == num_blocks)
    second = generate(stub, prompt=STORY, max_new_tokens=20)
    assert second.usage.cached_tokens == expected_cached_tokens(first.usage.prompt_tokens)
    assert second.token_ids == first.token_ids and second.text == first.text
    assert server.metrics.value("kvpack_prefix_hit_tokens_total") == second.usage.cached_tokens
    # a prompt sharing only the first blocks reuses exactly those
    shared = stories.tokenizer.decode(stories.tokenizer.encode(STORY)[: 2 * BLOCK_TOKENS + 5])
    third = generate(stub, prompt=shared + " the end", max_new_tokens=5)
    assert third.usage.cached_tokens == 2 * BLOCK_TOKENS


def test_compressed_blocks_load_bit_identically(tiny16, kvstore, inference_factory, connect):
    """KIVI blocks from the store give the same greedy tokens as computing the prefix (window 0 and
    prefill chunks that divide the block size keep both caches bit-identical)."""
    server = inference_factory(
        tiny16,
        kvstore=kvstore.address,
        block_tokens=BLOCK_TOKENS,
        prefill_chunk_tokens=16,
        method="kivi",
        method_params={"bits": 2, "group_size": 16, "window": 0, "use_triton": False},
    )
    stub = connect(server.address)
    first = generate(stub, prompt=STORY, max_new_tokens=12)
    wait_for(lambda: stored_blocks(server) == first.usage.prompt_tokens // BLOCK_TOKENS)
    second = generate(stub, prompt=STORY, max_new_tokens=12)
    assert second.usage.cached_tokens == expected_cached_tokens(first.usage.prompt_tokens)
    assert second.token_ids == first.token_ids
    assert second.usage.compression_ratio == first.usage.compression_ratio > 1


def test_blocks_wait_for_the_window_before_they_are_stored(
    tiny16, kvstore, inference_factory, connect
):
    """With a full-precision window, prompt blocks are stored once decoding has packed them."""
    server = inference_factory(
        tiny16,
        kvstore=kvstore.address,
        block_tokens=BLOCK_TOKENS,
        method="kivi",
        method_params={"bits": 4, "group_size": 16, "window": 16, "use_triton": False},
    )
    stub = connect(server.address)
    first = generate(stub, prompt=STORY, max_new_tokens=40)
    num_blocks = first.usage.prompt_tokens // BLOCK_TOKENS
    wait_for(lambda: stored_blocks(server) == num_blocks)
    assert generate(stub, prompt=STORY, max_new_tokens=4).usage.cached_tokens > 0


def test_tenants_and_methods_do_not_share_blocks(stories, kvstore, inference_factory, connect):
    server = inference_factory(stories, kvstore=kvstore.address, block_tokens=BLOCK_TOKENS)
    stub = connect(server.address)
    first = generate(stub, prompt=STORY, max_new_tokens=2, tenant="alice")
    wait_for(lambda: stored_blocks(server) == first.usage.prompt_tokens // BLOCK_TOKENS)
    assert generate(stub, prompt=STORY, max_new_tokens=2, tenant="bob").usage.cached_tokens == 0
    assert generate(stub, prompt=STORY, max_new_tokens=2, tenant="alice").usage.cached_tokens > 0


def test_reuse_off_neither_reads_nor_writes(stories, kvstore, inference_factory, connect):
    server = inference_factory(stories, kvstore=kvstore.address, block_tokens=BLOCK_TOKENS)
    stub = connect(server.address)
    generate(stub, prompt=STORY, max_new_tokens=2, reuse=False)
    time.sleep(0.3)
    assert stored_blocks(server) == 0
    assert server.metrics.value("kvpack_prefix_query_tokens_total") == 0


def test_store_killed_mid_run_requests_still_succeed(
    stories, kvstore_factory, inference_factory, connect
):
    store = kvstore_factory()
    server = inference_factory(stories, kvstore=store.address, block_tokens=BLOCK_TOKENS)
    stub = connect(server.address)
    reference = generate(stub, prompt=STORY, max_new_tokens=20)
    wait_for(lambda: stored_blocks(server) > 0)
    # kill the store while a request is streaming, then keep sending requests
    stream = stub.Generate(inference_pb2.GenerateRequest(prompt=STORY, max_new_tokens=20))
    first_message = next(stream)
    store.stop(grace_seconds=0)
    rest = list(stream)
    assert rest[-1].HasField("usage")
    streamed = list(first_message.token_ids) + [t for m in rest for t in m.token_ids]
    assert streamed == reference.token_ids
    after = generate(stub, prompt=STORY + " Then", max_new_tokens=5)
    assert after.usage.cached_tokens == 0 and after.usage.completion_tokens == 5
    assert server.metrics.value("kvpack_kvstore_errors_total", reason="unavailable") >= 1
    again = generate(stub, prompt=STORY, max_new_tokens=20)
    assert again.token_ids == reference.token_ids


def test_mismatched_or_corrupt_records_are_recomputed(stories, kvstore, inference_factory, connect):
    """A record that passes the store's checksum but does not fit (wrong codec fingerprint, garbage
    payload) is never loaded: the request recomputes, gives the same text, and it is counted."""
    server = inference_factory(stories, kvstore=kvstore.address, block_tokens=BLOCK_TOKENS)
    stub = connect(server.address)
    reference = generate(stub, prompt=STORY, max_new_tokens=10, reuse=False)
    prompt_ids = stories.tokenizer.encode(STORY)
    fingerprint = server.engine.codecs_for(server.engine.default_method)[0].fingerprint()
    namespace = f"{stories.model_id}|fp16:{fingerprint}|"
    first_hash = block_hashes(prompt_ids, BLOCK_TOKENS)[0]
    with KVStoreClient(kvstore.address) as client:
        header = record.RecordHeader.for_namespace(
            namespace,
            codec="fp16",
            dtype="torch.float32",
            token_count=BLOCK_TOKENS,
            extra={
                "kind": "kvpack.inference.block/1",
                "model": stories.model_id,
                "fingerprint": "0000000000000000",
                "sizes": [[4, 4]] * 5,
            },
        )
        client.put(namespace, first_hash, record.encode(header, bytes(40)))
        result = generate(stub, prompt=STORY, max_new_tokens=10)
        assert result.usage.cached_tokens == 0 and result.token_ids == reference.token_ids
        assert server.metrics.value("kvpack_kvstore_errors_total", reason="corrupt") == 1
        # right fingerprint, garbage payload: the codec refuses it
        header = record.RecordHeader.for_namespace(
            namespace,
            codec="fp16",
            dtype="torch.float32",
            shapes={"kv": [5, 4, BLOCK_TOKENS, 8]},
            token_count=BLOCK_TOKENS,
            extra={
                "kind": "kvpack.inference.block/1",
                "model": stories.model_id,
                "fingerprint": fingerprint,
                "sizes": [[4, 4]] * 5,
            },
        )
        client.put(namespace, first_hash, record.encode(header, bytes(40)))
        result = generate(stub, prompt=STORY, max_new_tokens=10)
        assert result.usage.cached_tokens == 0 and result.token_ids == reference.token_ids
        assert server.metrics.value("kvpack_kvstore_errors_total", reason="corrupt") == 2


LONG_STORY = " ".join([STORY] * 4)


def _reference_and_stored(stories, server, stub, max_new_tokens=12):
    reference = generate(stub, prompt=LONG_STORY, max_new_tokens=max_new_tokens, reuse=False)
    first = generate(stub, prompt=LONG_STORY, max_new_tokens=max_new_tokens)
    assert first.token_ids == reference.token_ids
    num_blocks = first.usage.prompt_tokens // BLOCK_TOKENS
    wait_for(lambda: stored_blocks(server) == num_blocks)
    prompt_ids = stories.tokenizer.encode(LONG_STORY)
    fingerprint = server.engine.codecs_for(server.engine.default_method)[0].fingerprint()
    namespace = f"{stories.model_id}|fp16:{fingerprint}|"
    return reference, namespace, block_hashes(prompt_ids, BLOCK_TOKENS)


@pytest.mark.parametrize("load_threads", [1, 3])
def test_a_long_prefix_arrives_over_parallel_streams_and_is_described(
    stories, redis_server, kvstore_factory, inference_factory, connect, load_threads
):
    """Many blocks through a Redis-backed store: loaded in order while later ones are in flight
    (3 GetMany streams; the layers shared among `load_threads` threads), the same text, and the
    load's breakdown recorded."""
    store = kvstore_factory(backend=redis_server.url)
    server = inference_factory(
        stories, kvstore=store.address, block_tokens=BLOCK_TOKENS, kvstore_streams=3,
        prefix_load_threads=load_threads,
    )  # fmt: skip
    assert len(server.prefix_store.client._stubs) == 3
    assert server.prefix_store.load_threads == load_threads
    stub = connect(server.address)
    reference, _, hashes = _reference_and_stored(stories, server, stub)
    again = generate(stub, prompt=LONG_STORY, max_new_tokens=12)
    assert again.usage.cached_tokens == expected_cached_tokens(again.usage.prompt_tokens)
    assert again.token_ids == reference.token_ids
    stats = server.prefix_store.last_load
    assert stats.blocks == again.usage.cached_tokens // BLOCK_TOKENS >= 10
    assert stats.bytes > stats.blocks * 1000
    assert 0 < stats.load_seconds and 0 <= stats.wait_seconds
    assert stats.total_seconds >= stats.load_seconds + stats.wait_seconds
    assert 0 < stats.fetch_seconds <= stats.total_seconds


def test_a_corrupt_block_in_the_middle_keeps_the_blocks_before_it(
    stories, redis_server, kvstore_factory, inference_factory, connect
):
    store = kvstore_factory(backend=redis_server.url)
    server = inference_factory(stories, kvstore=store.address, block_tokens=BLOCK_TOKENS)
    stub = connect(server.address)
    reference, namespace, hashes = _reference_and_stored(stories, server, stub)
    from kvpack.common.hashing import namespace_fingerprint
    from kvpack.kvstore.backends import block_key

    raw = redis_server.client()
    key = block_key(namespace_fingerprint(namespace), hashes[5])
    value = raw.get(key)
    raw.set(key, value[:-30] + bytes([value[-30] ^ 1]) + value[-29:])
    again = generate(stub, prompt=LONG_STORY, max_new_tokens=12)
    assert again.usage.cached_tokens == 5 * BLOCK_TOKENS
    assert again.token_ids == reference.token_ids
    assert server.metrics.value("kvpack_kvstore_errors_total", reason="miss") == 1
    with KVStoreClient(store.address) as client:
        assert client.stats()["corrupt_blocks"] == 1


@pytest.mark.parametrize("load_threads", [1, 3])
def test_a_block_refused_halfway_is_rebuilt_from_the_blocks_before_it(
    stories, kvstore, inference_factory, connect, load_threads
):
    """A record that passes every check but whose third layer the codec refuses: the layers
    before it already took the block, so the cache is rebuilt from the good blocks. With 3 load
    threads over stories260K's 5 layers the third is a helper's (layers 1-2)."""
    server = inference_factory(stories, kvstore=kvstore.address, block_tokens=BLOCK_TOKENS)
    server.prefix_store.load_threads = load_threads
    stub = connect(server.address)
    reference, namespace, hashes = _reference_and_stored(stories, server, stub)
    with KVStoreClient(kvstore.address) as client:
        header, payload = record.decode(client.get(namespace, hashes[3]), namespace)
        sizes = header.extra["sizes"]
        third_layer = sum(map(sum, sizes[:2]))
        broken = bytearray(payload)
        broken[third_layer : third_layer + 4] = b"XXXX"  # the codec's own magic, not ours
        client.put(namespace, hashes[3], record.encode(header, bytes(broken)))
        again = generate(stub, prompt=LONG_STORY, max_new_tokens=12)
    assert again.usage.cached_tokens == 3 * BLOCK_TOKENS
    assert again.token_ids == reference.token_ids
    assert server.metrics.value("kvpack_kvstore_errors_total", reason="corrupt") == 1
    assert server.metrics.value("kvpack_prefix_hit_tokens_total") == 3 * BLOCK_TOKENS

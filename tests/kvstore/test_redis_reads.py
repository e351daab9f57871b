"""The Redis backend's raw GET (get_with_room): the bytes, the room before them, nil, errors, and
connections that stay in step with Redis through failures and concurrent use."""

import os

import pytest
from kvpack.kvstore.backends import BackendUnavailable
from kvpack.kvstore.backends.redis import RedisBackend
from support.threads import run_in_threads


@pytest.fixture
def backend(redis_server):
    backend = RedisBackend(redis_server.url)
    yield backend
    backend.close()


def _read(backend, key, room=8):
    loaded = backend.get_with_room(key, room)
    if loaded is None:
        return None
    buffer, start = loaded
    assert start == room and not buffer.readonly
    buffer[:start] = b"h" * start  # the room is the caller's to write
    return bytes(buffer[start:])


# sizes around the first read (64 KiB) and the socket read size (1 MiB), and a large block
@pytest.mark.parametrize("size", [0, 1, 65_530, 65_536, 65_540, (1 << 20) + 3, 9 << 20])
def test_values_come_back_exactly(backend, redis_server, size):
    value = os.urandom(size)
    redis_server.client().set("k", value)
    assert _read(backend, "k") == value
    assert _read(backend, "k", room=0) == value


def test_value_ending_in_crlf_and_holding_reply_syntax(backend, redis_server):
    value = b"$5\r\n-ERR\r\n" * 1000 + b"\r\n"
    redis_server.client().set("k", value)
    assert _read(backend, "k") == value


def test_missing_key_is_none(backend):
    assert backend.get_with_room("absent", 8) is None


def test_error_reply_is_backend_unavailable_and_the_connection_stays_usable(backend, redis_server):
    redis_server.client().rpush("list", b"x")
    with pytest.raises(BackendUnavailable, match="WRONGTYPE"):
        backend.get_with_room("list", 8)
    redis_server.client().set("k", b"value")
    assert _read(backend, "k") == b"value"


def test_reads_interleave_with_redis_py_commands(backend, redis_server):
    values = {f"k{i}": os.urandom(1000 * i + 1) for i in range(20)}
    for key, value in values.items():
        backend.put(key, value)
        assert _read(backend, key) == value
        assert backend.exists([key, "absent"]) == [True, False]
    assert backend.delete("k3") and backend.get_with_room("k3", 8) is None


def test_many_threads_at_once(backend, redis_server):
    values = {f"k{i}": os.urandom(37_000 * i + 5) for i in range(24)}
    for key, value in values.items():
        redis_server.client().set(key, value)
    failures = []

    def reader(offset):
        for round_ in range(10):
            key = f"k{(offset + round_) % len(values)}"
            if _read(backend, key) != values[key]:
                failures.append(key)

    run_in_threads(reader, 8)
    assert failures == []


def test_dead_redis_is_unavailable_then_reads_recover(backend, redis_server):
    redis_server.client().set("k", b"before")
    assert _read(backend, "k") == b"before"
    redis_server.stop()
    with pytest.raises(BackendUnavailable):
        backend.get_with_room("k", 8)
    redis_server.start()  # same port, empty
    redis_server.client().set("k", b"after")
    assert _read(backend, "k") == b"after"  # the pooled connection to the dead server is replaced


def test_cluster_falls_back_to_redis_py(redis_cluster):
    backend = RedisBackend(redis_cluster.url)
    try:
        backend.put("kvpack:a:b", b"value")
        buffer, start = backend.get_with_room("kvpack:a:b", 8)
        assert bytes(buffer[start:]) == b"value"
        assert backend.get_with_room("kvpack:a:absent", 8) is None
    finally:
        backend.close()

"""`redis://host:port/db` and `redis+cluster://host:port`: one Redis string per block.

Capacity and eviction belong to Redis (`maxmemory` + `allkeys-lru`); TTL is `SET ... EX`. Timeouts
are short and retries few, so a dead Redis turns into BackendUnavailable within about a second
instead of a hung request; redis-py reconnects by itself once Redis is back.

Commands are packed by redis-py's Python packer, which sends a large value (a block record) from its
own buffer; hiredis' packer, redis-py's default when hiredis is installed, first copies it into the
packed command (a memoryview twice). Measured on a 2-core VM: SET of 4 MiB 2.3-2.6 ms instead of
4.3-5.0 ms. Replies are still parsed by hiredis, the faster reader, with a 1 MiB socket read size
(redis-py's 64 KiB reads made a 4 MiB GET take 2.6 ms instead of 1.9 ms).

The service's Get of a block (`get_with_room`, single Redis only) does not go through a reply
parser at all: it sends GET on a connection of its own pool and reads the bulk reply straight from
the socket into a buffer with room for the gRPC message's framing before the record, so the record
is copied once in user space (into the message) where redis-py + hiredis copy it twice before the
service even starts (hiredis' buffer, then the reply's bytes). 4 MiB on the 2-core VM: 1.4 ms
against 2.6 ms for redis-py's GET as installed. A range of a record (`get_range_with_room`) is
read the same way: STRLEN and GETRANGE pipelined (one round trip; Redis sends only the range).

A ranged Put (single Redis, `open_upload`) streams the record into one SET while its ranges are
still arriving: the command's head and the value's bytes go out on a connection of its own as
soon as they are in order, and the end of the command (the CRLF after the value, and EX) only at
commit, after the service verified the whole record. Redis runs a command only once all of it
arrived, so until then nothing of the record exists in Redis; an aborted upload closes the
connection and Redis drops the unfinished command. Redis keeps the value's buffer as it received
it (SET of a large value costs it ~0.2 ms of CPU at 2-16 MiB, `INFO commandstats`), where staging
ranges in Redis with SETRANGE cost it ~7 ms per range (a fresh string zero-filled, then copied
into). Uploads stream on a pool of their own (at most 64 at once; past that an upload holds its
pieces and SETs them joined at commit). Redis Cluster: the pieces are joined and SET at commit.
"""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlparse

import redis
from kvpack.kvstore.backends.base import Backend, BackendUnavailable, RecordWriter, Usage
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.connection import Connection, Encoder, PythonRespSerializer
from redis.retry import Retry

_FAILURES = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError,
             redis.exceptions.ClusterDownError, redis.exceptions.ResponseError)
_SCAN_PATTERN = "kvpack:*"
_USAGE_CACHE_SECONDS = 5.0
# Arguments longer than this are sent as their own buffer (redis-py's own cutoff).
_BUFFER_CUTOFF = 6000
# Bytes hiredis reads per recv (redis-py: 64 KiB by default); one buffer this size per connection.
_SOCKET_READ_BYTES = 1 << 20
# First read of a raw GET reply: the bulk header plus the start of the value (small records whole).
_FIRST_READ_BYTES = 64 << 10
_MAX_CONNECTIONS = 64
# GETRANGE takes signed 64-bit offsets: larger ones (any uint64 may come in a request) are clamped
# to this, far past the end of any string Redis holds (512 MiB at most), which reads as empty.
_MAX_OFFSET = 1 << 62


class ValueSendingConnection(Connection):
    """A redis-py connection that never copies a large value into the packed command."""

    def __init__(self, **kwargs) -> None:
        encoder = Encoder(kwargs.get("encoding", "utf-8"), kwargs.get("encoding_errors", "strict"),
                          kwargs.get("decode_responses", False))
        super().__init__(**kwargs,
                         command_packer=PythonRespSerializer(_BUFFER_CUTOFF, encoder.encode))


class RedisBackend(Backend):
    parallel_reads = True

    def __init__(self, url: str, ttl_seconds: float | None = None,
                 connect_timeout_seconds: float = 1.0, io_timeout_seconds: float = 10.0) -> None:
        parsed = urlparse(url)
        self.url = url
        self.ttl_seconds = int(ttl_seconds) if ttl_seconds else None
        self.cluster = parsed.scheme == "redis+cluster"
        common = dict(
            socket_connect_timeout=connect_timeout_seconds,
            socket_timeout=io_timeout_seconds,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=1),
            health_check_interval=30,
            connection_class=ValueSendingConnection,
            socket_read_size=_SOCKET_READ_BYTES,
        )
        if self.cluster:
            # from_url is the way redis-py hands connection_class on to every node's pool.
            auth = parsed.netloc.rpartition("@")[0]
            node = f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"
            self._client = RedisCluster.from_url(
                f"redis://{auth + '@' if auth else ''}{node}", **common)
        else:
            self._client = redis.Redis.from_url(url, max_connections=_MAX_CONNECTIONS, **common)
        # Connections for raw GETs (get_with_room) only: redis-py never parses a reply on them
        # after its handshake (AUTH/SELECT/HELLO, health-check PINGs), so nothing is ever buffered
        # between the socket and us.
        self._raw_pool = None if self.cluster else redis.ConnectionPool.from_url(
            url, max_connections=_MAX_CONNECTIONS,
            **{**common, "socket_read_size": 64 << 10})  # the parser reads handshakes only
        self._usage_lock = threading.Lock()
        self._usage: tuple[float, Usage] | None = None
        # Connections of ranged uploads streaming a SET (open_upload): apart from the client's, so
        # uploads held open by slow clients never starve other calls.
        self._upload_pool = None if self.cluster else redis.ConnectionPool.from_url(
            url, max_connections=_MAX_CONNECTIONS, **common)

    def _call(self, operation, *args, **kwargs):
        try:
            return operation(*args, **kwargs)
        except _FAILURES as error:
            raise BackendUnavailable(f"redis at {self.url}: {error}") from error

    def put(self, key: str, record: bytes | memoryview) -> None:
        self._call(self._client.set, key, record, ex=self.ttl_seconds)

    def get(self, key: str) -> bytes | None:
        return self._call(self._client.get, key)

    def get_with_room(self, key: str, room: int) -> tuple[memoryview, int] | None:
        if self._raw_pool is None:  # cluster: redis-py routes the key
            return super().get_with_room(key, room)
        value, _ = self._raw_read((("GET", key),), room)
        return value

    def get_range_with_room(self, key: str, offset: int, length: int,
                            room: int) -> tuple[memoryview, int, int] | None:
        start = min(offset, _MAX_OFFSET)
        end = -1 if length == 0 else min(offset + length, _MAX_OFFSET) - 1  # GETRANGE: inclusive
        if self._raw_pool is None:  # cluster: both commands go to the key's node
            def run() -> list:
                pipe = self._client.pipeline(transaction=False)
                pipe.strlen(key)
                pipe.getrange(key, start, end)
                return pipe.execute()

            size, data = self._call(run)
            return None if size == 0 else (memoryview(data), 0, size)
        value, size = self._raw_read((("STRLEN", key), ("GETRANGE", key, start, end)), room)
        if size == 0 or value is None:  # STRLEN of a missing key (no record is empty)
            return None
        buffer, value_start = value
        return buffer, value_start, size

    def _raw_read(self, commands: tuple[tuple, ...], room: int):
        """Send `commands` (GET, or STRLEN then GETRANGE) on a raw connection and read their
        replies with _read_bulk: (value, STRLEN's reply or None)."""
        for attempt in range(2):  # one retry on a fresh connection, as redis-py's Retry does
            connection = None
            try:
                connection = self._raw_pool.get_connection()
                connection.send_packed_command(connection.pack_commands(commands))
                return _read_bulk(connection._sock, room, size_first=len(commands) == 2)
            except redis.ResponseError as error:  # the key holds another type
                if len(commands) > 1:  # the next command's reply is still unread
                    connection.disconnect()
                raise BackendUnavailable(f"redis at {self.url}: {error}") from error
            except (OSError, *_FAILURES) as error:
                if connection is not None:
                    connection.disconnect()  # a half-read reply must never reach the next caller
                if attempt:
                    raise BackendUnavailable(f"redis at {self.url}: {error}") from error
            except BaseException:
                if connection is not None:
                    connection.disconnect()
                raise
            finally:
                if connection is not None:
                    self._raw_pool.release(connection)
        raise AssertionError("unreachable")

    def open_upload(self, key: str, total_bytes: int) -> RecordWriter:
        if self.cluster:  # redis-py routes the key's SET; the pieces are joined for it
            return super().open_upload(key, total_bytes)
        return _StreamedSet(self, self._upload_pool, key, total_bytes)

    def exists(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []

        def run() -> list[bool]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return [bool(n) for n in pipe.execute()]

        return self._call(run)

    def delete(self, key: str) -> bool:
        return bool(self._call(self._client.delete, key))

    def ping(self) -> None:
        self._call(self._client.ping)

    def usage(self) -> Usage:
        """Blocks by SCAN (cached a few seconds: it walks the keyspace), bytes from INFO."""
        with self._usage_lock:
            if self._usage and time.monotonic() - self._usage[0] < _USAGE_CACHE_SECONDS:
                return self._usage[1]
            usage = self._call(self._read_usage)
            self._usage = (time.monotonic(), usage)
            return usage

    def _read_usage(self) -> Usage:
        blocks = sum(1 for _ in self._client.scan_iter(match=_SCAN_PATTERN, count=1000))
        if self.cluster:
            nodes = self._client.info(target_nodes=RedisCluster.PRIMARIES)
            infos = list(nodes.values())
        else:
            infos = [self._client.info()]
        return Usage(
            blocks=blocks,
            bytes=sum(int(i.get("used_memory", 0)) for i in infos),
            capacity_bytes=sum(int(i.get("maxmemory", 0)) for i in infos),
            evictions=sum(int(i.get("evicted_keys", 0)) for i in infos),
        )

    def close(self) -> None:
        self._client.close()
        for pool in (self._raw_pool, self._upload_pool):
            if pool is not None:
                pool.disconnect()


class _StreamedSet(RecordWriter):
    """SET key value [EX ttl], the value sent piece by piece as the record's bytes come in order,
    the command finished only by commit (see the module's docstring)."""

    def __init__(self, backend: RedisBackend, pool: redis.ConnectionPool, key: str,
                 total_bytes: int) -> None:
        self._backend = backend
        self._key = key
        self._pool = pool
        self._connection = None
        self._held: list[memoryview] | None = None  # pieces held instead: the pool was full
        ttl = backend.ttl_seconds
        key_bytes = key.encode()
        self._head = b"".join((
            b"*5\r\n" if ttl else b"*3\r\n", b"$3\r\nSET\r\n",
            b"$%d\r\n" % len(key_bytes), key_bytes, b"\r\n", b"$%d\r\n" % total_bytes))
        self._tail = b"\r\n" + (b"$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(str(ttl)), ttl)
                                if ttl else b"")

    def write(self, data: memoryview) -> None:
        if self._held is not None:
            self._held.append(data)
            return
        try:
            if self._connection is None:
                try:
                    self._connection = self._pool.get_connection()
                except redis.exceptions.MaxConnectionsError:
                    self._held = [data]
                    return
                self._connection.send_packed_command([self._head, data])  # health-checked
            else:  # mid-command: no health-check PING may go out now
                self._connection.send_packed_command([data], check_health=False)
        except (OSError, *_FAILURES) as error:
            self.abort()
            raise BackendUnavailable(f"redis at {self._backend.url}: {error}") from error

    def commit(self) -> None:
        if self._held is not None:
            held, self._held = self._held, []
            self._backend.put_parts(self._key, held)
            return
        if self._connection is None:
            raise ValueError("commit before any write")
        connection = self._connection
        try:
            connection.send_packed_command([self._tail], check_health=False)
            connection.read_response()
        except (OSError, *_FAILURES) as error:
            self.abort()
            raise BackendUnavailable(f"redis at {self._backend.url}: {error}") from error
        except BaseException:
            self.abort()
            raise
        self._connection = None
        self._pool.release(connection)

    def abort(self) -> None:
        self._held = None if self._held is None else []
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.disconnect()  # Redis drops the unfinished command with the connection
            self._pool.release(connection)


def _read_bulk(sock: socket.socket, room: int, size_first: bool = False
               ) -> tuple[tuple[memoryview, int] | None, int | None]:
    """Read one reply to GET (or GETRANGE): None for a nil reply, else the value in a fresh buffer,
    after `room` spare bytes; with `size_first`, first the integer reply to a STRLEN sent before
    it. Returns (value, that integer or None). Raises redis.ResponseError for an error reply,
    ConnectionError for anything that is not a complete reply."""
    first = bytearray(_FIRST_READ_BYTES)
    received = sock.recv_into(first)
    at, strlen = 0, None
    if size_first:
        end, received = _read_line(sock, first, received, 0)
        kind, line = first[:1], bytes(first[1:end])
        if kind == b"-":
            raise redis.ResponseError(line.decode(errors="replace"))
        if kind != b":" or not line.isdigit():
            raise redis.ConnectionError(f"unexpected reply to STRLEN: {bytes(first[:end])[:40]!r}")
        strlen, at = int(line), end + 2
    end, received = _read_line(sock, first, received, at)
    kind, line = first[at : at + 1], bytes(first[at + 1 : end])
    if kind == b"-":
        raise redis.ResponseError(line.decode(errors="replace"))
    if kind == b"_" or (kind == b"$" and line == b"-1"):  # nil (RESP3, RESP2)
        return None, strlen
    if kind != b"$" or not line.isdigit():
        raise redis.ConnectionError(f"unexpected reply to GET: {bytes(first[at:end])[:40]!r}")
    size = int(line)
    buffer = bytearray(room + size + 2)  # + the CRLF that ends the value
    view = memoryview(buffer)
    have = min(received - end - 2, size + 2)
    view[room : room + have] = memoryview(first)[end + 2 : end + 2 + have]
    if received - end - 2 > size + 2:
        raise redis.ConnectionError("more bytes than one reply")
    filled = room + have
    while filled < len(buffer):
        more = sock.recv_into(view[filled:])
        if not more:
            raise redis.ConnectionError("connection closed in a reply")
        filled += more
    if view[-2:] != b"\r\n":
        raise redis.ConnectionError("bulk reply not terminated by CRLF")
    return (view[: room + size], room), strlen


def _read_line(sock: socket.socket, first: bytearray, received: int, at: int) -> tuple[int, int]:
    """Receive into `first` until a reply line starting at `at` is complete: (where its CRLF is,
    bytes received)."""
    while True:
        end = first.find(b"\r\n", at, received)
        if end >= 0 or received == len(first):
            break
        more = sock.recv_into(memoryview(first)[received:])
        if not more:
            raise redis.ConnectionError("connection closed in a reply")
        received += more
    if end < 0:
        raise redis.ConnectionError("reply header too long")
    return end, received

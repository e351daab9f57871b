"""Ranged Put: a record uploaded as byte ranges over concurrent PutWhole calls (PutChunk.upload_id).

Each range is checked (bounds, overlaps, agreement with the upload's first range) and taken; the
record's bytes then go, in record order, to a record.RecordVerifier and to the backend's
RecordWriter (Backend.open_upload), which keeps them apart from the record's key: held in this
process, or for a single Redis streamed into one SET whose end is sent only at commit. A range
that arrives ahead of a missing one waits (a view into its received message) until the gap is
filled; whichever call fills it writes what is now in order. When the last byte is written, that
call finishes the verification — the same checks as a one-call Put, on exactly the bytes written
— and commits the record in one backend step, so the record's key never holds part of a record.
There is no separate commit call: it would cost a round trip (~0.8 ms for a small call on the
2-core VM against ~5-14 ms for a 4 MiB put).

The state of an upload lives in this process, so the ranges of one upload must reach one service
process (the client's connections all go to one address). An upload not completed within its TTL
is abandoned: dropped with what it wrote (an unfinished SET goes with its connection).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import grpc
from kvpack.common import record
from kvpack.kvstore.backends import Backend, RecordTooLarge, RecordWriter
from kvpack.kvstore.metrics import KVStoreMetrics
from kvpack.kvstore.protocol import UPLOAD_ID_BYTES
from kvpack.proto import kvstore_pb2

# Ended uploads remembered (for their TTL) to answer late or retried ranges; oldest dropped first.
MAX_ENDED_UPLOADS = 10_000


class Refused(Exception):
    """A range the service refuses: the gRPC status and its message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Upload:
    def __init__(self, upload_id: bytes, writer: RecordWriter, key: str, namespace: str,
                 block_hash: bytes, total: int) -> None:
        self.id = upload_id
        self.name = upload_id.hex()
        self.key = key
        self.namespace = namespace
        self.block_hash = block_hash
        self.total = total
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.state = "open"  # -> "committing" -> an UPLOAD_EVENTS outcome
        self.ranges: dict[int, int] = {}  # offset -> end, of every range taken
        self.received = 0  # bytes of those ranges
        self.waiting: dict[int, memoryview] = {}  # taken, not yet written (a gap before them)
        self.writing = False  # a call is writing the bytes in order (only it touches these:)
        self.written = 0  # bytes written to the writer and the verifier, from offset 0
        self.writer = writer
        self.verifier = record.RecordVerifier(total, namespace)


class Uploads:
    """The open ranged-Put uploads of one service."""

    def __init__(self, backend: Backend, metrics: KVStoreMetrics, *, ttl_seconds: float,
                 max_staged_bytes: int) -> None:
        self.backend = backend
        self.metrics = metrics
        self.ttl_seconds = ttl_seconds
        self.max_staged_bytes = max_staged_bytes
        self._lock = threading.Lock()
        self._open: OrderedDict[bytes, _Upload] = OrderedDict()  # oldest first
        self._ended: OrderedDict[bytes, tuple[str, _Upload, float]] = OrderedDict()
        self._open_bytes = 0  # total_bytes of the open uploads

    def put_range(self, key: str, namespace: str, block_hash: bytes, total: int, offset: int,
                  data: memoryview, upload_id: bytes) -> kvstore_pb2.PutResponse:
        """Stage one range (namespace, block_hash and total already checked by the servicer); the
        range that completes the record verifies and commits it."""
        if len(upload_id) != UPLOAD_ID_BYTES:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"upload_id: expected {UPLOAD_ID_BYTES} bytes, got {len(upload_id)}")
        end = offset + len(data)
        if offset >= total:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"offset: {offset} is at or past total_bytes={total}")
        if not data:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "data: a range must not be empty")
        if end > total:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"data: range [{offset}, {end}) runs past total_bytes={total}")
        self.sweep()
        upload = self._upload(upload_id, key, namespace, block_hash, total)
        if isinstance(upload, kvstore_pb2.PutResponse):
            return upload  # a range of an upload already stored
        with upload.lock:
            if upload.state != "open":
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"upload_id: upload {upload.name} is {_said(upload.state)}")
            if upload.ranges.get(offset) == end:
                # The same range again (a retry whose answer was lost): already taken as it
                # first came; these bytes are not used.
                return kvstore_pb2.PutResponse(staged_bytes=upload.received)
            for start, stop in upload.ranges.items():
                if start < end and offset < stop:
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"offset: range [{offset}, {end}) overlaps [{start}, {stop}), "
                                  f"already sent in upload {upload.name}")
            upload.ranges[offset] = end
            upload.received += len(data)
            upload.waiting[offset] = data
            received = upload.received
            writes = not upload.writing  # else the call writing now takes this range in turn
            upload.writing = True
        self.metrics.upload_ranges.inc()
        if not writes:
            return kvstore_pb2.PutResponse(staged_bytes=received)
        try:
            complete = self._write_in_order(upload)
        except BaseException:
            # its later ranges are refused; the client puts the record again
            self._end(upload, "refused", by_writer=True)
            raise
        if not complete:
            return kvstore_pb2.PutResponse(staged_bytes=received)
        return self._commit(upload)

    def _write_in_order(self, upload: _Upload) -> bool:
        """Write the ranges that are in order now (this call holds upload.writing); whether the
        whole record is written (then this call commits it)."""
        while True:
            with upload.lock:
                part = upload.waiting.pop(upload.written, None)
                if part is None or upload.state != "open":
                    upload.writing = False
                    if upload.state != "open":
                        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"upload_id: upload {upload.name} is "
                                      f"{_said(upload.state)}")
                    if upload.written < upload.total:
                        return False
                    upload.state = "committing"
                    return True
            upload.verifier.update(part)
            upload.writer.write(part)
            upload.written += len(part)

    def _upload(self, upload_id: bytes, key: str, namespace: str, block_hash: bytes,
                total: int) -> _Upload | kvstore_pb2.PutResponse:
        """The open upload of this id, created by its first range; a PutResponse for a range of
        an upload already committed."""
        with self._lock:
            ended = self._ended.get(upload_id)
            if ended is not None:
                outcome, upload, _ = ended
                _check_same(upload, namespace, block_hash, total)
                if outcome == "committed":
                    return kvstore_pb2.PutResponse(stored_bytes=total, staged_bytes=total)
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"upload_id: upload {upload.name} is {_said(outcome)}")
            upload = self._open.get(upload_id)
            if upload is not None:
                _check_same(upload, namespace, block_hash, total)
                return upload
            if self._open_bytes + total > self.max_staged_bytes:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"total_bytes: {total} more bytes of uploads would pass this "
                              f"service's bound of {self.max_staged_bytes} "
                              f"({self._open_bytes} open); put the record in one call")
            upload = self._open[upload_id] = _Upload(
                upload_id, self.backend.open_upload(key, total), key, namespace, block_hash,
                total)
            self._open_bytes += total
            self.metrics.uploads.labels("staged").inc()
            self.metrics.uploads_open.set(len(self._open))
            return upload

    def _commit(self, upload: _Upload) -> kvstore_pb2.PutResponse:
        """Finish verifying the written record and store it under its key in one backend step."""
        try:
            try:
                upload.verifier.finish()
            except record.RecordError as error:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"data: {error}") from None
            upload.writer.commit()
        except RecordTooLarge as error:
            self._end(upload, "refused")
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
        except BaseException:  # Refused, BackendUnavailable, bugs: ended, later ranges refused
            self._end(upload, "refused")
            raise
        self._end(upload, "committed")
        self.metrics.put_bytes.inc(upload.total)
        return kvstore_pb2.PutResponse(stored_bytes=upload.total, staged_bytes=upload.total)

    def _end(self, upload: _Upload, outcome: str, *, by_writer: bool = False) -> None:
        """Close the upload with `outcome` (counted once) and, unless it was committed, drop
        what it wrote (here, or by the call writing it when that call fails: `by_writer`)."""
        now = time.monotonic()
        with self._lock:
            first = self._open.pop(upload.id, None) is not None
            if first:
                self._open_bytes -= upload.total
                self._ended[upload.id] = (outcome, upload, now)
                while len(self._ended) > MAX_ENDED_UPLOADS or (
                        self._ended
                        and next(iter(self._ended.values()))[2] + self.ttl_seconds < now):
                    self._ended.popitem(last=False)
                self.metrics.uploads.labels(outcome).inc()
                self.metrics.uploads_open.set(len(self._open))
        with upload.lock:
            if first:
                upload.state = outcome
                upload.waiting.clear()
            writing = upload.writing and not by_writer
        if outcome != "committed" and not writing:
            upload.writer.abort()

    def sweep(self) -> None:
        """Abandon the uploads open longer than the TTL (called with every range and by the
        server's health loop); one a call is writing right now is left to finish."""
        deadline = time.monotonic() - self.ttl_seconds
        with self._lock:
            expired = []
            for upload in self._open.values():
                if upload.started > deadline:
                    break
                expired.append(upload)
        for upload in expired:
            with upload.lock:
                if upload.state != "open" or upload.writing:
                    continue
            self._end(upload, "abandoned")

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)


def _check_same(upload: _Upload, namespace: str, block_hash: bytes, total: int) -> None:
    for field, given, first in (("namespace", namespace, upload.namespace),
                                ("block_hash", block_hash, upload.block_hash),
                                ("total_bytes", total, upload.total)):
        if given != first:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{field}: differs from the first range of upload {upload.name}")


def _said(state: str) -> str:
    return {"committing": "being committed by another range",
            "refused": "refused (ended); start a new upload",
            "abandoned": "abandoned (not completed in time, or its staged bytes lost); start a "
                         "new upload",
            "committed": "already stored"}.get(state, state)

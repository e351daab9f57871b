"""Ranged Put: a record uploaded as byte ranges over concurrent PutWhole calls (PutChunk.upload_id).

Each range is checked (bounds, overlaps, agreement with the upload's first range), staged apart
from the record's key (Backend.stage_range: held in this process, a view into its received
message) and fed, in record order, to a record.RecordVerifier (ranges that arrive ahead of a
missing one wait until it comes). The call whose range completes the record finishes the
verification — the same checks as a one-call Put, on exactly the bytes that were staged — and
commits the upload in one backend step (Backend.commit_staged), so the record's key never holds
part of a record. No separate commit call: it would cost a round trip (~0.8 ms for a small call on
the 2-core VM against ~5-14 ms for a 4 MiB put).

The state of an upload lives in this process, so the ranges of one upload must reach one service
process (the client's connections all go to one address). An upload not completed within its TTL
is abandoned: dropped with its staged bytes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import grpc
from kvpack.common import record
from kvpack.kvstore.backends import Backend, BackendUnavailable, RecordTooLarge, StagingLost
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
    def __init__(self, upload_id: bytes, key: str, namespace: str, block_hash: bytes,
                 total: int) -> None:
        self.id = upload_id
        self.name = upload_id.hex()
        self.key = key
        self.namespace = namespace
        self.block_hash = block_hash
        self.total = total
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.state = "open"  # -> "committing" -> an UPLOAD_EVENTS outcome
        self.ranges: dict[int, int] = {}  # offset -> end, of every range taken (staged or not)
        self.staged: set[int] = set()  # offsets of the staged ones
        self.staged_bytes = 0
        self.waiting: dict[int, memoryview] = {}  # staged, not yet verified (a gap before them)
        self.verified = 0  # bytes fed to the verifier, from offset 0
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
            if upload.ranges.get(offset) == end and offset in upload.staged:
                # The same range again (a retry whose answer was lost): already staged and
                # verified as it first came; these bytes are not used.
                return kvstore_pb2.PutResponse(staged_bytes=upload.staged_bytes)
            for start, stop in upload.ranges.items():
                if start < end and offset < stop:
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"offset: range [{offset}, {end}) overlaps [{start}, {stop}), "
                                  f"already sent in upload {upload.name}")
            upload.ranges[offset] = end
        try:
            self.backend.stage_range(upload.name, key, offset, data)
        except BaseException:
            with upload.lock:
                upload.ranges.pop(offset, None)  # may be sent again
            raise
        self.metrics.upload_ranges.inc()
        with upload.lock:
            if upload.state != "open":  # abandoned while this range was being staged
                dropped = upload.state
            else:
                dropped = None
                upload.staged.add(offset)
                upload.staged_bytes += len(data)
                upload.waiting[offset] = data
                while upload.verified in upload.waiting:  # feed the verifier in record order
                    part = upload.waiting.pop(upload.verified)
                    upload.verifier.update(part)
                    upload.verified += len(part)
                if upload.staged_bytes == upload.total:
                    upload.state = "committing"
                staged, complete = upload.staged_bytes, upload.state == "committing"
        if dropped is not None:
            self._discard(upload)
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"upload_id: upload {upload.name} is {_said(dropped)}")
        if not complete:
            return kvstore_pb2.PutResponse(staged_bytes=staged)
        return self._commit(upload)

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
            upload = self._open[upload_id] = _Upload(upload_id, key, namespace, block_hash, total)
            self._open_bytes += total
            self.metrics.uploads.labels("staged").inc()
            self.metrics.uploads_open.set(len(self._open))
            return upload

    def _commit(self, upload: _Upload) -> kvstore_pb2.PutResponse:
        """Verify the complete upload and store it under its key in one backend step."""
        try:
            try:
                upload.verifier.finish()
            except record.RecordError as error:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"data: {error}") from None
            self.backend.commit_staged(upload.name, upload.key, upload.total)
        except Refused:
            self._end(upload, "refused")
            raise
        except RecordTooLarge as error:
            self._end(upload, "refused")
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
        except StagingLost as error:
            self._end(upload, "abandoned")
            raise Refused(grpc.StatusCode.ABORTED,
                          f"upload_id: the backend lost staged ranges ({error}); nothing was "
                          "stored, put the record again") from None
        except BaseException:  # BackendUnavailable, bugs: ended, its later ranges refused
            self._end(upload, "refused")
            raise
        self._end(upload, "committed")
        self.metrics.put_bytes.inc(upload.total)
        return kvstore_pb2.PutResponse(stored_bytes=upload.total, staged_bytes=upload.total)

    def _end(self, upload: _Upload, outcome: str) -> None:
        """Close the upload with `outcome`, dropping what it staged unless it was committed."""
        with upload.lock:
            upload.state = outcome
            upload.waiting.clear()
            upload.verifier = None
        now = time.monotonic()
        with self._lock:
            if self._open.pop(upload.id, None) is not None:
                self._open_bytes -= upload.total
            self._ended[upload.id] = (outcome, upload, now)
            while len(self._ended) > MAX_ENDED_UPLOADS or (
                    self._ended and next(iter(self._ended.values()))[2] + self.ttl_seconds < now):
                self._ended.popitem(last=False)
            self.metrics.uploads.labels(outcome).inc()
            self.metrics.uploads_open.set(len(self._open))
        if outcome != "committed":
            self._discard(upload)

    def _discard(self, upload: _Upload) -> None:
        try:
            self.backend.discard_staged(upload.name, upload.key)
        except BackendUnavailable:  # a backend staging elsewhere expires it by itself
            pass

    def sweep(self) -> None:
        """Abandon the uploads open longer than the TTL (called with every range and by the
        server's health loop)."""
        deadline = time.monotonic() - self.ttl_seconds
        with self._lock:
            expired = []
            for upload in self._open.values():
                if upload.started > deadline:
                    break
                expired.append(upload)
        for upload in expired:
            with upload.lock:
                if upload.state != "open":  # committing: its commit ends it
                    continue
                upload.state = "abandoned"
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

"""Transfer constants the kvstore service and its client share."""

import os

from kvpack.common.grpc_server import MAX_MESSAGE_BYTES

# Chunks of the streaming Put/Get: just under gRPC's default 4 MiB receive limit, so clients with
# default settings still read every chunk; large chunks keep Python's per-message overhead small.
DEFAULT_CHUNK_BYTES = (4 << 20) - (64 << 10)
# Records up to this size travel as one message each way (PutWhole; whole records in GetMany) from
# the Python client: a stream read through the channel's spin thread pays thread hand-offs per
# message, and on loopback one message moved 4-32 MiB at least as fast as a stream of 1-16 MiB
# chunks. Larger records stream, so they stay under message limits. (get: STREAMED_GET_BYTES.)
WHOLE_RECORD_BYTES = 32 << 20
# KVStoreClient.get fetches a record larger than this in byte ranges (below), or with get_ranges=1
# with the streaming Get (1 MiB chunks, read on the caller's thread), instead of one GetWhole,
# learning per namespace how large its records are (blocks of one namespace have one size). 2-core
# VM, Redis backend: at 4 MiB the stream was 14% faster than one message in 4 MiB-only bench runs
# (within the spread of full runs); at 1 MiB and below one message was 15-20% faster
# (bench/results/kvstore_get_ab_vm_cpu.json, bench/README.md).
STREAMED_GET_BYTES = 2 << 20
# How finely the client splits one record into parallel ranges depends on the cores it has: each
# range costs the client and the service a few tenths of a ms of Python (~0.8 ms of CPU per ranged
# Put call), which overlaps only where cores are free. A host with MANY_CORES or more (a GPU
# server) splits a 4 MiB record in 4; a small machine keeps larger ranges. Measured with
# bench_store.py (alternating rounds, medians):
#   16-core H100 host, 20 rounds (bench/results/kvstore_throughput_h100_host_run5.json): 4 MiB
#     Get 4 ranges 0.48x raw GET, 8 ranges 0.36x, one call 0.39x; Put 4 ranges 0.71x, 8 ranges
#     0.55x, one call 0.40x (the defaults: Get 0.45x, Put 0.67x); 16 MiB 8 ranges Get 1.27x, Put
#     1.15x, 4 ranges 1.13x / 0.93x.
#   Same host, run 4 (bench/results/kvstore_throughput_h100_host_run4.json): 4 MiB
#     Get 4 ranges 0.46x raw GET, 2 ranges 0.42x, one call 0.36x; Put 4 ranges 0.73x raw SET,
#     2 ranges 0.57x, one call 0.46x; 16 MiB Get 4 ranges 1.00x, Put 4 ranges 0.95x.
#   Shared 2-core VM, one core held by other work (client, service and Redis share the other),
#     5 runs (kvstore_get_ranges_vm_cpu.json, kvstore_put_ranges_vm_cpu.json): 4 MiB Get 2 ranges
#     592 MB/s, 4 ranges 597, 8 ranges 467, one call 604; 4 MiB Put in 2-4 ranges 10-25% slower
#     than one call; 16 MiB Get and Put in 4 ranges ~1.5x one call.
# Ranges are "at least" their size, so 768 KiB lets a 4 MiB block (4 MiB less its header) split in
# 4 where 1 MiB would give 3.
MANY_CORES = 8


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # a container's CPU set, not the host's count
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_MANY_CORES_HERE = _usable_cores() >= MANY_CORES
# KVStoreClient.get fetches a record over STREAMED_GET_BYTES as byte ranges (GetWhole with
# offset/length) in parallel, one connection each: at most DEFAULT_GET_RANGES ranges of at least
# GET_RANGE_BYTES (many cores: a 4 MiB record in 4 ranges; few: 2-4 MiB in 1 on the calling
# thread, 4 MiB in 2, 16 MiB in 4).
GET_RANGE_BYTES = (768 << 10) if _MANY_CORES_HERE else (2 << 20)
DEFAULT_GET_RANGES = 4
# KVStoreClient.put sends a record as byte ranges (PutWhole with PutChunk.upload_id), in parallel
# over separate connections, when it splits into at least 2 ranges of at least PUT_RANGE_BYTES
# (at most DEFAULT_PUT_RANGES of them). Many cores: from 1.5 MiB on, a 4 MiB record in 4; few
# cores: below 8 MiB one call, 8-16 MiB in 2-3, 16 MiB and up in 4.
PUT_RANGE_BYTES = (768 << 10) if _MANY_CORES_HERE else (4 << 20)
DEFAULT_PUT_RANGES = 4
# An upload id: random bytes the client picks per ranged put.
UPLOAD_ID_BYTES = 16
# A ranged upload not completed within this long is abandoned: the service drops it and what it
# staged (Redis also expires the staging string after as long, should the service be gone).
UPLOAD_TTL_SECONDS = 60.0
# Bytes of records (their total_bytes) a service has in open uploads at most; a new upload past
# it is RESOURCE_EXHAUSTED (the client then puts the record in one call).
DEFAULT_MAX_STAGED_BYTES = 1 << 30
# Largest record GetWhole sends in one message, whatever the caller asks: room for the framing under
# the message limit both ends set (kvpack.common.grpc_server.CHANNEL_OPTIONS).
MAX_WHOLE_RECORD_BYTES = MAX_MESSAGE_BYTES - (64 << 10)
# Largest record a server accepts by default (a 256-token block of a 70B model, compressed, fits).
DEFAULT_MAX_RECORD_BYTES = 256 << 20
# Most hashes one Match or GetMany may name.
MAX_HASHES_PER_CALL = 65536

"""Transfer constants the kvstore service and its client share."""

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
# KVStoreClient.get fetches a record over STREAMED_GET_BYTES as byte ranges (GetWhole with
# offset/length) in parallel, one connection each: at most DEFAULT_GET_RANGES ranges of at least
# GET_RANGE_BYTES (a 4 MiB record: 2 ranges; 16 MiB: 4; 2-4 MiB: 1, on the calling thread). The
# shared 2-core VM (one core held by other work: client, service and Redis share the other, so
# little can overlap), medians of 5 bench_store.py runs (bench/results/
# kvstore_get_ranges_vm_cpu.json): 16 MiB in 4 ranges 722 MB/s, 8 ranges 709, 2 ranges 480, one
# call 485; 4 MiB in 2 ranges 592, 4 ranges 597, 8 ranges 467, one call 604, and 2 ranges ahead
# of 4 in two earlier 5-run sets (582 vs 526, 615 vs 540). Each call costs the client and the
# service a few tenths of a ms of Python, so small ranges lose where cores are scarce.
GET_RANGE_BYTES = 2 << 20
DEFAULT_GET_RANGES = 4
# KVStoreClient.put sends a record as byte ranges (PutWhole with PutChunk.upload_id), in parallel
# over separate connections, when it splits into at least 2 ranges of at least PUT_RANGE_BYTES
# (at most DEFAULT_PUT_RANGES of them): below 8 MiB one call, 8-16 MiB in 2-3, 16 MiB and up in 4.
# The shared 2-core VM (one core held by other work), bench_store.py's alternating rounds,
# medians of runs (bench/results/kvstore_put_ranges_vm_cpu.json, bench/README.md "Put: ranges"):
# 16 MiB in 4 ranges ~1.5x one call's MB/s, but 4 MiB in 2, 3 or 4 ranges 10-25% slower than one
# call (each call costs the client and the service ~0.8 ms of CPU, and there is no free core to
# overlap them on). A host with free cores may gain at 4 MiB too (ranged Get did: 16-core host,
# 4 ranges 0.45x raw GET vs one call 0.37x): `--put-ranges 2,4` times it; 2 MiB ranges would
# split a 4 MiB record in 2.
PUT_RANGE_BYTES = 4 << 20
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

"""Transfer constants the kvstore service and its client share."""

from kvpack.common.grpc_server import MAX_MESSAGE_BYTES

# Chunks of the streaming Put/Get: just under gRPC's default 4 MiB receive limit, so clients with
# default settings still read every chunk; large chunks keep Python's per-message overhead small.
DEFAULT_CHUNK_BYTES = (4 << 20) - (64 << 10)
# Records up to this size travel as one message each way (PutWhole/GetWhole) from the Python client:
# a stream pays thread hand-offs per message, and on loopback one message moved 4-32 MiB at least as
# fast as a stream of 1-16 MiB chunks. Larger records stream, so they stay under message limits.
WHOLE_RECORD_BYTES = 32 << 20
# Largest record GetWhole sends in one message, whatever the caller asks: room for the framing under
# the message limit both ends set (kvpack.common.grpc_server.CHANNEL_OPTIONS).
MAX_WHOLE_RECORD_BYTES = MAX_MESSAGE_BYTES - (64 << 10)
# Largest record a server accepts by default (a 256-token block of a 70B model, compressed, fits).
DEFAULT_MAX_RECORD_BYTES = 256 << 20
# Most hashes one Match or GetMany may name.
MAX_HASHES_PER_CALL = 65536

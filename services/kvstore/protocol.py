"""Transfer constants the kvstore service and its client share."""

# Just under gRPC's default 4 MiB receive limit, so clients with default settings still read every
# chunk; large chunks keep Python's per-message overhead small.
DEFAULT_CHUNK_BYTES = (4 << 20) - (64 << 10)
# Largest record a server accepts by default (a 256-token block of a 70B model, compressed, fits).
DEFAULT_MAX_RECORD_BYTES = 256 << 20
# Most hashes one Match or GetMany may name.
MAX_HASHES_PER_CALL = 65536

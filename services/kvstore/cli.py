"""`kvpack kvstore serve`."""

from __future__ import annotations

import argparse
import logging

from kvpack.common.flags import host_port, non_negative_int
from kvpack.common.lifecycle import serve_until_signalled


def add_parser(subparsers, name: str, help_text: str) -> None:
    kvstore = subparsers.add_parser(name, help=help_text, description=help_text)
    commands = kvstore.add_subparsers(dest="kvstore_command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the kvstore gRPC service",
                                description="Run the kvpack.v1.KVStore gRPC service.")
    serve.add_argument("--listen", type=host_port, default="127.0.0.1:50051",
                       help="gRPC address HOST:PORT (default %(default)s)")
    serve.add_argument("--backend", default="memory://",
                       help="memory:// | redis://HOST:PORT/DB | redis+cluster://HOST:PORT "
                            "(default %(default)s)")
    serve.add_argument("--metrics-port", type=non_negative_int, default=9101,
                       help="Prometheus /metrics port (default %(default)s)")
    serve.add_argument("--capacity-bytes", type=non_negative_int, default=1 << 30,
                       help="memory backend capacity; least recently used blocks are evicted "
                            "(default %(default)s)")
    serve.add_argument("--ttl-seconds", type=non_negative_int, default=0,
                       help="expire blocks after this many seconds; 0 = never (default)")
    serve.add_argument("--max-record-bytes", type=non_negative_int, default=256 << 20,
                       help="largest block record accepted (default %(default)s)")
    serve.add_argument("--token", default=None,
                       help="shared secret; clients send 'authorization: Bearer TOKEN'")
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from kvpack.common.allocator import keep_freed_memory
    from kvpack.kvstore.backends import open_backend
    from kvpack.kvstore.server import KVStoreConfig, KVStoreServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:  # validate the URL before binding anything, for a one-line error
        open_backend(args.backend, capacity_bytes=max(args.capacity_bytes, 1)).close()
    except ValueError as error:
        raise SystemExit(f"kvpack kvstore serve: --backend: {error}") from None
    if args.capacity_bytes == 0:
        raise SystemExit("kvpack kvstore serve: --capacity-bytes: must be positive")
    keep_freed_memory()  # blocks are large buffers: reuse freed ones (see kvpack.common.allocator)
    config = KVStoreConfig(
        listen=args.listen, backend=args.backend, metrics_port=args.metrics_port,
        capacity_bytes=args.capacity_bytes, ttl_seconds=args.ttl_seconds or None,
        token=args.token, max_record_bytes=args.max_record_bytes)
    try:
        server = KVStoreServer(config)
    except OSError as error:
        raise SystemExit(f"kvpack kvstore serve: {error}") from None
    print(f"kvstore: gRPC on {server.address}, backend {args.backend}, "
          f"metrics on http://0.0.0.0:{server.metrics_port}/metrics", flush=True)
    serve_until_signalled("kvstore", server.stop)
    return 0

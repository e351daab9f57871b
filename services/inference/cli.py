"""`kvpack inference serve` and `kvpack generate`."""

from __future__ import annotations

import argparse
import logging

from kvpack.common.flags import host_port, non_negative_int, positive_int
from kvpack.common.lifecycle import serve_until_signalled

# Codec parameters exposed as flags of `inference serve`: dest -> (codec parameter, type, methods).
METHOD_FLAGS: dict[str, tuple[str, type, tuple[str, ...]]] = {
    "bits": ("bits", int, ("kivi", "kvquant")),
    "group_size": ("group_size", int, ("kivi", "qjl")),
    "window": ("window", int, ("kivi", "qjl")),
    "sketch_dim": ("sketch_dim", int, ("qjl",)),
    "outlier_channels": ("outlier_channels", int, ("qjl",)),
    "outlier_sketch_dim": ("outlier_sketch_dim", int, ("qjl",)),
    "sketch_seed": ("seed", int, ("qjl",)),
    "value_bits": ("value_bits", int, ("qjl", "kvquant")),
    "key_bits": ("key_bits", int, ("kvquant",)),
    "avg_bits": ("avg_bits", float, ("kvquant",)),
    "value_outliers": ("value_outliers", float, ("kvquant",)),
    "key_outliers": ("key_outliers", float, ("kvquant",)),
    "calibration": ("calibration", str, ("kvquant",)),
    "outliers": ("outliers", float, ("kvquant",)),
    "sink_tokens": ("sink_tokens", int, ("kvquant",)),
}


def add_parser(subparsers, name: str, help_text: str) -> None:
    inference = subparsers.add_parser(name, help=help_text, description=help_text)
    commands = inference.add_subparsers(dest="inference_command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the inference gRPC service",
        description="Run the kvpack.v1.Inference gRPC service.",
    )
    serve.add_argument(
        "--listen",
        type=host_port,
        default="127.0.0.1:50052",
        help="gRPC address HOST:PORT (default %(default)s)",
    )
    serve.add_argument(
        "--model",
        required=True,
        help="HF model id, local HF folder, GGUF file, or llama2.c checkpoint folder",
    )
    serve.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    serve.add_argument(
        "--kvstore",
        default="none",
        help="kvstore HOST:PORT for prefix sharing, or none (default %(default)s)",
    )
    serve.add_argument("--kvstore-token", default=None, help="bearer token of the kvstore")
    serve.add_argument(
        "--kvstore-streams",
        type=positive_int,
        default=None,
        help="parallel kvstore connections a shared prefix is fetched over (default: the "
        "client's, 1; 4 was fastest on a 16-core GPU host)",
    )
    serve.add_argument(
        "--prefix-load-threads",
        type=positive_int,
        default=None,
        help="threads that load fetched prefix blocks into the cache (default 1)",
    )
    serve.add_argument(
        "--method",
        default="fp16",
        help="default compression method: fp16|kivi|qjl|kvquant (default %(default)s)",
    )
    for dest, (param, kind, methods) in METHOD_FLAGS.items():
        serve.add_argument(
            f"--{dest.replace('_', '-')}",
            dest=dest,
            type=kind,
            default=None,
            help=f"codec parameter {param} of {'/'.join(methods)}",
        )
    serve.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="(default %(default)s)"
    )
    serve.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="model and cache dtype (default float32 on cpu, bfloat16 on cuda)",
    )
    serve.add_argument(
        "--block-tokens",
        type=positive_int,
        default=256,
        help="tokens per kvstore block (default %(default)s)",
    )
    serve.add_argument(
        "--prefill-chunk-tokens",
        type=positive_int,
        default=256,
        help="prompt tokens per prefill step (default %(default)s)",
    )
    serve.add_argument(
        "--max-batch",
        type=positive_int,
        default=8,
        help="sequences decoded together (default %(default)s)",
    )
    serve.add_argument(
        "--max-queue",
        type=positive_int,
        default=32,
        help="requests waiting beyond the batch before RESOURCE_EXHAUSTED (default %(default)s)",
    )
    serve.add_argument(
        "--metrics-port",
        type=non_negative_int,
        default=9102,
        help="Prometheus /metrics port (default %(default)s)",
    )
    serve.add_argument(
        "--token", default=None, help="shared secret; clients send 'authorization: Bearer TOKEN'"
    )
    serve.set_defaults(run=run_serve, parser=serve)


def method_params(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    params = {}
    for dest, (param, _, methods) in METHOD_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if args.method not in methods:
            parser.error(
                f"--{dest.replace('_', '-')} applies to {'/'.join(methods)}, "
                f"not --method {args.method}"
            )
        params[param] = value
    return params


def run_serve(args: argparse.Namespace) -> int:
    from kvpack.common.allocator import keep_freed_memory
    from kvpack.inference.server import InferenceConfig, InferenceServer

    params = method_params(args, args.parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    kvstore = None if args.kvstore.lower() == "none" else host_port(args.kvstore)
    config = InferenceConfig(
        listen=args.listen,
        model=args.model,
        gguf_file=args.gguf_file,
        device=args.device,
        dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
        kvstore=kvstore,
        kvstore_token=args.kvstore_token,
        kvstore_streams=args.kvstore_streams,
        prefix_load_threads=args.prefix_load_threads,
        method=args.method,
        method_params=params,
        block_tokens=args.block_tokens,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        metrics_port=args.metrics_port,
        token=args.token,
    )
    keep_freed_memory()  # packed blocks to/from the kvstore are large buffers: reuse freed ones
    try:
        server = InferenceServer(config)
    except (ValueError, OSError) as error:
        raise SystemExit(f"kvpack inference serve: {error}") from None
    print(
        f"inference: gRPC on {server.address}, model {server.loaded.model_id}, "
        f"method {args.method}, metrics on http://0.0.0.0:{server.metrics_port}/metrics",
        flush=True,
    )
    serve_until_signalled("inference", server.stop)
    return 0

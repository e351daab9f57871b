"""`kvpack generate`: stream a completion from an inference service (no torch needed)."""

from __future__ import annotations

import argparse
import json
import sys

from kvpack.common.flags import host_port, non_negative_int, positive_int


def add_parser(subparsers, name: str, help_text: str) -> None:
    generate = subparsers.add_parser(name, help=help_text, description=help_text)
    generate.add_argument(
        "--target",
        type=host_port,
        default="127.0.0.1:50052",
        help="inference service HOST:PORT (default %(default)s)",
    )
    generate.add_argument("--method", default="", help="compression method (default: the server's)")
    generate.add_argument("--tenant", default="", help="prefix-sharing tenant")
    generate.add_argument(
        "--max-new-tokens", type=positive_int, default=128, help="(default %(default)s)"
    )
    generate.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default %(default)s)"
    )
    generate.add_argument("--top-p", type=float, default=1.0, help="(default %(default)s)")
    generate.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off (default)")
    generate.add_argument("--seed", type=non_negative_int, default=None, help="sampling seed")
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument(
        "--no-reuse",
        action="store_true",
        help="neither read nor write prompt blocks in the kvstore",
    )
    generate.add_argument("--token", default=None, help="bearer token of the inference service")
    generate.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object at the end instead of streaming text",
    )
    generate.add_argument("prompt", help="prompt text")
    generate.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import grpc
    from kvpack.common.grpc_server import CHANNEL_OPTIONS
    from kvpack.proto import inference_pb2, inference_pb2_grpc

    request = inference_pb2.GenerateRequest(
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
        method=args.method,
        tenant=args.tenant,
        reuse=not args.no_reuse,
    )
    if args.seed is not None:
        request.seed = args.seed
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    text_parts: list[str] = []
    usage = None
    with grpc.insecure_channel(args.target, options=CHANNEL_OPTIONS) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            for response in stub.Generate(request, metadata=metadata):
                text_parts.append(response.text)
                if not args.json and response.text:
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
                if response.HasField("usage"):
                    usage = response.usage
        except grpc.RpcError as error:
            raise SystemExit(f"kvpack generate: {error.code().name}: {error.details()}") from None
    if args.json:
        result = {"text": "".join(text_parts)}
        if usage is not None:
            result.update(
                {field.name: getattr(usage, field.name) for field in usage.DESCRIPTOR.fields}
            )
        print(json.dumps(result))
    else:
        print()
    return 0

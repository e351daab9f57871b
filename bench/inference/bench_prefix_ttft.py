"""Time to first token with and without a stored prefix, through gRPC and a real kvstore.

    python bench/inference/bench_prefix_ttft.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --text ../shared/data/text/wikitext-2-raw/wiki.test.raw --out bench/results/x.json

The same 1024-token prompt is sent three times per method: the first request computes the whole
prompt and stores its full blocks; the next ones fetch the blocks before the last one and compute
the rest. Runs on the CPU or a GPU (`--device`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import grpc
from kvpack.inference.loader import load_model
from kvpack.inference.server import InferenceConfig, InferenceServer
from kvpack.kvstore.server import KVStoreConfig, KVStoreServer
from kvpack.proto import inference_pb2, inference_pb2_grpc

METHODS = {"fp16": {}, "kivi": {"bits": 2, "group_size": 32, "window": 0}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--block-tokens", type=int, default=256)
    args = parser.parse_args()
    loaded = load_model(args.model, device=args.device)
    text = args.text.read_text(encoding="utf-8")
    ids = loaded.tokenizer.encode(text[: args.prompt_tokens * 12])[: args.prompt_tokens]
    store = KVStoreServer(KVStoreConfig(listen="127.0.0.1:0", capacity_bytes=4 << 30))
    report = {
        "machine": platform.processor() or platform.machine(),
        "model": loaded.model_id,
        "device": args.device,
        "block_tokens": args.block_tokens,
        "results": {},
    }
    for method, params in METHODS.items():
        server = InferenceServer(
            InferenceConfig(
                listen="127.0.0.1:0",
                kvstore=store.address,
                method=method,
                method_params=params,
                block_tokens=args.block_tokens,
                prefill_chunk_tokens=args.block_tokens,
            ),
            loaded=loaded,
        )
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(server.address))
        runs = []
        for _ in range(3):
            request = inference_pb2.GenerateRequest(prompt_token_ids=ids, max_new_tokens=4)
            usage = list(stub.Generate(request))[-1].usage
            runs.append({"cached_tokens": usage.cached_tokens, "ttft_seconds": usage.ttft_seconds})
            time.sleep(2)  # let the background puts finish
        report["results"][method] = runs
        print(method, runs, flush=True)
        server.stop()
    store.stop()
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

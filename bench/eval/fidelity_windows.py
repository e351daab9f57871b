"""The fidelity report's protocol on other 1024-token windows of wiki.test.raw, for chosen methods.

    OMP_NUM_THREADS=1 python bench/eval/fidelity_windows.py --windows 1,2,3 \
        --only "fp16,KIVI-4,KVQuant-4 1%" [--workers 2] [--out PATH]

The report (bench/eval/fidelity.py) scores the first 1024 tokens only, and on 1023 predictions
ppl moves by 1-2% between quantizers of equal damage (docs/eval.md, "KVQuant against KIVI-4").
This runs the same protocol (kvpack.eval.perplexity: 128-token prefill, teacher-forced decode
through the cache, no BOS) on windows k = 1, 2, ... (tokens [1024 k, 1024 (k + 1)) of the
tokenized text) with fidelity.py's method table and KVQuant artifacts, and writes every
(method, window) ppl and each method's mean change against fp16 on the same windows to
bench/results/heldout_fidelity_smollm2.json (not a report table: the report stays on window 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity  # noqa: E402

OUT = fidelity.REPO / "bench" / "results" / "heldout_fidelity_smollm2.json"


def _init_worker(model_path: str, windows: list[int]) -> None:
    import torch
    from kvpack.calibrate.cli import token_windows
    from kvpack.inference.loader import load_model

    torch.set_num_threads(1)
    loaded = load_model(model_path)
    text = fidelity.TEXT.read_text(encoding="utf-8")
    tokens = token_windows(loaded.tokenizer, text, 1024 * (max(windows) + 1), 1024)
    fidelity._worker["loaded"] = loaded
    fidelity._worker["windows"] = {k: tokens[k] for k in windows}


def _evaluate(label: str, method: str, params: dict, window: int, prefill_tokens: int) -> dict:
    fidelity._worker["tokens"] = fidelity._worker["windows"][window]
    return {"window": window, **fidelity._evaluate(label, method, params, prefill_tokens)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="1,2,3", help="comma-separated window indices")
    parser.add_argument("--only", required=True, help="comma-separated labels of fidelity.py")
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    windows = [int(part) for part in args.windows.split(",")]
    labels = args.only.split(",")
    methods = [m for m in fidelity.METHODS if m[0] in labels]
    if "fp16" not in labels or len(methods) != len(labels):
        sys.exit(f"--only must name fp16 and labels of fidelity.py: {[m[0] for m in methods]}")

    from kvpack.models import fetch_smollm2

    model_path = str(fetch_smollm2())
    started = time.time()
    fidelity.ensure_calibration(model_path, sorted({p.get("calibration", "1%")
                                                    for _, method, p in methods
                                                    if method == "kvquant"}))
    rows = []
    with ProcessPoolExecutor(args.workers, initializer=_init_worker,
                             initargs=(model_path, windows)) as pool:
        futures = [pool.submit(_evaluate, label, method, params, window, args.prefill_tokens)
                   for window in windows for label, method, params in methods]
        for future in as_completed(futures):
            data = future.result()
            rows.append(data)
            print(f"window {data['window']} {data['label']:<34} ppl {data['ppl']:9.4f}  "
                  f"bits {data['bits_per_element']:.3f}  ({data['seconds']:.0f} s)", flush=True)
    fp16 = {r["window"]: r["ppl"] for r in rows if r["label"] == "fp16"}
    summary = []
    for label, _, _ in methods:
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["window"])
        changes = [r["ppl"] / fp16[r["window"]] - 1 for r in mine]
        summary.append({
            "label": label, "bits_per_element": mine[0]["bits_per_element"],
            "ppl_change_percent": [round(100 * c, 3) for c in changes],
            # mean log-ratio: the change of the geometric-mean ppl over the windows
            "mean_change_percent": round(100 * (math.exp(
                sum(math.log1p(c) for c in changes) / len(changes)) - 1), 3),
        })
    report = {
        "what": "fidelity.py's protocol on held-out 1024-token windows of wiki.test.raw",
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (dequantized, float32 compute)",
        "text": "wikitext-2-raw/wiki.test.raw", "windows": windows,
        "prefill_tokens": args.prefill_tokens,
        "machine": f"{platform.node()} CPU ({os.cpu_count()} cores, {platform.machine()}), "
                   "shared dev box, no GPU",
        "wall_seconds": round(time.time() - started, 1),
        "summary": summary,
        "rows": sorted(rows, key=lambda r: (r["label"], r["window"])),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for entry in summary:
        print(f"{entry['label']:<34} {entry['bits_per_element']:.3f} b  mean "
              f"{entry['mean_change_percent']:+.2f}%  per window {entry['ppl_change_percent']}")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fidelity report: every method's perplexity and bits per number on SmolLM2-135M, in one run.

    python bench/eval/fidelity.py [--tokens 1024] [--workers 2]

Same text, same tokens, same protocol for all (kvpack.eval.perplexity: 128-token prefill, then
teacher-forced decode through the cache; no BOS, as DESIGN.md's anchor). KVQuant is calibrated on
wikitext-2 valid first (cached under ~/.cache/kvpack/calibration). Methods run in worker processes
of one thread each: on a small shared CPU, one busy thread per core beats oversubscribed BLAS.
Writes bench/results/fidelity_smollm2.json, then rebuilds the report (bench/report/build_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

# The CPU reference paths, not the Triton interpreter (same math, tested equal in tests/kernels).
os.environ.pop("TRITON_INTERPRET", None)

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("KVPACK_SHARED_DATA", REPO.parent / "shared" / "data"))
TEXT = SHARED / "text" / "wikitext-2-raw" / "wiki.test.raw"
CALIBRATION_TEXT = SHARED / "text" / "wikitext-2" / "valid.txt"
CALIBRATION_DIR = Path.home() / ".cache" / "kvpack" / "calibration"
# KVQuant artifacts, all fitted on the first 4096 tokens of wikitext-2 valid (512-token windows,
# codebooks for 2, 3, 4 bits, `kvpack calibrate`'s default codebooks: evenly spaced 4-bit keys,
# k-means elsewhere): name -> (file, the flags that differ). "1%": key ranges at the 0.5/99.5%
# quantiles, one outlier slot, per-layer sensitivities on the first 512 tokens (for avg_bits);
# "2%": key ranges at the 1/99% quantiles (two key slots by default), no sensitivities.
CALIBRATIONS: dict[str, tuple[str, list[str]]] = {
    "1%": ("smollm2-wt2valid-4096-sens512-evenk4.safetensors",
           ["--outliers", "0.01", "--sensitivity-tokens", "512"]),
    "2%": ("smollm2-wt2valid-4096-r2-evenk4.safetensors",
           ["--outliers", "0.02", "--sensitivity-tokens", "0"]),
}
CALIBRATION = CALIBRATION_DIR / CALIBRATIONS["1%"][0]  # the default artifact
OUT = REPO / "bench" / "results" / "fidelity_smollm2.json"

# (label, method, params); the QJL sizes are picked for ~3.3 and ~4.3 bits at head_dim 64.
# window 0 (no full-precision recent tokens), not the service's 128: at 1024 tokens a 128-token
# fp16 window alone costs 2 bits per number, and every past token should go through the codec.
METHODS: list[tuple[str, str, dict]] = [
    ("fp16", "fp16", {}),
    ("KIVI-2", "kivi", {"bits": 2, "window": 0}),
    ("KIVI-4", "kivi", {"bits": 4, "window": 0}),
    ("QJL m=128 (~3.3 b)", "qjl", {"sketch_dim": 128, "outlier_channels": 4,
                                   "outlier_sketch_dim": 64, "value_bits": 2, "window": 0}),
    ("QJL m=192 (~4.3 b)", "qjl", {"sketch_dim": 192, "outlier_channels": 8,
                                   "outlier_sketch_dim": 128, "value_bits": 2, "window": 0}),
    ("KVQuant-2 1%", "kvquant", {"bits": 2, "outliers": 0.01}),
    ("KVQuant-3 1%", "kvquant", {"bits": 3, "outliers": 0.01}),
    ("KVQuant-4 1%", "kvquant", {"bits": 4, "outliers": 0.01}),
    # per-layer key/value widths from the calibration's measured sensitivities; mean code bits
    # chosen so that with the 1% outlier slots, value scales and the sink the total is ~3.3 / ~4.3
    ("KVQuant mixed ~3.0 b", "kvquant", {"avg_bits": 2.36, "outliers": 0.01}),  # = KIVI-2's
    ("KVQuant mixed ~3.3 b", "kvquant", {"avg_bits": 2.66, "outliers": 0.01}),
    ("KVQuant mixed 3.64 b", "kvquant", {"avg_bits": 3.0, "outliers": 0.01}),  # = KVQuant-3's
    ("KVQuant mixed ~4.3 b", "kvquant", {"avg_bits": 3.66, "outliers": 0.01}),
    # picked by fake-quant KL on held-out text (bench/eval/kvquant_screen.py, docs/eval.md):
    # more fp16 sink tokens (0.016 bits each at 1024 tokens), and for 4-bit codes key ranges at
    # the 1/99% quantiles with two key slots, one value slot
    ("KVQuant mixed ~4.3 b + 4 sinks", "kvquant", {"avg_bits": 3.66, "outliers": 0.01,
                                                  "sink_tokens": 4}),
    ("KVQuant-4 K 2% 2 slots", "kvquant", {"bits": 4, "outliers": 0.02, "value_outliers": 0.01,
                                           "calibration": "2%"}),
    ("KVQuant-4 K 2% 2 slots + 8 sinks", "kvquant", {"bits": 4, "outliers": 0.02,
                                                    "value_outliers": 0.01, "sink_tokens": 8,
                                                    "calibration": "2%"}),
    ("HF quanto int2", "hf-quanto", {"bits": 2}),
    ("HF quanto int4", "hf-quanto", {"bits": 4}),
]

_worker: dict = {}


def _init_worker(model_path: str, num_tokens: int) -> None:
    import torch
    from kvpack.calibrate.cli import token_windows
    from kvpack.inference.loader import load_model

    torch.set_num_threads(1)
    loaded = load_model(model_path)
    text = TEXT.read_text(encoding="utf-8")
    _worker["loaded"] = loaded
    _worker["tokens"] = token_windows(loaded.tokenizer, text, num_tokens, num_tokens)[0]


def _evaluate(label: str, method: str, params: dict, prefill_tokens: int) -> dict:
    from kvpack.eval.hf_quanto import hf_quanto_perplexity
    from kvpack.eval.perplexity import codec_perplexity
    from kvpack.inference.methods import MethodSpec

    loaded, tokens = _worker["loaded"], _worker["tokens"]
    artifact = None
    if method == "hf-quanto":
        result = hf_quanto_perplexity(loaded, tokens, bits=params["bits"],
                                      prefill_tokens=prefill_tokens)
    else:
        if method == "kvquant":
            artifact = CALIBRATIONS[params.get("calibration", "1%")][0]
            params = {**params, "calibration": str(CALIBRATION_DIR / artifact)}
        result = codec_perplexity(loaded, tokens, MethodSpec.of(method, params),
                                  prefill_tokens=prefill_tokens)
    data = {"label": label, **result.to_json()}
    data["params"].pop("calibration", None)
    if artifact is not None:
        data["calibration_artifact"] = artifact
    return data


def ensure_calibration(model_path: str, names) -> None:
    """Make the named KVQuant artifacts that are not cached yet (~7 minutes with sensitivities
    on the 2-core dev VM, ~1 without)."""
    from kvpack.cli import main

    for name in names:
        file, flags = CALIBRATIONS[name]
        out = CALIBRATION_DIR / file
        if out.exists():
            continue
        code = main(["calibrate", "--model", model_path, "--text", str(CALIBRATION_TEXT),
                     "--tokens", "4096", "--sequence-length", "512", "--bits", "2,3,4", *flags,
                     "--out", str(out), "--quiet"])
        if code:
            sys.exit(f"calibration {name} failed ({code})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated labels (default: all)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the existing report's rows of the methods not run now")
    parser.add_argument("--note", default=None,
                        help="with --merge: which rows come from which run (kept in the JSON)")
    args = parser.parse_args()

    from kvpack.models import fetch_smollm2

    model_path = str(fetch_smollm2())
    started = time.time()
    methods = [m for m in METHODS if args.only is None or m[0] in args.only.split(",")]
    ensure_calibration(model_path, sorted({p.get("calibration", "1%") for _, method, p in methods
                                           if method == "kvquant"}))
    results: dict[str, dict] = {}
    with ProcessPoolExecutor(args.workers, initializer=_init_worker,
                             initargs=(model_path, args.tokens)) as pool:
        futures = {pool.submit(_evaluate, label, method, params, args.prefill_tokens): label
                   for label, method, params in methods}
        for future in as_completed(futures):
            try:
                data = future.result()
            except Exception as error:  # noqa: BLE001 - one method's failure is reported, not fatal
                print(f"{futures[future]}: FAILED {error!r}", flush=True)
                continue
            results[data["label"]] = data
            print(f"{data['label']:<22} ppl {data['ppl']:9.4f}  bits {data['bits_per_element']:.3f}"
                  f"  ({data['seconds']:.0f} s)", flush=True)
    report = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (dequantized, float32 compute)",
        "text": "wikitext-2-raw/wiki.test.raw",
        "calibration_text": "wikitext-2/valid.txt (4096 tokens, 512-token windows; per-layer "
                            "sensitivities on its first 512 tokens)",
        "calibration_artifacts": {name: {"file": file, "flags": " ".join(flags)}
                                  for name, (file, flags) in CALIBRATIONS.items()},
        "tokens": args.tokens,
        "prefill_tokens": args.prefill_tokens,
        "protocol": "no BOS; prefill then teacher-forced decode through the cache; tokens 1..N-1 "
                    "scored; KV stored in float16 (kvpack codecs)",
        "machine": f"{platform.node()} CPU ({os.cpu_count()} cores, {platform.machine()}), "
                   "shared dev box, no GPU",
        "torch_threads_per_worker": 1,
        "wall_seconds": round(time.time() - started, 1),
        "results": [results[label] for label, _, _ in methods if label in results],
    }
    if args.merge and OUT.exists():
        previous = {row["label"]: row for row in json.loads(OUT.read_text())["results"]}
        previous.update(results)
        report["results"] = [previous[label] for label, _, _ in METHODS if label in previous]
        report["wall_seconds"] = None  # rows come from more than one run
        if args.note:
            report["note"] = args.note
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}", flush=True)
    sys.path.insert(0, str(REPO / "bench" / "report"))
    import build_report

    return build_report.main([])


if __name__ == "__main__":
    sys.exit(main())

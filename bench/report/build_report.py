"""Build the benchmark report from every JSON under bench/results/: PNG plots and README tables.

    python bench/report/build_report.py

Reads whatever exists and skips what does not:
- kernel benchmarks (a `timings` list with `op`, `tokens`, `ms`, `bytes`, and a `roofline`):
  latency vs context length per op, with the copy-bandwidth roofline of bf16 keys;
- inference decode benchmarks (`results[context][method]` with `decode_tokens_per_second`,
  `peak_memory_gib`): memory and decode speed vs context;
- fidelity (`fidelity_*.json`): perplexity vs bits per number, and the targets met or not.
Plots go to bench/results/plots/; tables replace the text between the report markers of
bench/README.md (appended once if the markers are missing; nothing else in the file is touched).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parents[1]
RESULTS = BENCH / "results"
PLOTS = RESULTS / "plots"
README = BENCH / "README.md"
BEGIN = "<!-- kvpack-report:begin (bench/report/build_report.py writes this part) -->"
END = "<!-- kvpack-report:end -->"

# (bits per number, allowed perplexity increase) from issue 7.
TARGETS = [(4.3, 0.005), (3.3, 0.02), (2.3, 0.08)]
# "≈ b bits": at most this much above b.
BITS_SLACK = 0.25
KVPACK_COMPRESSED = ("kivi", "qjl", "kvquant")


def load_results(folder: Path) -> dict[str, dict]:
    found = {}
    for path in sorted(folder.glob("*.json")):
        try:
            found[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            print(f"skipping {path.name}: {error}", file=sys.stderr)
    return found


def is_kernels(data: dict) -> bool:
    return isinstance(data.get("timings"), list) and "roofline" in data


def is_decode(data: dict) -> bool:
    results = data.get("results")
    return isinstance(results, dict) and any(
        isinstance(row, dict) and any(isinstance(v, dict) and "decode_tokens_per_second" in v
                                      for v in row.values()) for row in results.values())


def is_fidelity(name: str, data: dict) -> bool:
    return name.startswith("fidelity") and isinstance(data.get("results"), list)


# -- fidelity ------------------------------------------------------------------------------------


def fp16_of(results: list[dict]) -> dict | None:
    return next((r for r in results if r["method"] == "fp16"), None)


def increase(result: dict, fp16: dict) -> float:
    return result["ppl"] / fp16["ppl"] - 1.0


def target_verdicts(results: list[dict]) -> list[str]:
    """One line per target: met / not met, with the number that decides it."""
    fp16 = fp16_of(results)
    if fp16 is None:
        return ["no fp16 result: targets cannot be judged"]
    ours = [r for r in results if r["method"] in KVPACK_COMPRESSED]
    lines = []
    for bits, allowed in TARGETS:
        eligible = [r for r in ours if r["bits_per_element"] <= bits + BITS_SLACK]
        if not eligible:
            lines.append(f"≤ +{allowed:.1%} ppl at ≈{bits} bits: **not met** — no kvpack method "
                         f"at ≤ {bits + BITS_SLACK:.2f} bits was measured")
            continue
        best = min(eligible, key=lambda r: r["ppl"])
        verdict = "met" if increase(best, fp16) <= allowed else "not met"
        lines.append(f"≤ +{allowed:.1%} ppl at ≈{bits} bits: **{verdict}** — best at ≤ "
                     f"{bits + BITS_SLACK:.2f} bits is {best['label']} with "
                     f"{best['bits_per_element']:.2f} bits, ppl {best['ppl']:.3f} "
                     f"({increase(best, fp16):+.2%})")
    for kivi in (r for r in results if r["method"] == "kivi"):
        rivals = [r for r in ours if r["method"] != "kivi"
                  and r["bits_per_element"] <= kivi["bits_per_element"]]
        if not rivals:
            lines.append(f"better than {kivi['label']} at equal or fewer bits: **not met** — no "
                         f"QJL/KVQuant result at ≤ {kivi['bits_per_element']:.2f} bits")
            continue
        best = min(rivals, key=lambda r: r["ppl"])
        verdict = "met" if best["ppl"] < kivi["ppl"] else "not met"
        lines.append(f"better than {kivi['label']} ({kivi['bits_per_element']:.2f} bits, ppl "
                     f"{kivi['ppl']:.3f}) at equal or fewer bits: **{verdict}** — best is "
                     f"{best['label']}, {best['bits_per_element']:.2f} bits, ppl {best['ppl']:.3f}")
    return lines


def fidelity_table(name: str, data: dict) -> list[str]:
    results = data["results"]
    fp16 = fp16_of(results)
    lines = [f"### Fidelity: `results/{name}.json`", "",
             f"{data.get('model', '?')}; first {data.get('tokens', '?')} tokens of "
             f"`{data.get('text', '?')}`, {data.get('prefill_tokens', '?')}-token prefill; "
             f"{data.get('protocol', '')}. "
             f"Machine: {data.get('machine', '?')}. Reproduce: `python bench/eval/fidelity.py`.",
             "", "| method | parameters | bits / number | perplexity | vs fp16 | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "—"
        delta = f"{increase(r, fp16):+.2%}" if fp16 else "—"
        lines.append(f"| {r['label']} | {params} | {r['bits_per_element']:.3f} | {r['ppl']:.3f} "
                     f"| {delta} | {r['seconds']:.0f} |")
    lines += ["", "Targets (kvpack's own methods: KIVI, QJL, KVQuant):", ""]
    lines += [f"- {line}" for line in target_verdicts(results)]
    return lines + [""]


def plot_fidelity(name: str, data: dict) -> Path:
    results = data["results"]
    fp16 = fp16_of(results)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {"fp16": "black", "kivi": "tab:blue", "qjl": "tab:orange", "kvquant": "tab:green",
              "hf-quanto": "tab:red"}
    for method, color in colors.items():
        points = [r for r in results if r["method"] == method]
        if not points:
            continue
        ax.scatter([r["bits_per_element"] for r in points], [r["ppl"] for r in points], s=50,
                   color=color, label=method, zorder=3)
        for r in points:
            ax.annotate(r["label"], (r["bits_per_element"], r["ppl"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    if fp16:
        ax.axhline(fp16["ppl"], color="black", linestyle=":", linewidth=1, label="fp16 ppl")
        for bits, allowed in TARGETS:
            ax.plot([bits], [fp16["ppl"] * (1 + allowed)], marker="v", color="purple",
                    linestyle="none", markersize=9)
        ax.plot([], [], marker="v", color="purple", linestyle="none", label="target (ppl ≤ here)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per number (every stored byte, K and V)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"Perplexity vs bits per number — {data.get('model', name)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = PLOTS / f"ppl_vs_bits_{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- kernels -------------------------------------------------------------------------------------


def best_ms(row: dict) -> float:
    graph = row.get("graph_ms")
    return min(row["ms"], graph) if graph else row["ms"]


def plot_latency(name: str, data: dict) -> Path:
    rows = data["timings"]
    bandwidth = data["roofline"]["GB_per_s"] * 1e9
    fig, ax = plt.subplots(figsize=(9, 6))
    for op in sorted({r["op"] for r in rows}):
        points = sorted((r["tokens"], best_ms(r)) for r in rows if r["op"] == op)
        (line,) = ax.plot([t for t, _ in points], [ms for _, ms in points], marker="o", label=op)
        floor = sorted((r["tokens"], r["bytes"]) for r in rows if r["op"] == op and r.get("bytes"))
        if "score" in op and floor:
            # this op's own byte floor: what a bandwidth-bound kernel over its bytes would take
            ax.plot([t for t, _ in floor], [b / bandwidth * 1e3 for _, b in floor], linestyle=":",
                    color=line.get_color(), linewidth=1.2, label=f"roofline of {op.split(' (')[0]}")
    keys = sorted((r["tokens"], r["bytes"]) for r in rows
                  if r["op"].startswith("bf16 q·Kᵀ") and r.get("bytes"))
    if keys:
        ax.plot([t for t, _ in keys], [b / bandwidth * 1e3 for _, b in keys], color="black",
                linestyle="--", linewidth=2,
                label=f"roofline: bf16 K bytes / {bandwidth / 1e12:.2f} TB/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms (one decode step of attention; quantize: the whole context)")
    ax.set_title(f"Attention kernels vs context — {data.get('device', '?')} ({name})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    path = PLOTS / f"latency_vs_context_{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def kernels_table(name: str, data: dict) -> list[str]:
    rows = data["timings"]
    contexts = sorted({r["tokens"] for r in rows})
    lines = [f"### Kernel latency: `results/{name}.json` ({data.get('device', '?')})", "",
             "ms per decode step (best of eager and CUDA graph); roofline = bytes / "
             f"{data['roofline']['GB_per_s']:.0f} GB/s copy bandwidth.", "",
             "| op | " + " | ".join(f"{t:,}" for t in contexts) + " |",
             "| --- |" + " ---: |" * len(contexts)]
    for op in sorted({r["op"] for r in rows}):
        cells = []
        for tokens in contexts:
            match = [r for r in rows if r["op"] == op and r["tokens"] == tokens]
            cells.append(f"{best_ms(match[0]):.3f}" if match else "—")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return lines + [""]


# -- inference decode ----------------------------------------------------------------------------


def decode_table(name: str, data: dict) -> list[str]:
    results = data["results"]
    methods = sorted({m for row in results.values() for m in row})
    lines = [f"### End-to-end decode: `results/{name}.json` ({data.get('device', '?')}, "
             f"{data.get('model', '?')})", "", "decode tokens/s / peak GiB", "",
             "| context | " + " | ".join(methods) + " |", "| ---: |" + " ---: |" * len(methods)]
    for context in sorted(results, key=int):
        cells = []
        for method in methods:
            r = results[context].get(method)
            if r is None:
                cells.append("—")
            elif "error" in r:
                cells.append("OOM" if "memory" in r["error"] else "error")
            else:
                cells.append(f"{r['decode_tokens_per_second']:.1f} / {r['peak_memory_gib']:.1f}")
        lines.append(f"| {int(context):,} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_memory(decodes: dict[str, dict], fidelity: dict[str, dict]) -> Path | None:
    """Peak memory vs context from decode benchmarks, and the KV cache size implied by the
    measured bits per number for a Llama-3-8B-shaped cache (32 layers, 8 KV heads, head_dim 128)."""
    if not decodes and not fidelity:
        return None
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, data in decodes.items():
        results = data["results"]
        methods = sorted({m for row in results.values() for m in row})
        for method in methods:
            points = sorted((int(c), row[method]["peak_memory_gib"]) for c, row in results.items()
                            if method in row and "peak_memory_gib" in row[method])
            if points:
                ax.plot([c for c, _ in points], [g for _, g in points], marker="o",
                        label=f"{method}: peak GPU memory ({name})")
    contexts = [2**k for k in range(12, 20)]
    elements_per_token = 2 * 32 * 8 * 128
    for data in fidelity.values():
        for r in data["results"]:
            if r["method"] == "hf-quanto":
                continue
            gib = [r["bits_per_element"] / 8 * elements_per_token * t / 2**30 for t in contexts]
            ax.plot(contexts, gib, linestyle="--", linewidth=1,
                    label=f"{r['label']}: KV bytes at {r['bits_per_element']:.2f} b/num")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("GiB")
    ax.set_title("Memory vs context (dashed: KV cache of a Llama-3-8B shape at measured bits)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    path = PLOTS / "memory_vs_context.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- README --------------------------------------------------------------------------------------


def replace_section(readme: str, body: str) -> str:
    section = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if BEGIN in readme and END in readme:
        head, rest = readme.split(BEGIN, 1)
        return head + section + rest.split(END, 1)[1]
    return readme.rstrip() + "\n\n## Report (`report/build_report.py`)\n\n" + section + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    global PLOTS
    PLOTS = args.results / "plots"
    PLOTS.mkdir(parents=True, exist_ok=True)
    found = load_results(args.results)
    kernels = {n: d for n, d in found.items() if is_kernels(d)}
    decodes = {n: d for n, d in found.items() if is_decode(d)}
    fidelity = {n: d for n, d in found.items() if is_fidelity(n, d)}
    plots: list[Path] = []
    body: list[str] = ["Generated from every JSON under `results/`; plots in `results/plots/`.", ""]
    for name, data in fidelity.items():
        body += fidelity_table(name, data)
        plots.append(plot_fidelity(name, data))
    for name, data in decodes.items():
        body += decode_table(name, data)
    for name, data in kernels.items():
        body += kernels_table(name, data)
        plots.append(plot_latency(name, data))
    memory = plot_memory(decodes, fidelity)
    if memory:
        plots.append(memory)
    body += ["Plots:", ""]
    base = args.readme.parent.resolve()
    body += [f"- `{p.resolve().relative_to(base) if p.resolve().is_relative_to(base) else p}`"
             for p in plots]
    others = sorted(set(found) - set(kernels) - set(decodes) - set(fidelity))
    if others:
        body += ["", "Other results (tables in their own sections): "
                 + ", ".join(f"`{n}.json`" for n in others)]
    if any(math.isnan(r.get("ppl", 0.0)) for d in fidelity.values() for r in d["results"]):
        body += ["", "**Warning:** some perplexities are NaN."]
    readme = args.readme.read_text() if args.readme.exists() else "# Benchmarks\n"
    args.readme.write_text(replace_section(readme, "\n".join(body)))
    for path in plots:
        print(f"wrote {path}")
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

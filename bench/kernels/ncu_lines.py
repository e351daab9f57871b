"""Per-source-line summary of an Nsight Compute source page (profile_ncu.sh writes it as
NAME.both.csv: `ncu -i R --page source --csv --print-source cuda,sass`): warp-stall samples,
executed warp instructions and the top stall reasons of each line, busiest lines first.

    python bench/kernels/ncu_lines.py qjl_quantize.both.csv [--top 40]
"""

from __future__ import annotations

import argparse
import csv


def lines(path: str) -> list[dict]:
    rows, file, header = [], None, None
    with open(path, newline="") as handle:
        for row in csv.reader(handle):
            if not row:
                continue
            if row[0] == "File Path":
                file = row[1].rsplit("/", 1)[-1]
            elif row[0] == "Line No":
                header = row
            elif header and row[0].isdigit():  # a source line (its SASS rows follow, unnumbered)
                numbers = [int(v) if v.isdigit() else 0 for v in row]
                stalls = {name[6:]: n for name, n in zip(header, numbers, strict=False)
                          if name.startswith("stall_") and "(Not" not in name and n}
                rows.append({"where": f"{file}:{row[0]}", "source": row[1].strip()[:90],
                             "samples": numbers[4], "instructions": numbers[7],
                             "stalls": stalls})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    rows = lines(args.csv)
    samples = sum(r["samples"] for r in rows) or 1
    instructions = sum(r["instructions"] for r in rows) or 1
    print(f"{samples} stall samples, {instructions} warp instructions; "
          "columns: % samples, % instructions, line, top stall reasons")
    for r in sorted(rows, key=lambda r: -r["samples"])[: args.top]:
        top = sorted(r["stalls"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{100 * r['samples'] / samples:5.1f}% {100 * r['instructions'] / instructions:5.1f}%"
              f" {r['where']} {r['source']} | " + " ".join(f"{k}={v}" for k, v in top))


if __name__ == "__main__":
    main()

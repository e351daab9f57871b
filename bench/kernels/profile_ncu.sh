#!/usr/bin/env bash
# Nsight Compute profiles of the kernels named in profile_ncu.py, on a GPU machine (Firecracker
# runtime: ncu reads counters there; see the device notes). Writes, per kernel, the report and
# its details page, its source page (SASS by source line, with stall samples) and a per-line
# summary (ncu_lines.py) as text into $1; bring back a tar of them (the device returns few files).
#   bash bench/kernels/profile_ncu.sh OUTDIR [TOKENS] [KERNELS...]
set -uo pipefail
out=$1; tokens=${2:-131072}; shift 2 || shift $#
here=$(cd "$(dirname "$0")" && pwd)
declare -A regex=([qjl_quantize]=_quantize_keys_kernel [qjl_score]="^_key_scores_kernel"
                  [kvquant_score]=_kvquant_key_scores_v3_kernel)
kernels=("$@"); [ ${#kernels[@]} -gt 0 ] || kernels=(qjl_quantize kvquant_score)
mkdir -p "$out"
for name in "${kernels[@]}"; do
  ncu --clock-control none -k "regex:${regex[$name]}" --launch-skip 3 --launch-count 1 \
      --set full --import-source yes -f -o "$out/$name" \
      python3 "$here/profile_ncu.py" "$name" --tokens "$tokens" > "$out/$name.log" 2>&1
  ncu -i "$out/$name.ncu-rep" --page details > "$out/$name.details.txt" 2>&1
  ncu -i "$out/$name.ncu-rep" --page source --csv --print-source cuda,sass > "$out/$name.both.csv" 2>&1
  python3 "$here/ncu_lines.py" "$out/$name.both.csv" --top 25 > "$out/$name.lines.txt"
done

#!/usr/bin/env bash
# The pending GPU measurements in one device call (device time is scarce: one start, one call):
#   run(command=". bench/device_env.sh; bash bench/device_batch.sh", carry=[".whl", ".redisbin"])
# after `bash scripts/prepare-device.sh` here. Each benchmark has its own time limit, so one that
# hangs cannot take the others' time; results land in $OUT as JSON plus a log each. Every script
# runs from /tmp: the checkout's ./kvpack would shadow the kvpack installed from it.
#   1. kvstore on the host's 16 cores: the many-core range defaults vs one call and n ranges
#      (first: its Get target is the nearest to met)
#   2. KVQuant run 9: version 3 with the outlier-line prefetch on by default, A/B against off;
#      2-bit codes through version 3 (correctness case 2 checks it on the GPU, then timed);
#      masked query-operand rows
#   3. QJL quantize sweep: outlier channels by rank counts, dense outlier dots, narrow planes
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:?set by the device tool}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "$gpu, $(nproc) cores"
# Result names carry the card: a call may land on an H200 when no H100 starts.
case "$gpu" in *H200*) card=h200 ;; *) card=h100 ;; esac
(cd /tmp && timeout 150 python3 "$repo/bench/kvstore/bench_store.py" --machine "$gpu host ($(nproc) cores)" \
    --repeats 20 --sizes 1MiB,4MiB,16MiB --put-ranges 2,4,8 --get-ranges 2,4,8 \
    --out "$out/kvstore_throughput_${card}_host_run5.json" > "$out/kvstore.log" 2>&1)
tail -16 "$out/kvstore.log" | cut -c1-400
(cd /tmp && timeout 240 python3 "$repo/bench/kernels/bench_kvquant.py" --tokens 131072,524288 \
    --correctness-cases 2 --out "$out/kvquant_${card}_run9.json" > "$out/kvquant.log" 2>&1)
grep -E "bf16 q|KVQuant-[23] score|ablation|Error" "$out/kvquant.log" | cut -c1-150
(cd /tmp && timeout 170 python3 "$repo/bench/kernels/bench_kernels.py" --only-qjl \
    --skip-correctness --tokens 131072,524288 --out "$out/kernels_${card}_qjl_run3.json" \
    > "$out/qjl.log" 2>&1)
grep -E "sweep quantize|QJL quantize|QJL score \(|Error" "$out/qjl.log" | cut -c1-260

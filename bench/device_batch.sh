#!/usr/bin/env bash
# The pending GPU measurements in one device call (device time is scarce: one start, one call):
#   run(command=". bench/device_env.sh; bash bench/device_batch.sh", carry=[".whl", ".redisbin"])
# after `bash scripts/prepare-device.sh` here. Each benchmark has its own time limit, so one that
# hangs cannot take the others' time; results land in $OUT as JSON plus a log each.
#   1. KVQuant run 8: version 3's pipelined head loop and outlier-line prefetch vs the defaults
#   2. QJL: the quantize sweep (32-token tiles, register caps, warp-local selection) and timings
#   3. kvstore on the host's 16 cores: ranged Put and Get vs one call and raw redis-py
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:?set by the device tool}
nvidia-smi --query-gpu=name --format=csv,noheader
(cd /tmp && timeout 200 python3 "$repo/bench/kernels/bench_kvquant.py" --tokens 131072,524288 \
    --correctness-cases 1 --out "$out/kvquant_h100_run8.json" > "$out/kvquant.log" 2>&1)
grep -E "bf16 q|KVQuant-3 score|ablation|Error" "$out/kvquant.log" | cut -c1-150
(cd /tmp && timeout 160 python3 "$repo/bench/kernels/bench_kernels.py" --only-qjl \
    --skip-correctness --tokens 131072,524288 --out "$out/kernels_h100_qjl_run2.json" \
    > "$out/qjl.log" 2>&1)
grep -E "sweep quantize|QJL quantize|QJL score \(|Error" "$out/qjl.log" | cut -c1-200
(cd "$repo" && timeout 200 python3 bench/kvstore/bench_store.py --machine "H100 host (16 cores)" \
    --repeats 20 --sizes 4MiB,16MiB --put-ranges 2,4 --get-ranges 2,4 \
    --out "$out/kvstore_throughput_h100_host_run4.json" > "$out/kvstore.log" 2>&1)
tail -8 "$out/kvstore.log" | cut -c1-400

#!/usr/bin/env bash
# One GPU call for the inference benchmarks: installs the carried wheels and kvpack from the tree
# (bench/device_env.sh), then runs the named steps, each under its own time limit, writing JSON
# and logs to $OUT. Run from the repository root on the device with carry [".whl", ".redisbin"]:
#   bash bench/inference/device_run.sh decode:240 long:120 ttft:150
# Steps: decode (bench_decode.py --sweep --profile), decode-graphs (the same, --no-eager), long (bench_long_context.py),
# ttft (bench_prefix_ttft.py, random Llama-3-8B shape, Redis; KVSTORE_STREAMS=N / LOAD_THREADS=L set
# the inference server's GetMany connections and block-loading threads, else the fastest pair of an
# earlier fetch step, else the defaults), fetch (bench/kvstore/bench_prefix_fetch.py: a stored
# 32K-token prefix fetched and loaded into a cache on the GPU, no model; streams x load threads).
# NAME:SECONDS sets the limit.
set -u
R=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
. bench/device_env.sh || { echo "device_env.sh failed"; exit 1; }
export PYTHONUNBUFFERED=1
cd /tmp
python3 -c 'import kvpack.inference.decode_graph' || { echo "installed kvpack is stale"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for spec in "$@"; do
  name=${spec%%:*}
  limit=${spec#*:}
  [ "$limit" = "$spec" ] && limit=300
  echo "=== $name (limit ${limit}s) ==="
  case $name in
    decode) cmd=(python3 "$R/bench/inference/bench_decode.py" --sweep --profile
                 --out "$OUT/inference_decode_h100.json") ;;
    decode-graphs) cmd=(python3 "$R/bench/inference/bench_decode.py" --sweep --profile --no-eager
                        --out "$OUT/inference_decode_h100.json") ;;
    decode-quick) cmd=(python3 "$R/bench/inference/bench_decode.py" --no-eager
                       --out "$OUT/inference_decode_h100.json") ;;
    long) cmd=(python3 "$R/bench/inference/bench_long_context.py"
               --out "$OUT/inference_long_context_h100.json") ;;
    ttft) if [ -z "${KVSTORE_STREAMS:-}${LOAD_THREADS:-}" ] && [ -f "$OUT/prefix_fetch_h100.json" ]; then
            # the streams x load threads that loaded the prefix fastest in this call's fetch step
            best=$(python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))["results"]
print(min((v["total_seconds"], k.split()[-1]) for k, v in r.items() if k.startswith("load_prefix"))[1])' "$OUT/prefix_fetch_h100.json") \
              && KVSTORE_STREAMS=${best%x*} && LOAD_THREADS=${best#*x} \
              && echo "ttft: $KVSTORE_STREAMS kvstore streams, $LOAD_THREADS load threads (fastest in the fetch step)"
          fi
          cmd=(python3 "$R/bench/inference/bench_prefix_ttft.py" --random-llama3-8b --redis
               --device cuda --prefix-tokens 32768 --methods kivi --repeats 2
               ${KVSTORE_STREAMS:+--kvstore-streams "$KVSTORE_STREAMS"}
               ${LOAD_THREADS:+--load-threads "$LOAD_THREADS"}
               --out "$OUT/inference_prefix_ttft_h100.json") ;;
    fetch) cmd=(python3 "$R/bench/kvstore/bench_prefix_fetch.py" --device cuda --streams 1,2,4
                --load-threads 1,2,4
                --machine "H100 host (GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
                --out "$OUT/prefix_fetch_h100.json") ;;
    *) echo "unknown step $name"; continue ;;
  esac
  timeout "$limit" "${cmd[@]}" 2>&1 | tee "$OUT/$name.log" | grep -v "^\s*$" | tail -60
done

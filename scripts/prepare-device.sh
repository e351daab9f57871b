#!/usr/bin/env bash
# Stage what a GPU benchmark machine without network needs, in ignored folders carried to it:
#   .whl/       wheels for Python 3.12 x86_64 (grpc, redis-py, ...), no torch/triton, no kvpack
#   .redisbin/  this machine's redis-server and redis-cli with their shared libraries
# On the machine: `source bench/device_env.sh` installs the wheels and puts redis on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
mkdir -p .whl .redisbin
rm -f .whl/kvpack-*.whl  # kvpack is built on the machine from the tree (bench/device_env.sh)

platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
for package in grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 \
               redis==8.1.0 hiredis==3.5.0 xxhash==4.1.0 prometheus-client==0.26.0 gguf==0.19.0; do
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$package"
done
cp /usr/bin/redis-server /usr/bin/redis-cli .redisbin/
for lib in $(ldd /usr/bin/redis-server | awk '/=>/ {print $3}'); do
  case "$(basename "$lib")" in libc.so.*|libm.so.*|libstdc++.so.*|libgcc_s.so.*) ;; *) cp -L "$lib" .redisbin/ ;; esac
done
du -sh .whl .redisbin

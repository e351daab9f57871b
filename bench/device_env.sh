# Sourced on a GPU benchmark machine (see scripts/prepare-device.sh); carry .whl and .redisbin.
# Dependencies come from the carried wheels; kvpack itself is built from the working tree that
# travelled with the call, so a benchmark always runs the code being measured (no stale wheel).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl | grep -v '/kvpack-') || return 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
  --upgrade --target /tmp/site . || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=$PWD/.redisbin:$PATH
export LD_LIBRARY_PATH=$PWD/.redisbin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

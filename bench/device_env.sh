# Sourced on a GPU benchmark machine (see scripts/prepare-device.sh); carry .whl and .redisbin.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=$PWD/.redisbin:$PATH
export LD_LIBRARY_PATH=$PWD/.redisbin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

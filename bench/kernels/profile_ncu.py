"""Run one kernel of the Llama-3-8B layer shape a few times, for Nsight Compute to profile.

    ncu --clock-control none -k regex:_quantize_keys_kernel --launch-skip 3 --launch-count 1 \
        --set full --import-source yes -o $OUT/qjl_quantize \
        python3 bench/kernels/profile_ncu.py qjl_quantize --tokens 131072

Kernels: qjl_quantize (QJL's fused quantize), qjl_score (QJL score), kvquant_score (KVQuant-3
score, version 3 with the launcher's defaults). Random inputs; ncu reads where the time goes
(stall reasons per source line), not how fast it is: timings come from bench_kernels.py and
bench_kvquant.py.
"""

from __future__ import annotations

import argparse
import sys

import bench_kernels as base  # same folder; sets up kvpack.kernels on a machine without install
import torch

sys.path.insert(0, str(base.REPO / "tests"))
from support.kvquant import random_calibration  # noqa: E402

RUNS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", choices=("qjl_quantize", "qjl_score", "kvquant_score"))
    parser.add_argument("--tokens", type=int, default=131072)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    shape = (1, base.KV_HEADS, args.tokens, base.HEAD_DIM)
    k = torch.randn(*shape, device=device, dtype=torch.bfloat16)
    q = torch.randn(1, base.QUERY_HEADS, 1, base.HEAD_DIM, device=device, dtype=torch.bfloat16)
    if args.kernel.startswith("qjl"):
        codec = base.kernels.make_codec("qjl", head_dim=base.HEAD_DIM, **base.QJL_PARAMS)
    else:
        calibration = random_calibration(num_layers=1, num_kv_heads=base.KV_HEADS,
                                         head_dim=base.HEAD_DIM, uniform_codebooks=True)
        codec = base.kernels.make_codec("kvquant", head_dim=base.HEAD_DIM, layer=0,
                                        calibration=calibration, bits=3, outliers=0.01)
    keys = codec.encode_keys(k)
    for _ in range(RUNS):
        if args.kernel == "qjl_quantize":
            codec.encode_keys(k)
        else:
            codec.key_scores(q, keys)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""QJL sketch matrices, seeded and reproducible (research/qjl.md §1, §2.1).

- Inlier sketch S [m, d]: Gaussian blocks of d x d orthogonalized by QR (Haar-distributed: the
  columns of Q are multiplied by the signs of diag(R)), rows rescaled to norm sqrt(d) so that the
  estimator constant sqrt(pi/2)/m applies (orthonormal rows would be off by sqrt(d)).
- Outlier sketch S_o [m_o, d]: i.i.d. N(0, 1). The outlier channels change from group to group and
  the outlier estimator uses the columns S_o[:, O] of the group's channels O; restricted columns of
  an i.i.d. Gaussian matrix are again i.i.d. Gaussian, which keeps that estimator exactly unbiased
  (restrictions of orthogonalized rows are neither orthogonal nor Gaussian).

Both come from one CPU torch.Generator seeded with `seed`, in float64, then rounded to float32.
Keys of a 16-bit dtype are sketched with these matrices rounded to that dtype (tensor-core
operands), and queries are sketched with the same rounded matrices, so both sides of the
estimator always use one matrix. `digest` hashes the float32 matrices: it goes into the codec
fingerprint, so a platform whose generator or QR gave other numbers can never mix blocks with ours.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch


def orthogonal_gaussian(head_dim: int, num_rows: int, generator: torch.Generator) -> torch.Tensor:
    """[num_rows, head_dim] float64: blocks of head_dim orthogonal rows of norm sqrt(head_dim)."""
    blocks = []
    for _ in range(math.ceil(num_rows / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))
        blocks.append(q.T)
    return torch.cat(blocks)[:num_rows] * math.sqrt(head_dim)


@dataclass(frozen=True)
class Sketches:
    inlier: torch.Tensor  # [sketch_dim, head_dim] float32
    outlier: torch.Tensor  # [outlier_sketch_dim, head_dim] float32 (0 rows without outliers)
    digest: str


def make_sketches(head_dim: int, sketch_dim: int, outlier_sketch_dim: int, seed: int) -> Sketches:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    inlier = orthogonal_gaussian(head_dim, sketch_dim, generator).float()
    outlier = torch.randn(
        outlier_sketch_dim, head_dim, generator=generator, dtype=torch.float64
    ).float()
    digest = hashlib.blake2b(
        inlier.numpy().tobytes() + outlier.numpy().tobytes(), digest_size=8
    ).hexdigest()
    return Sketches(inlier, outlier, digest)


def rounded(matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sketch as keys of `dtype` see it: rounded to dtype, held in float32."""
    return matrix.to(dtype).float()

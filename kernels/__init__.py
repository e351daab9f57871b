"""kvpack.kernels: KV-cache codecs (fp16, kivi, qjl, kvquant) with Triton kernels.

`make_codec(name, head_dim=..., **params)` is the entry point; see kernels/codec.py for the
interface and kernels/cache.py for the packed container.
"""

from __future__ import annotations

import importlib

from . import fp16, kivi, qjl  # noqa: F401  (importing registers the codecs)
from .codec import CODECS, KVCodec, make_codec, register_codec, should_use_triton

# kvquant lives in its own module(s), written separately; a missing or broken one must not take
# the other codecs down with it.
try:
    importlib.import_module(f"{__name__}.kvquant")
except ModuleNotFoundError as error:
    if error.name != f"{__name__}.kvquant":
        raise

__all__ = ["CODECS", "KVCodec", "make_codec", "register_codec", "should_use_triton"]

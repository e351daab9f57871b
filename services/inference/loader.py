"""Load a Llama-family model and its tokenizer: HF hub id, local HF folder, GGUF file, or llama2.c.

    loaded = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu", dtype="float32")
    loaded = load_model("/models", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    loaded = load_model("/data/stories260K")   # folder with a llama2.c .bin and its tok*.bin

The engine runs its own attention over the model's weights, so only architectures whose layers it
understands are accepted (Llama, Mistral, Qwen2, SmolLM2 = Llama, all with GQA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: Any  # a transformers *ForCausalLM in eval mode
    tokenizer: Any  # encode(text) -> ids, decode(ids) -> str, eos_token_id
    model_id: str  # stable name used in the kvstore namespace
    device: torch.device
    dtype: torch.dtype


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _find_llama2c(path: Path) -> tuple[Path, Path] | None:
    """(checkpoint, tokenizer) when `path` is a llama2.c folder or checkpoint, else None."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        if (path / "config.json").exists():
            return None
        checkpoints = sorted(p for p in path.glob("*.bin") if not p.name.startswith("tok"))
        if len(checkpoints) != 1:
            return None
        checkpoint = checkpoints[0]
    elif path.suffix == ".bin":
        checkpoint = path
    else:
        return None
    tokenizers = sorted(folder.glob("tok*.bin"))
    if not tokenizers:
        raise ValueError(
            f"model {path}: llama2.c checkpoint without a tok*.bin tokenizer beside it"
        )
    return checkpoint, tokenizers[0]


class HFTokenizer:
    """A transformers tokenizer with the small interface the engine uses."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def check_architecture(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model architecture {model_type!r} "
            f"({', '.join(getattr(config, 'architectures', None) or [])}); "
            f"kvpack serves {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )


def load_model(
    model: str,
    *,
    gguf_file: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> LoadedModel:
    """Load `model` (hub id, local folder, or llama2.c checkpoint) onto `device`.

    Raises:
        ValueError: unsupported architecture, bad dtype/device, or no model at that path.
    """
    torch_dtype = parse_dtype(dtype)
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    target = torch.device(device)
    path = Path(model)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
        model = str(path)
    llama2c = _find_llama2c(path) if path.exists() and gguf_file is None else None
    if llama2c is not None:
        from kvpack.inference.llama2c import Llama2cTokenizer, load_llama2c_model

        checkpoint, tokenizer_path = llama2c
        hf_model = load_llama2c_model(checkpoint, dtype=torch_dtype)
        tokenizer: Any = Llama2cTokenizer(tokenizer_path)
        model_id = f"llama2c:{checkpoint.stem}"
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        config = AutoConfig.from_pretrained(model, **kwargs)
        check_architecture(config)
        # passing the parsed config spares a second read of a GGUF file's metadata
        hf_model = AutoModelForCausalLM.from_pretrained(
            model, config=config, dtype=torch_dtype, **kwargs
        )
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(model, **kwargs))
        model_id = gguf_file or (path.resolve().name if path.exists() else model)
    check_architecture(hf_model.config)
    hf_model = hf_model.to(target).eval()
    return LoadedModel(hf_model, tokenizer, model_id, target, torch_dtype)

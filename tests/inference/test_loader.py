"""Model loading: architecture checks and argument validation."""

from __future__ import annotations

import pytest
from kvpack.inference.loader import load_model
from transformers import GPT2Config, GPT2LMHeadModel


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="unsupported model architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_bad_dtype_and_device_name_the_argument(shared_data):
    path = str(shared_data / "models" / "stories260K")
    with pytest.raises(ValueError, match="dtype"):
        load_model(path, dtype="int8")
    with pytest.raises(ValueError, match="device"):
        load_model(path, device="tpu")


def test_llama2c_folder_loads_with_its_tokenizer(shared_data):
    loaded = load_model(str(shared_data / "models" / "stories260K"), dtype="bfloat16")
    assert loaded.model.config.model_type == "llama" and loaded.model_id == "llama2c:stories260K"
    assert next(loaded.model.parameters()).dtype.is_floating_point
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("Hello")) == "Hello"

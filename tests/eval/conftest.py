"""Models for the eval tests: stories260K (shared data), a tiny random Llama with head_dim 16 (the
smallest the compressed codecs take; stories260K has 8), and SmolLM2-135M where real language is
needed (a missing GGUF fails, never skips: `make test` fetches it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Decode steps are tiny ops: on a small shared CPU, BLAS threads fighting over cores make them
    # 10-20x slower. Restored after each test.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def stories(shared_data: Path):
    from kvpack.inference.loader import load_model

    return load_model(str(shared_data / "models" / "stories260K"))


@pytest.fixture(scope="session")
def tiny16(stories):
    from kvpack.inference.loader import LoadedModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, stories.tokenizer, "tiny16-seed0", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def smollm2():
    from kvpack.inference.loader import load_model

    from kvpack.models import smollm2_path

    path = smollm2_path()
    if not path.exists():
        pytest.fail(f"SmolLM2 GGUF not found at {path}: run `python -m kvpack.models`")
    return load_model(str(path))


@pytest.fixture(scope="session")
def wiki_tokens(shared_data: Path, smollm2) -> torch.Tensor:
    """The first 288 SmolLM2 tokens of wiki.test.raw."""
    text = (shared_data / "text" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:4000]
    return torch.tensor(smollm2.tokenizer.encode(text)[:288])


STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park with her friends. One day, she saw a big red ball under a tree. She ran to the ball "
         "and picked it up. Her mom said, \"Lily, be careful!\" Lily smiled and said, \"I will, "
         "Mom.\" Then they went home and had a nice dinner together.\n")


@pytest.fixture(scope="session")
def story_text() -> str:
    return STORY


@pytest.fixture(scope="session")
def story_tokens(stories) -> torch.Tensor:
    return torch.tensor(stories.tokenizer.encode(STORY)[:80])

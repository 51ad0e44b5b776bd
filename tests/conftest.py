"""Shared fixtures; helper functions live in tests/helpers.py."""

import pytest
import torch

from pg_pruning_plugin.resources.models import load_tokenizer
from tests.helpers import QUANT_TINY, QUANT_VOCAB, save_tiny, tiny_model, word_tokenizer


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tok():
    """The real SmolLM2 tokenizer (from the embedded GGUF, cached)."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def llmc_dir(tmp_path_factory):
    """A saved tiny Llama for group quantization (hidden 128) with a word-level tokenizer (oneshot needs a
    name_or_path)."""
    path = tmp_path_factory.mktemp("llmc") / "llama"
    save_tiny(path, word_tokenizer(QUANT_VOCAB), **QUANT_TINY)
    return path


@pytest.fixture(scope="session")
def llmc_deep_dir(tmp_path_factory):
    """The same tiny Llama with 4 decoder layers (room to delete whole layers)."""
    path = tmp_path_factory.mktemp("llmc") / "llama4"
    save_tiny(path, word_tokenizer(QUANT_VOCAB), **QUANT_TINY | {"num_hidden_layers": 4})
    return path


@pytest.fixture(scope="session")
def llmc_calib():
    """16 random sequences of 32 tokens: 4 search batches of 4; GPTQ sees all 16."""
    from datasets import Dataset

    ids = torch.randint(3, QUANT_VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

"""Shared fixtures; the tiny-model factories live in tests/tiny_models.py."""

import pytest

from tests.tiny_models import tiny_model


@pytest.fixture
def llama():
    return tiny_model("llama")

"""Fixtures for the sensitivity tests: tiny random-weight transformers models (fast)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sens_helpers import VOCAB, make_bert, make_gpt2, make_llama  # noqa: E402


@pytest.fixture
def llama():
    return make_llama(tie=False)


@pytest.fixture
def llama_tied():
    return make_llama(tie=True)


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture
def bert():
    return make_bert()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (6, 16), generator=g)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A tiny Llama directory (3 blocks, 16-bit safetensors) with an untied head (block streaming)."""
    from sens_helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("untied"), tie=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The same with the head tied to the embedding."""
    from sens_helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tied"), tie=True)

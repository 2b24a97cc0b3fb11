"""Shared, session-scoped models. The tiny models are random-weight and built in a second; SmolLM2-135M is the
real checkpoint (converted once from its GGUF and cached under KVLAB_CACHE_DIR or ~/.cache/kvlab)."""

from __future__ import annotations

import pytest

from kvlab.engine import Engine
from kvlab.models import load_model


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gemma3():
    return load_model("tiny-gemma3")


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def llama(tiny_llama):
    """An engine on the tiny Llama with small prefill chunks, so chunk boundaries are exercised."""
    return Engine(tiny_llama, chunk_tokens=64)


@pytest.fixture(scope="module")
def gemma(tiny_gemma3):
    """An engine on the tiny Gemma 3 (sliding and global layers) with small prefill chunks."""
    return Engine(tiny_gemma3, chunk_tokens=64)

"""Shared, session-scoped models. The tiny models are random-weight and built in a second; SmolLM2-135M is the
real checkpoint (converted once from its GGUF and cached under KVLAB_CACHE_DIR or ~/.cache/kvlab)."""

from __future__ import annotations

import pytest

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

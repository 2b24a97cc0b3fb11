"""Shared, session-scoped models. The tiny models are random-weight and built in a second; SmolLM2-135M is the
real checkpoint (converted once from its GGUF and cached under KVLAB_CACHE_DIR or ~/.cache/kvlab)."""

from __future__ import annotations

import pytest

from kvlab.engine import Engine
from kvlab.models import load_model
from kvlab.models.profile import PROFILE_DIR_ENV, save_profile


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


@pytest.fixture(scope="session", autouse=True)
def head_profiles(request, tmp_path_factory):
    """Policies that rank heads (duo) read head profiles from $KVLAB_PROFILE_DIR: the session points it at a
    temporary folder, never the user's, and measures the tiny models' profiles there (well under a second each)
    when a collected test uses a tiny model."""
    import torch

    from kvlab.engine.profile import copy_samples, measure_profile

    folder = tmp_path_factory.mktemp("profiles")
    used = set().union(*(getattr(item, "fixturenames", ()) for item in request.session.items))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PROFILE_DIR_ENV, str(folder))
        for name in ("tiny_llama", "tiny_gemma3"):
            if name in used:
                samples = copy_samples(torch.arange(3, 259), samples=2, length_tokens=128, needle_tokens=16)
                save_profile(measure_profile(request.getfixturevalue(name), samples))
        yield folder

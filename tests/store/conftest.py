"""Compressed caches of the tiny models, built once per session, and a helper to describe them."""

from dataclasses import dataclass

import pytest
import torch

from kvlab.engine import Engine, PrefillResult
from kvlab.policies import make_policy
from kvlab.store import meta_for

CONTEXT_TOKENS = 200


@dataclass
class Compressed:
    engine: Engine
    result: PrefillResult
    cache: object
    policy: object
    budget_tokens: int
    text: str

    def meta(self, cache=None, **extra):
        cache = self.cache if cache is None else cache
        return meta_for(self.engine.loaded, cache, text=self.text, policy=self.policy, ratio=0.5,
                        budget_tokens=self.budget_tokens, query_aware=False, context_tokens=CONTEXT_TOKENS,
                        extra=extra)


def compressed(loaded, policy_name: str, seed: int = 0) -> Compressed:
    engine = Engine(loaded, chunk_tokens=64)
    ids = torch.randint(3, 259, (CONTEXT_TOKENS,), generator=torch.Generator().manual_seed(seed))
    policy = make_policy(policy_name)
    result = engine.prefill(ids, policy.observation_request())
    cache, budget, _ = engine.compress(result, policy, ratio=0.5)
    return Compressed(engine, result, cache, policy, budget, text=f"document {seed}")


@pytest.fixture(scope="session")
def llama_snapkv(tiny_llama):
    return compressed(tiny_llama, "snapkv")


@pytest.fixture(scope="session")
def llama_adakv(tiny_llama):
    return compressed(tiny_llama, "adakv")


@pytest.fixture(scope="session")
def gemma_snapkv(tiny_gemma3):
    return compressed(tiny_gemma3, "snapkv")


@pytest.fixture(scope="session")
def llama_snapkv_other(tiny_llama):
    """Another document on the same model."""
    return compressed(tiny_llama, "snapkv", seed=1)

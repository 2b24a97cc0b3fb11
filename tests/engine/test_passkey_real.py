"""Pass-key retrieval with the real SmolLM2-135M-Instruct: compression that keeps the needle still finds it, and the
test can tell: a policy that provably drops the needle does not."""

import pytest

from kvlab.bench.haystack import build_haystack
from kvlab.engine import Engine
from kvlab.policies import make_policy

pytestmark = pytest.mark.real

NEEDLE = "The pass key is 68219. Remember it. 68219 is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
MAX_NEW = 12


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine(smollm2, chunk_tokens=512)


@pytest.fixture(scope="module")
def context(smollm2):
    count = lambda text: len(smollm2.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return build_haystack(count, 1400, seed=1, needle=NEEDLE, depth=0.5).text


def test_haystack_size(engine, context):
    tokens = engine.prompt(context, QUESTION).prefix_ids.numel()
    assert 1200 <= tokens <= 1600


def test_full_finds_the_pass_key(engine, context):
    answer = engine.ask(context, QUESTION, make_policy("full"), max_new_tokens=MAX_NEW)
    assert "68219" in answer.answer
    assert answer.kept_tokens == answer.context_tokens


def test_snapkv_query_aware_finds_the_pass_key(engine, context):
    answer = engine.ask(context, QUESTION, make_policy("snapkv"), ratio=0.5, query_aware=True,
                        max_new_tokens=MAX_NEW)
    assert "68219" in answer.answer
    assert abs(answer.kept_tokens - answer.context_tokens / 2) <= 2
    assert answer.kv_bytes_kept < 0.6 * answer.kv_bytes_full


def test_streaming_llm_loses_the_pass_key(engine, context):
    """At ratio 0.9 streaming_llm keeps the 4 sinks and the last ~10% of the document, far from the needle."""
    answer = engine.ask(context, QUESTION, make_policy("streaming_llm"), ratio=0.9, max_new_tokens=MAX_NEW)
    assert "68219" not in answer.answer
    assert answer.kept_tokens < 0.11 * answer.context_tokens

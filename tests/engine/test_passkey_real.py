"""Pass-key retrieval with the real SmolLM2-135M-Instruct: compression that keeps the needle still finds it, and the
test can tell: a policy that provably drops the needle does not."""

import random

import pytest

from kvlab.engine import Engine
from kvlab.policies import make_policy

pytestmark = pytest.mark.real

SENTENCES = [
    "The river wound slowly through the valley, past orchards heavy with late summer apples.",
    "In the old observatory, the astronomer adjusted the brass telescope and waited for the clouds to clear.",
    "Every Saturday the market square filled with stalls selling cheese, honey and fresh bread.",
    "The train to the coast left at seven, and most passengers slept until the sea came into view.",
    "She repaired the bicycle with a borrowed wrench and a length of copper wire.",
    "A storm had knocked down the fence, so the goats wandered into the neighbour's garden.",
    "The museum opened a new room devoted to maps drawn by sailors three centuries ago.",
    "After the concert, the violinist walked home through streets still wet with rain.",
    "The baker explained that good sourdough needs patience more than skill.",
    "Engineers tested the bridge by driving a column of loaded trucks across it at dawn.",
    "In spring the hillside turns yellow with wild mustard and the bees return to the hives.",
    "The library kept a shelf of letters that nobody had claimed since the war.",
    "Two chess players argued for an hour about a move that neither of them had made.",
    "The fishing boats came back early because the wind had turned cold and sharp.",
]
NEEDLE = "The pass key is 68219. Remember it. 68219 is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
MAX_NEW = 12


def haystack(sentences: int = 75, depth: float = 0.5) -> str:
    rng = random.Random(1)
    chosen = [rng.choice(SENTENCES) for _ in range(sentences)]
    chosen.insert(int(len(chosen) * depth), NEEDLE)
    return " ".join(chosen)


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine(smollm2, chunk_tokens=512)


@pytest.fixture(scope="module")
def context():
    return haystack()


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

"""Engine.ask times the question's feed on its own (query-agnostic), so no figure leaves it out."""

from __future__ import annotations

from kvlab.engine import Engine
from kvlab.policies import make_policy


def test_the_question_feed_is_timed_apart_from_prefill_and_decode(tiny_llama):
    engine = Engine(tiny_llama)
    context = "The pass key is 4242. " * 30
    agnostic = engine.ask(context, "What is the pass key?", make_policy("snapkv"), ratio=0.5, max_new_tokens=3)
    assert agnostic.question_s > 0 and agnostic.question_tokens > 0
    aware = engine.ask(context, "What is the pass key?", make_policy("snapkv"), ratio=0.5, max_new_tokens=3,
                       query_aware=True)
    assert aware.question_s == 0.0  # the question was part of the prefill, timed in prefill_s
    assert agnostic.to_dict()["question_s"] == agnostic.question_s

"""Conversation: multi-turn questions over one cache. The follow-up glue and the pending-token bookkeeping are
checked against one plain prefill of the whole token sequence; re-compression against its trigger and budget; and,
with the real SmolLM2, that turn 2 sees turn 1."""

import pytest
import torch

from kvlab.bench.haystack import build_haystack
from kvlab.engine import Engine, SamplingConfig
from kvlab.engine.conversation import DEFAULT_HEADROOM, CompressionRule, Conversation
from kvlab.engine.prompt import question_text, split_prompt
from kvlab.errors import ParameterError
from kvlab.policies import make_policy


def document_text(engine: Engine, tokens: int, needle: str = "The pass key is 4242.", seed: int = 0) -> str:
    count = lambda text: len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return build_haystack(count, tokens, seed=seed, needle=needle, depth=0.5).text


def start(engine: Engine, text: str, policy_name: str = "full", ratio: float = 0.0, **kwargs) -> Conversation:
    """A conversation over ``text`` compressed query-agnostically, as ``kvlab compress`` stores it."""
    policy = make_policy(policy_name)
    result = engine.prefill(engine.prompt(text, "").prefix_ids, policy.observation_request())
    cache, budget, _ = engine.compress(result, policy, ratio=ratio)
    headroom = kwargs.pop("headroom", DEFAULT_HEADROOM)
    return Conversation(engine, cache, rule=CompressionRule(policy, budget, headroom), **kwargs)


def reference_answer(engine: Engine, token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy answer after one plain prefill of ``token_ids`` from an empty cache."""
    result = engine.prefill(torch.tensor(token_ids))
    generation = engine.continue_and_decode(result.cache, None, result.last_logits, max_new_tokens=max_new_tokens,
                                            sampling=SamplingConfig(temperature=0.0))
    return generation.token_ids


def full_positions(cache) -> list[torch.Tensor]:
    return [layer.positions for layer in cache.layers if layer.spec.kind == "full"]


# -- the token sequence --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["llama", "gemma"])
def test_two_full_turns_equal_one_prefill_of_the_whole_sequence(request, model):
    engine = request.getfixturevalue(model)
    text = document_text(engine, 150)
    conversation = start(engine, text)
    first = conversation.ask("What is the pass key?", max_new_tokens=4)
    assert first.stopped_by == "max_new_tokens"  # the random model never stops early: a pending token is left
    second = conversation.ask("Are you sure?", max_new_tokens=6)
    sequence = [*engine.prompt(text, "").prefix_ids.tolist(), *engine.question_ids("What is the pass key?").tolist(),
                *first.token_ids, *engine.question_ids("Are you sure?", follow_up=True).tolist()]
    assert second.token_ids == reference_answer(engine, sequence, 6)
    assert conversation.cache.num_tokens == len(sequence) + len(second.token_ids) - 1


def test_a_cut_answer_leaves_a_consistent_cache(llama):
    text = document_text(llama, 120)
    conversation = start(llama, text)
    context_tokens = conversation.cache.num_tokens
    question_tokens = int(llama.question_ids("Why?").numel())
    turn = conversation.ask("Why?", max_new_tokens=3)
    assert turn.stopped_by == "max_new_tokens" and len(turn.token_ids) == 3
    assert conversation.pending_ids == turn.token_ids[-1:]  # sampled, not yet fed
    assert conversation.cache.num_tokens == context_tokens + question_tokens + 2
    follow_up_tokens = int(llama.question_ids("How?", follow_up=True).numel())
    second = conversation.ask("How?", max_new_tokens=2)
    assert second.question_tokens == follow_up_tokens
    assert conversation.cache.num_tokens == context_tokens + question_tokens + 3 + follow_up_tokens + 1
    for positions in full_positions(conversation.cache):  # every token fed once, at its own position
        assert torch.equal(positions, torch.arange(conversation.cache.num_tokens).expand_as(positions))


def test_an_answer_ended_by_a_stop_token_leaves_nothing_pending(llama, monkeypatch):
    text = document_text(llama, 100)
    free = start(llama, text).ask("Why?", max_new_tokens=3).token_ids
    assert free[1] != free[0]
    monkeypatch.setattr(llama, "stop_ids", {free[1]})  # the random model's second token now ends the answer
    conversation = start(llama, text)
    before = conversation.cache.num_tokens
    turn = conversation.ask("Why?", max_new_tokens=3)
    assert (turn.stopped_by, turn.token_ids, conversation.pending_ids) == ("stop_token", free[:1], [])
    assert conversation.cache.num_tokens == before + turn.question_tokens + 1
    second = conversation.ask("How?", max_new_tokens=4)
    sequence = [*llama.prompt(text, "").prefix_ids.tolist(), *llama.question_ids("Why?").tolist(), free[0],
                *llama.question_ids("How?", follow_up=True).tolist()]
    assert second.token_ids == reference_answer(llama, sequence, 4)


def test_the_follow_up_glue_is_the_chat_template(llama):
    tokenizer = llama.tokenizer
    text, first, answer, second = "DOC", "Q1?", "A1.", "Q2?"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{text}\n\n{first}"}, {"role": "assistant", "content": answer},
         {"role": "user", "content": second}], tokenize=False, add_generation_prompt=True)
    parts = split_prompt(tokenizer, text, first)
    built = (tokenizer.decode(parts.prefix_ids) + tokenizer.decode(parts.suffix_ids) + answer
             + question_text(tokenizer, second, follow_up=True))
    assert built == rendered


# -- re-compression ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy_name", ["snapkv", "h2o", "adakv", "streaming_llm"])
def test_recompression_keeps_the_budget_plus_the_newest_question(llama, policy_name):
    conversation = start(llama, document_text(llama, 300), policy_name, ratio=0.25)
    budget = conversation.rule.budget_tokens
    limit = int(budget * (1 + DEFAULT_HEADROOM))
    outcomes = []
    for index in range(7):
        question = f"Question {index}: what else?"
        before_kept, before_tokens = conversation.cache.kept_tokens(), conversation.cache.num_tokens
        new_tokens = len(conversation.pending_ids) + int(llama.question_ids(question, follow_up=index > 0).numel())
        turn = conversation.ask(question, max_new_tokens=4)
        fed = len(turn.token_ids) - len(conversation.pending_ids)
        assert turn.recompressed == (before_kept + new_tokens > limit), index
        expected = budget + new_tokens + fed if turn.recompressed else before_kept + new_tokens + fed
        assert turn.kept_tokens == pytest.approx(expected), index
        newest = torch.arange(before_tokens, before_tokens + new_tokens)
        for positions in full_positions(conversation.cache):  # the newest question, every token, in every head
            assert all(bool(torch.isin(newest, head).all()) for head in positions), index
        outcomes.append(turn.recompressed)
    assert True in outcomes and False in outcomes  # growth within the headroom is allowed, beyond it is not
    assert conversation.cache.kept_tokens() <= limit + 4


def test_full_never_recompresses(llama):
    conversation = start(llama, document_text(llama, 100), "full")
    conversation.rule = CompressionRule(conversation.rule.policy, budget_tokens=1)
    for index in range(3):
        assert not conversation.ask(f"Question {index}?", max_new_tokens=3).recompressed
    assert conversation.cache.kept_tokens() == conversation.cache.num_tokens


def test_without_a_rule_the_cache_only_grows(llama):
    conversation = start(llama, document_text(llama, 100), "snapkv", ratio=0.5)
    conversation.rule = None
    kept = [conversation.ask(f"Question {index}?", max_new_tokens=3).kept_tokens for index in range(3)]
    assert kept == sorted(kept) and len(set(kept)) == 3


def test_the_given_cache_is_not_changed(llama):
    text = document_text(llama, 100)
    policy = make_policy("snapkv")
    result = llama.prefill(llama.prompt(text, "").prefix_ids, policy.observation_request())
    cache, budget, _ = llama.compress(result, policy, ratio=0.5)
    positions = [layer.positions.clone() for layer in cache.layers]
    conversation = Conversation(llama, cache, rule=CompressionRule(policy, budget, headroom=0.0))
    for index in range(2):
        conversation.ask(f"Question {index}?", max_new_tokens=3)
    assert cache.num_tokens == result.cache.num_tokens
    assert all(torch.equal(layer.positions, before) for layer, before in zip(cache.layers, positions))


def test_bad_questions_and_settings_leave_the_cache_alone(llama):
    with pytest.raises(ParameterError, match="headroom"):
        start(llama, "short", headroom=-0.1)
    conversation = start(llama, document_text(llama, 100))
    tokens = conversation.cache.num_tokens
    for question, max_new_tokens in (("   ", 4), ("Why?", 0)):
        with pytest.raises(ParameterError):
            conversation.ask(question, max_new_tokens=max_new_tokens)
    assert conversation.cache.num_tokens == tokens and conversation.answered == 0


# -- the real model --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(smollm2):
    engine = Engine(smollm2, chunk_tokens=512)
    text = document_text(engine, 200, needle="The secret word is pineapple.", seed=3)
    result = engine.prefill(engine.prompt(text, "").prefix_ids)
    return engine, text, result


def smol_conversation(smol, first: str, second: str):
    engine, _, result = smol
    conversation = Conversation(engine, result.cache)
    return conversation.ask(first, max_new_tokens=16), conversation.ask(second, max_new_tokens=16)


REPEAT = "Repeat your previous answer."


@pytest.fixture(scope="module")
def secret_turns(smol):
    return smol_conversation(smol, "What is the secret word?", REPEAT)


@pytest.mark.real
def test_turn_two_sees_turn_one(smol, secret_turns):
    first, second = secret_turns
    assert "pineapple" in first.answer.lower()
    assert second.answer == first.answer
    # the same follow-up after another first turn repeats that one: the second answer follows the first
    other_first, other_second = smol_conversation(smol, "Say the word banana.", REPEAT)
    assert "banana" in other_first.answer.lower()
    assert "banana" in other_second.answer.lower() and "pineapple" not in other_second.answer.lower()


@pytest.mark.real
def test_smollm2_turns_equal_one_prefill_and_the_template(smol, secret_turns):
    engine, text, _ = smol
    first, second = secret_turns
    assert first.stopped_by == "stop_token" and second.stopped_by == "stop_token"
    sequence = [*engine.prompt(text, "").prefix_ids.tolist(), *engine.question_ids("What is the secret word?").tolist(),
                *first.token_ids, *engine.question_ids(REPEAT, follow_up=True).tolist()]
    assert second.token_ids == reference_answer(engine, sequence, 16)
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{text}\n\nWhat is the secret word?"},
         {"role": "assistant", "content": engine.tokenizer.decode(first.token_ids)},
         {"role": "user", "content": REPEAT}], tokenize=False, add_generation_prompt=True)
    assert engine.tokenizer.decode(sequence) == rendered

"""Split a (context, question) prompt into a reusable prefix (the document) and a suffix (the question).

With a chat template the user turn is ``context + "\n\n" + question``; the template is rendered once with
placeholders and cut at the boundary, so the prefix can be prefilled (and compressed) before the question is
known, and the suffix continues it token for token. Without a template the prompt is
``context + "\n\nQuestion: " + question + "\nAnswer:"``. An optional answer prefix (RULER's way of making a
model answer plainly, e.g. "The pass key is") is put at the start of the model's turn, after the header.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CONTEXT_MARK = "\u0000KVLAB_CONTEXT\u0000"
QUESTION_MARK = "\u0000KVLAB_QUESTION\u0000"


@dataclass(frozen=True)
class PromptParts:
    prefix_ids: torch.Tensor  # (prefix_tokens,) the document, with whatever the template puts before it
    suffix_ids: torch.Tensor  # (suffix_tokens,) the question and the assistant header

    @property
    def total_tokens(self) -> int:
        return int(self.prefix_ids.numel() + self.suffix_ids.numel())


def split_prompt(tokenizer, context: str, question: str, answer_prefix: str = "") -> PromptParts:
    if getattr(tokenizer, "chat_template", None):
        before, _, _ = _template_parts(tokenizer)
        prefix = tokenizer(before + context, add_special_tokens=False)["input_ids"]  # the template adds its own
    else:
        prefix = tokenizer(context, add_special_tokens=True)["input_ids"]
    suffix = question_ids(tokenizer, question, answer_prefix)
    return PromptParts(torch.tensor(prefix, dtype=torch.long), suffix)


ANSWER_MARK = "\u0000KVLAB_ANSWER\u0000"


def question_text(tokenizer, question: str, answer_prefix: str = "", *, follow_up: bool = False) -> str:
    """The text that asks ``question`` after what is already in the cache.

    First question: the rest of the user turn that holds the document (``split_prompt``'s suffix). Follow-up: the
    end of the model's previous turn, a new user turn with ``question``, and the header of the model's next turn.
    """
    if not follow_up:
        return _suffix_text(tokenizer, question, answer_prefix)
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": CONTEXT_MARK}, {"role": "assistant", "content": ANSWER_MARK},
             {"role": "user", "content": QUESTION_MARK}], tokenize=False, add_generation_prompt=True)
        _, _, rest = rendered.partition(ANSWER_MARK)
        between, _, after = rest.partition(QUESTION_MARK)
        return between + question + after + answer_prefix
    return _plain_question(question, answer_prefix)


def _plain_question(question: str, answer_prefix: str) -> str:
    return f"\n\nQuestion: {question}\nAnswer:" + (f" {answer_prefix}" if answer_prefix else "")


def _suffix_text(tokenizer, question: str, answer_prefix: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        _, between, after = _template_parts(tokenizer)
        return between + question + after + answer_prefix
    return _plain_question(question, answer_prefix)


def _template_parts(tokenizer) -> tuple[str, str, str]:
    """The chat template around one user turn ``context + "\n\n" + question``: (before, between, after)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{CONTEXT_MARK}\n\n{QUESTION_MARK}"}], tokenize=False,
        add_generation_prompt=True)
    before, _, rest = rendered.partition(CONTEXT_MARK)
    between, _, after = rest.partition(QUESTION_MARK)
    return before, between, after


def question_ids(tokenizer, question: str, answer_prefix: str = "", *, follow_up: bool = False) -> torch.Tensor:
    text = question_text(tokenizer, question, answer_prefix, follow_up=follow_up)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def stop_token_ids(tokenizer, model) -> set[int]:
    """End-of-turn and end-of-sequence ids from the tokenizer and the generation config."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if isinstance(token_id, int):
            ids.add(token_id)
    return ids

"""Token ids for a request: chat messages through the tokenizer's chat template, with or without a document.

Without a document the whole templated conversation is tokenized (``add_generation_prompt``). With a document, the
document's stored cache already holds the start of the first user turn (the template's text before it, then the
document, as ``engine.prompt.split_prompt`` builds it); the ids here continue it:

- the first user message ends that turn (``question_text``); system/developer messages, which cannot go before a
  document that is already prefilled, are put at the start of that first message, separated by a blank line;
- each later (assistant, user) pair is the assistant text, then the follow-up glue that closes the model's turn,
  opens a user turn with the message and the model's next header (``question_text(..., follow_up=True)``).

So a document conversation is ``document | user 1 | answer 1 | user 2 | ...``, and each turn's ids extend the
previous turn's: the prefix cache finds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.engine.prompt import question_text
from kvlab.server.errors import ApiError
from kvlab.server.schemas import ChatMessage

SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Prompt:
    """What to run: ``token_ids`` after the document (all of it when ``document_id`` is None)."""

    token_ids: list[int]
    document_id: str | None = None


def chat_token_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The templated conversation with the assistant header appended."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # jinja raises on role orders a template refuses
            raise ApiError(400, f"the model's chat template refused these messages: {error}",
                           param="messages") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "".join(f"{turn['role'].capitalize()}: {turn['content']}\n" for turn in turns) + "Assistant:"
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def document_chat_token_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Ids after a document's cache for ``messages``: system text first, then user/assistant alternating, ending
    with a user message."""
    system = "\n\n".join(m.text for m in messages if m.role in SYSTEM_ROLES)
    turns = [m for m in messages if m.role not in SYSTEM_ROLES]
    expected = ["user", "assistant"] * len(turns)
    if not turns or [m.role for m in turns] != expected[:len(turns)] or turns[-1].role != "user":
        raise ApiError(400, "with a document, messages must alternate user, assistant, user, ... and end with a "
                            "user message (system messages may come anywhere)", param="messages")
    first = turns[0].text if not system else f"{system}\n\n{turns[0].text}"
    ids = _tokens(tokenizer, question_text(tokenizer, first))
    for answer, question in zip(turns[1::2], turns[2::2], strict=True):
        ids += _tokens(tokenizer, answer.text)
        ids += _tokens(tokenizer, question_text(tokenizer, question.text, follow_up=True))
    return ids


def completion_token_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    vocab = len(tokenizer)
    if any(not 0 <= token < vocab for token in prompt):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return list(prompt)


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

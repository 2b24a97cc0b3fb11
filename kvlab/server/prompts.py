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

A request without a document is split the same way when its prompt is compressed (``context_tokens``): the
*question* is the last paragraph of the final message (from its last blank line on; the whole message when it has
none) with what the template puts after it, and the *context* is everything before it, earlier turns included.
A one-message chat ``"<document>\n\n<question>"`` thus splits where ``engine.prompt.split_prompt`` splits a posted
document from its question, and only the context is compressed.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.engine.prompt import question_text
from kvlab.server.errors import ApiError
from kvlab.server.schemas import ChatMessage

SYSTEM_ROLES = ("system", "developer")
QUESTION_MARK = "\u0000KVLAB_QUESTION\u0000"  # where the question starts, in a rendering used only to find it


@dataclass(frozen=True)
class Prompt:
    """What to run: ``token_ids`` after the document (all of it when ``document_id`` is None)."""

    token_ids: list[int]
    document_id: str | None = None


def chat_token_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The templated conversation with the assistant header appended."""
    text, add_special = _chat_text(tokenizer, _turns(messages))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def _turns(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]


def _chat_text(tokenizer, turns: list[dict[str, str]]) -> tuple[str, bool]:
    """The rendered conversation and whether the tokenizer adds its special tokens to it."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # jinja raises on role orders a template refuses
            raise ApiError(400, f"the model's chat template refused these messages: {error}",
                           param="messages") from None
        return text, False
    return "".join(f"{turn['role'].capitalize()}: {turn['content']}\n" for turn in turns) + "Assistant:", True


def chat_context_tokens(tokenizer, messages: list[ChatMessage], token_ids: list[int]) -> int:
    """How many of ``token_ids`` (``chat_token_ids(messages)``) are context, before the question (see the module
    docstring); 0 when the conversation is one message of one paragraph: then nothing comes before the question."""
    turns = _turns(messages)
    last = turns[-1]["content"]
    cut = _question_start(last)
    if cut == 0 and len(turns) == 1:
        return 0
    turns[-1] = {**turns[-1], "content": last[:cut] + QUESTION_MARK + last[cut:]}
    rendered, add_special = _chat_text(tokenizer, turns)
    context, marked, _ = rendered.partition(QUESTION_MARK)
    if not marked:  # the template did not render the message as given: no place to cut it
        return 0
    return _common_prefix(token_ids, tokenizer(context, add_special_tokens=add_special)["input_ids"])


def completion_context_tokens(tokenizer, prompt: str | list[int], token_ids: list[int]) -> int:
    """How many of ``token_ids`` (``completion_token_ids(prompt)``) come before the prompt's last paragraph; 0 when
    it has a single paragraph. A prompt of token ids is decoded to find its paragraphs."""
    text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    cut = _question_start(text)
    if cut == 0:
        return 0
    return _common_prefix(token_ids, tokenizer(text[:cut], add_special_tokens=isinstance(prompt, str))["input_ids"])


def _question_start(text: str) -> int:
    """Where the blank line before the last paragraph of ``text`` starts (the question takes the blank line, as in
    ``split_prompt``); 0 when there is none."""
    return max(0, text.rstrip().rfind("\n\n"))


def _common_prefix(ids: list[int], prefix: list[int]) -> int:
    """Tokens ``ids`` and ``prefix`` share from the start (a text's ids can differ from its prefix's at the cut)."""
    count = 0
    for a, b in zip(ids, prefix):
        if a != b:
            break
        count += 1
    return count


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

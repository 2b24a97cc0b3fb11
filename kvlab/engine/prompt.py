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
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{CONTEXT_MARK}\n\n{QUESTION_MARK}"}], tokenize=False,
            add_generation_prompt=True)
        before, _, rest = rendered.partition(CONTEXT_MARK)
        between, _, after = rest.partition(QUESTION_MARK)
        prefix_text, suffix_text = before + context, between + question + after + answer_prefix
        add_special = False  # the template writes its own special tokens
    else:
        prefix_text = context
        suffix_text = f"\n\nQuestion: {question}\nAnswer:" + (f" {answer_prefix}" if answer_prefix else "")
        add_special = True
    prefix = tokenizer(prefix_text, add_special_tokens=add_special)["input_ids"]
    suffix = tokenizer(suffix_text, add_special_tokens=False)["input_ids"]
    return PromptParts(torch.tensor(prefix, dtype=torch.long), torch.tensor(suffix, dtype=torch.long))


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

"""Log-probabilities for ``/v1/completions`` with ``logprobs`` (and ``echo``), in OpenAI's legacy shape:
``{tokens, token_logprobs, top_logprobs, text_offset}``, one entry per token.

Log-probabilities are those of the model's own distribution (``log_softmax`` of its fp32 logits), before
temperature, top-k or top-p, as vLLM reports them; so they do not depend on the sampling options. Prompt tokens
(``echo``) are scored from one forward pass over the whole prompt; the first has no logprob (``null``), nothing
predicts it. ``top_logprobs`` holds the ``k`` most likely tokens plus the chosen one (OpenAI: up to ``k + 1``
entries), keyed by token text. ``tokens`` are decoded incrementally, so they join to the decoded sequence: a token
that ends inside a UTF-8 character is ``""`` and the next one carries the character. ``text_offset`` is each
token's character offset in that joined text, counted from the prompt's start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvlab.engine.sampling import Sampler, SamplingConfig

# The echo pass holds logits for every prompt token: prompt_tokens x vocab x 4 bytes, refused above this.
MAX_ECHO_LOGIT_BYTES = 1024 * 1024 * 1024


@dataclass
class TokenLogprobs:
    """Per-token entries of one sequence, in order; ``None`` where nothing predicts the token (the first)."""

    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top: list[dict[int, float] | None] = field(default_factory=list)  # token id -> logprob

    def add(self, log_probs: torch.Tensor | None, token: int, k: int) -> None:
        """Record ``token`` scored by ``log_probs`` (vocab,), or with no score when it is None."""
        self.token_ids.append(token)
        if log_probs is None:
            self.token_logprobs.append(None)
            self.top.append(None)
            return
        self.token_logprobs.append(float(log_probs[token]))
        self.top.append(_top(log_probs, token, k))

    def extend(self, other: TokenLogprobs) -> None:
        self.token_ids += other.token_ids
        self.token_logprobs += other.token_logprobs
        self.top += other.top

    def keep(self, count: int) -> None:
        del self.token_ids[count:], self.token_logprobs[count:], self.top[count:]


def prompt_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> TokenLogprobs:
    """Entries for a prompt from ``logits`` (len(token_ids), vocab), row ``i`` predicting token ``i + 1``."""
    log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
    entries = TokenLogprobs()
    entries.add(None, token_ids[0], k)
    if len(token_ids) > 1:
        ids = torch.tensor(token_ids[1:], device=log_probs.device)
        chosen = log_probs.gather(1, ids[:, None])[:, 0].tolist()
        top_values, top_ids = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)  # (n - 1, k), k may be 0
        for row, token in enumerate(token_ids[1:]):
            top = dict(zip(top_ids[row].tolist(), top_values[row].tolist()))
            top[token] = chosen[row]
            entries.token_ids.append(token)
            entries.token_logprobs.append(chosen[row])
            entries.top.append(top)
    return entries


class LogprobSampler(Sampler):
    """A ``Sampler`` that also records each sampled token's logprob and the ``k`` most likely alternatives (the
    stop token that ends a generation included, as OpenAI reports it)."""

    def __init__(self, config: SamplingConfig, k: int) -> None:
        super().__init__(config)
        self.k = k
        self.entries = TokenLogprobs()

    def __call__(self, logits: torch.Tensor) -> int:
        token = super().__call__(logits)
        self.entries.add(torch.log_softmax(logits.float(), dim=-1), token, self.k)
        return token


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's text, decoded incrementally (special tokens kept), so that the pieces join to the decoded
    sequence; a token ending inside a UTF-8 character gets ``""`` and the token completing it the character."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces: list[str] = []
    prefix = read = 0  # the window decoded: ids[prefix:read] is already out, ids[prefix:] includes the new token
    for end in range(1, len(token_ids) + 1):
        before, after = decode(token_ids[prefix:read]), decode(token_ids[prefix:end])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            pieces.append(after[len(before):])
            prefix, read = read, end
        else:
            pieces.append("")
    if read < len(token_ids):  # an incomplete character at the end: its replacement goes to the last token
        pieces[-1] = decode(token_ids[prefix:])[len(decode(token_ids[prefix:read])):]
    return pieces


def completion_logprobs(tokenizer, prompt_ids: list[int], prompt: TokenLogprobs | None, generated: TokenLogprobs,
                        completion_text: str, *, cut_by_stop_string: bool, echo: bool) -> tuple[str, dict]:
    """The response text and its ``logprobs`` object: the prompt's entries first when ``echo`` (then ``prompt``
    holds them), then the generated ones. Tokens sampled past a stop string that cut the text are left out."""
    texts = token_texts(tokenizer, prompt_ids + generated.token_ids)
    prompt_text = "".join(texts[:len(prompt_ids)])
    generated_texts = texts[len(prompt_ids):]
    if cut_by_stop_string:
        kept, length = 0, 0
        while kept < len(generated_texts) and length < len(completion_text):
            length += len(generated_texts[kept])
            kept += 1
        generated.keep(kept)
        generated_texts = generated_texts[:kept]
    if not echo:
        return completion_text, openai_logprobs(tokenizer, generated, len(prompt_text), generated_texts)
    entries = TokenLogprobs()
    entries.extend(prompt if prompt is not None else TokenLogprobs())
    entries.extend(generated)
    return prompt_text + completion_text, openai_logprobs(tokenizer, entries, 0, texts[:len(prompt_ids)]
                                                          + generated_texts)


def openai_logprobs(tokenizer, entries: TokenLogprobs, first_offset: int, texts: list[str]) -> dict:
    """The OpenAI ``logprobs`` object; ``texts`` are the entries' token texts (``token_texts``), ``first_offset``
    the character offset of the first entry."""
    offsets, offset = [], first_offset
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    keys: dict[int, str] = {}

    def key_of(token: int) -> str:
        if token not in keys:
            keys[token] = _alternative_key(tokenizer, token)
        return keys[token]

    top = [None if alternatives is None else _keyed(alternatives, key_of) for alternatives in entries.top]
    return {"tokens": texts, "token_logprobs": entries.token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _alternative_key(tokenizer, token: int) -> str:
    """A token's key in ``top_logprobs``: its text, or its vocabulary entry when alone it is part of a character
    (byte tokens would all read U+FFFD and overwrite each other)."""
    text = tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return str(tokenizer.convert_ids_to_tokens(token)) if "\ufffd" in text else text


def _keyed(alternatives: dict[int, float], key_of) -> dict[str, float]:
    """Alternatives by key; two tokens with one key keep the larger logprob, so the maximum is never lost."""
    keyed: dict[str, float] = {}
    for token, value in alternatives.items():
        key = key_of(token)
        keyed[key] = max(value, keyed.get(key, value))
    return keyed


def _top(log_probs: torch.Tensor, token: int, k: int) -> dict[int, float]:
    top: dict[int, float] = {}
    if k:
        values, ids = log_probs.topk(min(k, log_probs.numel()))
        top = dict(zip(ids.tolist(), values.tolist()))
    top[token] = float(log_probs[token])
    return top

"""Request and response bodies in OpenAI's shapes (pydantic), plus kvlab's extension and document bodies.

Unknown top-level fields are refused (422, with a "did you mean"). OpenAI parameters kvlab does not implement are
accepted only at their neutral value (``n=1``, penalties 0, no logprobs in chat, no tools, text responses), so a
client that sends the defaults works and one that relies on a feature hears that it is missing. ``/v1/completions``
takes ``logprobs`` and ``echo`` (``logprobs.py``). ``user``, ``metadata``,
``store`` and ``service_tier`` do not change the output and are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


def _encodable(value: str) -> str:
    """Text the tokenizer can take: a lone surrogate (``"\\ud800"``, valid JSON) is not UTF-8 and is refused."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds an unpaired UTF-16 surrogate, which is not valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # characters per stop string: matching costs its length once per request, so it is bounded
NEUTRAL = {  # parameter -> values that mean "not used"
    "n": (1,), "best_of": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],), "functions": ([],),
    "tool_choice": ("none", "auto"), "function_call": ("none", "auto"), "echo": (False,), "suffix": ("",),
    "response_format": ({"type": "text"},), "parallel_tool_calls": (True, False), "modalities": (["text"],),
}
IGNORED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
COMPLETION_FIELDS = ("logprobs", "echo")  # neutral-only in chat, implemented by /v1/completions
MAX_LOGPROBS = 20  # most alternatives per token a completion may ask for (OpenAI allows 5, vLLM 20)


def _drop_neutral(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name in IGNORED:
        data.pop(name, None)
    for name, neutral in NEUTRAL.items():
        if name in data:
            value = data.pop(name)
            if value is not None and value not in neutral:
                raise ValueError(f"{name}={value!r} is not supported by kvlab; leave it out "
                                 f"(or send {neutral[0]!r})")
    return data


def _drop_neutral_but_completion_fields(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    kept = {name: data[name] for name in COMPLETION_FIELDS if name in data}
    return {**_drop_neutral({name: value for name, value in data.items() if name not in kept}), **kept}


class KvlabOptions(BaseModel):
    """The ``kvlab`` extension object of a completion request (openai client: ``extra_body={"kvlab": {...}}``)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no "yes" -> True, no true -> 1
    document_id: str | None = Field(default=None, description="answer on top of this document's compressed cache")
    ignore_eos: bool = Field(default=False, description="keep generating past end-of-turn tokens (for benchmarks)")
    top_k: int = Field(default=0, ge=0, description="sample among the k most likely tokens; 0 disables it")
    # a request that sets any of these is compressed with them whatever its length (without a document only)
    policy: str | None = Field(default=None, description="compress this request's prompt with this policy "
                                                         "instead of the server's (GET kvlab policies)")
    policy_params: dict[str, float | int | str | bool] | None = Field(
        default=None, description="that policy's parameters (with the server's policy: added to the server's)")
    ratio: float | None = Field(default=None, ge=0, lt=1, description="fraction of context tokens evicted")
    budget_tokens: int | None = Field(default=None, ge=1, description="context tokens kept per head per layer")
    kv_quant: Literal["none", "int8", "int4", "int2"] | None = Field(
        default=None, description="hold the compressed context quantized; \"none\": not quantized")

    @model_validator(mode="after")
    def _one_amount(self):
        if self.ratio is not None and self.budget_tokens is not None:
            raise ValueError("give either kvlab.ratio or kvlab.budget_tokens, not both")
        return self

    @property
    def compression_requested(self) -> bool:
        return any(value is not None for value in (self.policy, self.policy_params, self.ratio, self.budget_tokens,
                                                   self.kv_quant))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no "yes" -> True, no true -> 1
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no "yes" -> True, no true -> 1
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    kvlab: KvlabOptions = Field(default_factory=KvlabOptions)

    _neutral = model_validator(mode="before")(_drop_neutral)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        strings = [value] if isinstance(value, str) else list(value or [])
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings (got {len(strings)})")
        if any(not string for string in strings):
            raise ValueError("stop strings must not be empty")
        if any(len(string) > MAX_STOP_CHARS for string in strings):
            longest = max(len(string) for string in strings)
            raise ValueError(f"each stop string may be at most {MAX_STOP_CHARS} characters (got {longest})")
        strings = [_encodable(string) for string in strings]
        return strings

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """A message; extra keys a client echoes back (``refusal``, ``tool_calls: null``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @field_validator("content")
    @classmethod
    def _encodable_content(cls, value):
        return _encodable(value) if isinstance(value, str) else value

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    """A text completion; ``prompt`` is text or token ids, or a list holding one of either (lm-eval sends
    ``[[ids]]``). ``echo`` with ``logprobs`` and ``max_tokens=0`` scores the prompt without generating."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="return each token's logprob and this "
                                 "many most likely alternatives (0: the chosen token's only)")
    echo: bool = Field(False, description="the text starts with the prompt; with logprobs, the prompt's tokens "
                                          "are scored too (the first has logprob null)")

    _neutral = model_validator(mode="before")(_drop_neutral_but_completion_fields)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            if len(value) != 1:
                raise ValueError("send one prompt per request (batches of prompts are not supported)")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return _encodable(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _completion_options(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 generates nothing, so it needs echo=true (to score the prompt); send "
                             "max_tokens >= 1 or echo=true")
        if self.stream and (self.echo or self.logprobs is not None):
            raise ValueError(f"{'echo' if self.echo else 'logprobs'} is not supported with stream=true; send "
                             f"stream=false")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class DocumentRequest(BaseModel):
    """``POST /v1/documents``: the text, and optionally a policy and its amount (else the server's)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no "yes" -> True, no true -> 1
    text: Text = Field(min_length=1)
    model: str | None = None
    policy: str | None = None
    policy_params: dict[str, float | int | str | bool] = Field(default_factory=dict)
    ratio: float | None = Field(None, ge=0, lt=1)
    budget_tokens: int | None = Field(None, ge=1)
    background: bool = False  # answer 202 at once with an upload to poll (GET /v1/documents/uploads/{id})

    @model_validator(mode="after")
    def _one_amount(self):
        if self.ratio is not None and self.budget_tokens is not None:
            raise ValueError("give either ratio or budget_tokens, not both")
        return self


# -- responses ------------------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class KvlabStats(BaseModel):
    """The ``kvlab`` object of a response: where the prompt's KV cache came from and what the request cost."""

    document_id: str | None
    prefilled_tokens: int  # prompt tokens run through the model for this request
    cached_tokens: int  # prompt tokens reused (the document's cache, earlier turns)
    kv_bytes: int  # KV bytes the sequence holds in memory at the end (= kv_bytes_kept)
    kv_bytes_kept: int  # the same figure under the name every kvlab report uses
    kv_bytes_full_fp16: int  # the uncompressed cache of the sequence at 2 bytes per element
    compression: float  # kv_bytes_full_fp16 / kv_bytes_kept
    recompressed: bool  # the document session was compressed again (the conversation rule of `kvlab chat`)
    prefill_s: float
    decode_s: float
    queue_s: float
    # What compressed the prompt's context (a document's: when it was posted; server/prompt_compression.py).
    # ``compression_reason``: "document", "over_threshold" (the prompt was longer than --compress-above),
    # "requested" (the request named kvlab.policy, ratio, ...); not compressed: "under_threshold", "disabled"
    # (--compress-above off), "policy_full" (the full policy without quantization evicts nothing), "no_context" (one
    # message of one paragraph: nothing comes before the question), "context_too_short" (the budget would fall
    # below the policy's sink tokens) or "echo" (/v1/completions echoes and scores the whole prompt)
    compressed: bool = False
    compression_reason: str = "no_context"
    policy: str | None = None  # None when nothing was compressed
    policy_params: dict = Field(default_factory=dict)
    ratio: float | None = None
    budget_tokens: int | None = None  # context tokens kept per head per layer (mean)
    kv_quant: str | None = None
    context_tokens: int = 0  # prompt tokens before the question, which the policy compressed (0: none)
    kept_tokens: float | None = None  # of those, the mean kept per head (full-attention layers) after compression


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    kvlab: KvlabStats


class CompletionLogprobs(BaseModel):
    """Per token, in order (``logprobs.py``): its text, its logprob (null for a first prompt token), the most likely
    alternatives (text -> logprob) and its character offset in the prompt's text followed by the completion's."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage
    kvlab: KvlabStats


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvlab"
    max_context_tokens: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Document(BaseModel):
    """A stored document. Tokens are the model's; ``kept_tokens`` is the mean kept per head (full-attention
    layers); bytes are KV bytes except ``file_bytes``. Listings leave out the fields that need the cache loaded."""

    id: str
    object: Literal["document"] = "document"
    created_at: str
    model: str
    policy: str
    policy_params: dict
    ratio: float | None
    budget_tokens: int
    context_tokens: int
    kept_tokens: float | None = None
    kv_bytes_full: int
    kv_bytes_kept: int  # held in memory while decoding (quantized payload, scales and padding included)
    kv_bytes_full_fp16: int
    compression: float  # kv_bytes_full_fp16 / kv_bytes_kept
    file_bytes: int
    prefill_s: float | None = None
    compress_s: float | None = None


class DocumentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Document]


UploadStatus = Literal["queued", "running", "done", "failed"]


class DocumentUpload(BaseModel):
    """A background ``POST /v1/documents``: ``status`` is queued, running, done (``document`` is set; ``created``
    says whether it is new) or failed (``error``: the message, type, param and code the blocking POST would have
    answered)."""

    id: str
    object: Literal["document.upload"] = "document.upload"
    status: UploadStatus
    status_url: str
    created_at: float  # seconds since the epoch
    finished_at: float | None = None
    document: Document | None = None
    created: bool | None = None
    error: dict | None = None


class DeletedDocument(BaseModel):
    id: str
    object: Literal["document"] = "document"
    deleted: bool = True


def request_field_names() -> set[str]:
    """Every field name a request body may carry (for "did you mean" suggestions)."""
    names: set[str] = set()
    for model in (ChatCompletionRequest, CompletionRequest, DocumentRequest, KvlabOptions, StreamOptions):
        names.update(model.model_fields)
    return names

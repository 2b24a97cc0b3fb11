"""Context extension without training: run a model past its trained window (``--extend``).

Two methods (one file each would be two 20-line files; they share the parsing and the config bookkeeping):

``self-extend`` (Jin et al., 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning",
arXiv:2401.01325). A query attends to its nearest ``window`` keys with their true relative positions (neighbour
attention) and to every key further away with *grouped* positions: key position ``p // group``, query position
``q // group + window - window // group``, so relative distances stay within what the model saw in training and meet
the neighbour distances at the window's edge. Extended window: ``(native - window) * group + window``.

Deviations from the reference code (datamllab/LongLM): the neighbour / group choice is made per cached slot from
its stored position, so it holds after eviction and across prefill chunks (the reference handles a whole prompt
or one decoded token only); grouped queries use ``window // group`` (an integer position) where the reference
divides in floating point; sliding-window layers (Gemma 3's local layers) are left as they are, since no key
there is further than their window.

``yarn`` (``Yarn``): the RoPE frequencies of full-attention layers are interpolated by a factor, through
transformers' own implementation of YaRN. Dynamic NTK is not offered: it changes the frequencies as the sequence
grows, so keys already cached would have been rotated with other ones.

The extension is part of the model's identity: it is written into the config (``kvlab_extension``), so the
fingerprint, and every cache keyed or checked by it, differs from the plain model's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvlab.errors import ParameterError

CONFIG_KEY = "kvlab_extension"


@dataclass(frozen=True)
class SelfExtend:
    group: int = 8
    window: int = 1024

    name = "self-extend"

    def __post_init__(self) -> None:
        if self.group < 2:
            raise ParameterError(f"self-extend group must be >= 2 (got {self.group})")
        if self.window < 1:
            raise ParameterError(f"self-extend window must be >= 1 token (got {self.window})")

    @property
    def label(self) -> str:
        return f"{self.name}:group={self.group}:window={self.window}"

    def context_tokens(self, native: int) -> int:
        """The longest context whose grouped distances stay within the native window."""
        if native <= self.window:
            return native
        return (native - self.window) * self.group + self.window


@dataclass(frozen=True)
class Yarn:
    """YaRN (Peng et al., 2023, arXiv:2309.00071) without fine-tuning: the full-attention layers' RoPE frequencies
    are interpolated by ``factor`` (high frequencies kept, low ones scaled, attention temperature 0.1 ln(factor) + 1)
    through transformers' own ``yarn`` rope type; sliding-window layers keep theirs. Window: native x factor."""

    factor: float = 4.0

    name = "yarn"

    def __post_init__(self) -> None:
        if not self.factor > 1:
            raise ParameterError(f"yarn factor must be > 1 (got {self.factor})")

    @property
    def label(self) -> str:
        return f"{self.name}:factor={self.factor:g}"

    def context_tokens(self, native: int) -> int:
        return int(native * self.factor)


Extension = SelfExtend | Yarn
EXTENSIONS: dict[str, type] = {SelfExtend.name: SelfExtend, Yarn.name: Yarn}
EXAMPLES = "self-extend[:group=G][:window=W] or yarn[:factor=F]"


def parse_extension(text: str | None) -> Extension | None:
    """``self-extend[:group=G][:window=W]`` or ``yarn[:factor=F]``; None or "none" for no extension. One clear line
    on a bad spec."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    name, *settings = text.strip().split(":")
    kind = EXTENSIONS.get(name)
    if kind is None:
        raise ParameterError(f"unknown --extend {name!r}; use {EXAMPLES}")
    fields = {field.name: field.type for field in dataclasses.fields(kind)}
    values: dict[str, float | int] = {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or key not in fields:
            raise ParameterError(f"cannot read --extend {text!r}: write {EXAMPLES}")
        convert = int if fields[key] in (int, "int") else float
        try:
            values[key] = convert(value)
        except ValueError:
            raise ParameterError(f"--extend {key} must be a {'whole ' if convert is int else ''}number "
                                 f"(got {value!r})") from None
    return kind(**values)


def extension_label(text: str | None) -> str | None:
    """``--extend`` text checked now (one line on a bad spec, before any model loads) and spelled canonically, as
    settings that travel without the parsed object (bench requests, server settings) keep it; None for none."""
    extension = parse_extension(text)
    return extension.label if extension is not None else None


def extension_of(model) -> Extension | None:
    """The extension a loaded model runs with (read from its config; parsed once per model)."""
    cached = model.__dict__.get("_kvlab_extension", False)
    if cached is False:
        label = getattr(model.config, CONFIG_KEY, None)
        cached = parse_extension(label) if label else None
        model.__dict__["_kvlab_extension"] = cached
    return cached


def apply_extension(model, extension: Extension | None) -> None:
    """Make ``model`` run with ``extension`` (recorded in its config, so in its fingerprint)."""
    if extension is None:
        return
    from kvlab.errors import UnsupportedModelError

    if not hasattr(getattr(model, "model", None), "rotary_emb"):
        raise UnsupportedModelError(f"--extend {extension.name} needs a rotary-embedding decoder (Llama, Gemma 3, "
                                    f"...); this model has none")
    text_config = model.config.get_text_config(decoder=True)
    if isinstance(extension, Yarn):
        _interpolate_rope(model, text_config, extension)
    setattr(model.config, CONFIG_KEY, extension.label)
    if text_config is not model.config:
        setattr(text_config, CONFIG_KEY, extension.label)
    model.__dict__["_kvlab_extension"] = extension


def _interpolate_rope(model, config, extension: Yarn) -> None:
    """Switch the full-attention layers' RoPE to transformers' ``yarn`` type and rebuild the rotary embedding."""
    from kvlab.errors import UnsupportedModelError

    parameters = dict(getattr(config, "rope_parameters", None) or {})
    per_layer_type = "full_attention" in parameters and isinstance(parameters["full_attention"], dict)
    current = parameters["full_attention"] if per_layer_type else parameters
    if current.get("rope_type", "default") != "default" or current.get("rope_theta") is None:
        raise UnsupportedModelError(f"--extend yarn needs plain RoPE to interpolate; this model's is "
                                    f"{current.get('rope_type')!r}")
    interpolated = {**current, "rope_type": "yarn", "factor": float(extension.factor),
                    "original_max_position_embeddings": int(config.max_position_embeddings)}
    config.rope_parameters = {**parameters, "full_attention": interpolated} if per_layer_type else interpolated
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(next(model.parameters()).device)

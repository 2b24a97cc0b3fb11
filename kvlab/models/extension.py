"""Context extension without training: run a model past its trained window (``--extend``).

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

The extension is part of the model's identity: it is written into the config (``kvlab_extension``), so the
fingerprint, and every cache keyed or checked by it, differs from the plain model's.
"""

from __future__ import annotations

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


Extension = SelfExtend
EXTENSIONS = {SelfExtend.name: SelfExtend}


def parse_extension(text: str | None) -> Extension | None:
    """``self-extend[:group=G][:window=W]``; None or "none" for no extension. One clear line on a bad spec."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    name, *settings = text.strip().split(":")
    kind = EXTENSIONS.get(name)
    if kind is None:
        raise ParameterError(f"unknown --extend {name!r}; use one of: {', '.join(EXTENSIONS)} "
                             f"(e.g. self-extend:group=8:window=1024)")
    values: dict[str, int] = {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or key not in ("group", "window"):
            raise ParameterError(f"cannot read --extend {text!r}: write self-extend[:group=G][:window=W]")
        try:
            values[key] = int(value)
        except ValueError:
            raise ParameterError(f"--extend {key} must be a whole number (got {value!r})") from None
    return kind(**values)


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
    setattr(model.config, CONFIG_KEY, extension.label)
    text_config = model.config.get_text_config(decoder=True)
    if text_config is not model.config:
        setattr(text_config, CONFIG_KEY, extension.label)
    model.__dict__["_kvlab_extension"] = extension

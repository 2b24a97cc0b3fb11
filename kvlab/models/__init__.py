"""Load a causal LM and its tokenizer by embedded name, Hugging Face id or local folder."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from kvlab.errors import ModelLoadError, ParameterError, UnknownModelError
from kvlab.models.dtypes import DTYPE_CHOICES, parse_dtype, resolve_dtype
from kvlab.models.embedded import EMBEDDED_MODELS, TINY_MODELS, EmbeddedModel
from kvlab.models.fingerprint import model_fingerprint

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A model ready for the engine; ``max_context_tokens`` is the model's trained window (tokens)."""

    name: str
    model: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer
    weights: str = "fp"  # "int8": linear layers hold int8 weights (models.weights); the model itself changed

    @property
    def config(self):
        return self.model.config.get_text_config(decoder=True)

    @property
    def native_context_tokens(self) -> int:
        """The window the model was trained with."""
        return int(getattr(self.config, "max_position_embeddings", 0) or 0)

    @property
    def extension(self):
        """The context extension it runs with (``models.extension``), or None."""
        from kvlab.models.extension import extension_of

        return extension_of(self.model)

    @property
    def extension_label(self) -> str:
        """The extension as ``--extend`` spells it; "" without one (what a persisted cache records)."""
        extension = self.extension
        return extension.label if extension is not None else ""

    @property
    def max_context_tokens(self) -> int:
        """The window it may use: the trained one, or what its extension reaches."""
        extension = self.extension
        native = self.native_context_tokens
        return extension.context_tokens(native) if extension is not None and native else native

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @cached_property
    def fingerprint(self) -> str:
        return model_fingerprint(self.model, self.tokenizer)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model(name_or_path: str = DEFAULT_MODEL, *, device: str | None = None,
               dtype: str | torch.dtype | None = None, progress: bool = True, weights: str = "fp",
               extension=None) -> LoadedModel:
    """Load ``smollm2-135m``, ``gemma3-270m``, ``tiny-llama``, ``tiny-gemma3``, a local folder or a hub id.

    ``dtype``: "auto" (or None), "float32", "bfloat16", "float16" or a torch dtype; auto is float32 on CPU and the
    checkpoint's own dtype elsewhere (``models.dtypes``). ``weights="int8"`` quantizes the linear layers' weights
    (``models.weights``, gpt-fast's weight-only int8): a different model, faster to decode on CPU; its fingerprint
    differs, so caches are never mixed between the two. ``extension`` (``models.extension``, e.g. Self-Extend, or
    its ``--extend`` text) runs the model past its trained window; it too is part of the fingerprint.
    """
    from kvlab.models.extension import apply_extension, parse_extension
    from kvlab.models.weights import check_weight_scheme, quantize_weights

    check_weight_scheme(weights)
    target_device = check_device(device) if device else default_device()
    resolve_dtype(dtype, target_device, None)  # an unknown or unusable dtype fails before any loading
    if name_or_path in TINY_MODELS:
        from kvlab.models import tiny

        target_dtype = resolve_dtype(dtype, target_device, torch.float32)  # random weights, built in fp32
        model, tokenizer = tiny.tiny_llama() if name_or_path == "tiny-llama" else tiny.tiny_gemma3()
    else:
        folder = _resolve_folder(name_or_path, progress)
        checkpoint_dtype: str | torch.dtype | None = None
        if parse_dtype(dtype) is None and target_device.type != "cpu":  # auto: the checkpoint's own dtype
            embedded = EMBEDDED_MODELS.get(name_or_path)
            checkpoint_dtype = embedded.release_dtype if embedded is not None else _recorded_dtype(folder)
        target_dtype = resolve_dtype(dtype, target_device, checkpoint_dtype)
        model, tokenizer = _load_pretrained(folder, target_dtype)
    model = model.to(device=target_device, dtype=target_dtype).eval()
    quantize_weights(model, weights)
    apply_extension(model, parse_extension(extension) if isinstance(extension, str) else extension)
    return LoadedModel(name=name_or_path, model=model, tokenizer=tokenizer, weights=weights)


def check_device(device: str) -> torch.device:
    """``device`` as a torch device that this machine has; one clear ParameterError otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"--device {device}: this torch build has no CUDA or no GPU is visible; use --device cpu "
                             f"or install a CUDA build of torch (see the README's install notes)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ParameterError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ParameterError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return parsed


def _resolve_folder(name_or_path: str, progress: bool) -> str:
    if name_or_path in EMBEDDED_MODELS:
        from kvlab.models.convert import ensure_converted

        return str(ensure_converted(EMBEDDED_MODELS[name_or_path], progress=progress))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if "/" not in name_or_path:
        known = ", ".join([*EMBEDDED_MODELS, *TINY_MODELS])
        raise UnknownModelError(
            f"unknown model {name_or_path!r}: use one of {known}, a local folder, or a Hugging Face id like org/name"
        )
    return name_or_path  # a hub id; transformers downloads it where a hub is reachable


def _recorded_dtype(folder: str) -> torch.dtype | None:
    """The dtype a checkpoint's config records (``dtype``, formerly ``torch_dtype``), or None."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError):
        return None  # _load_pretrained reports the folder's problem
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    return recorded if isinstance(recorded, torch.dtype) else None


def _load_pretrained(folder: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the reload takes about a second; its per-tensor bar is noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as error:  # a missing file, or a folder without a usable model or tokenizer
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"could not load model {folder!r}: {first_line}; the folder needs a transformers "
                             f"checkpoint (config.json, weights) and its tokenizer") from None
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    return model, tokenizer


__all__ = ["DEFAULT_MODEL", "DTYPE_CHOICES", "EMBEDDED_MODELS", "TINY_MODELS", "EmbeddedModel", "LoadedModel",
           "load_model"]

"""Convert an embedded GGUF checkpoint once into a cached safetensors folder that reloads in about a second.

Dequantizing a GGUF takes 20-80 s on a laptop CPU; the converted folder (weights, config, tokenizer, chat template)
lives under ``KVLAB_CACHE_DIR/models/<name>``. Concurrent first loads each convert into their own temporary folder
and the first to finish renames it into place; the others discard theirs, so a reader never sees a partial folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from kvlab.errors import ModelLoadError
from kvlab.models.embedded import EmbeddedModel

COMPLETE_MARKER = "kvlab-converted.json"


def cache_root() -> Path:
    """``$KVLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvlab``, else ``~/.cache/kvlab``."""
    configured = os.environ.get("KVLAB_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvlab"


def converted_dir(model: EmbeddedModel) -> Path:
    return cache_root() / "models" / model.name


def is_converted(model: EmbeddedModel) -> bool:
    return (converted_dir(model) / COMPLETE_MARKER).is_file()


def ensure_converted(model: EmbeddedModel, progress: bool = True) -> Path:
    """Return the converted folder, converting the GGUF first if this is the first load (seconds: 20-80)."""
    target = converted_dir(model)
    if (target / COMPLETE_MARKER).is_file():
        return target
    gguf_path = model.locate_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
    try:
        if progress:
            print(f"kvlab: converting {gguf_path.name} once to {target} (takes 20-80 s)", flush=True)
        started = time.perf_counter()
        _convert_gguf(gguf_path, staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps({
            "source": str(gguf_path), "seconds": round(time.perf_counter() - started, 1),
        }))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                raise  # not a lost race: a real failure
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except ImportError as error:
        raise ModelLoadError(f"loading GGUF needs extra packages ({error}); "
                             "run `pip install gguf accelerate`") from None
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer; the weights are already
    # dequantized, so the quantization config is dropped as well to make the reload a plain safetensors load.
    model.hf_quantizer = None  # type: ignore[assignment]  # undeclared in transformers' stubs
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

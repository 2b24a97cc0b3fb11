"""The command line: outputs users and scripts read, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvlab.cli import main

QUESTION = "What is the pass key?"


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "doc.txt"
    assert main(["haystack", "--model", "tiny-llama", "--tokens", "600", "--passkey", "4242", "--out", str(path)]) == 0
    return path


def test_help_does_not_import_torch():
    code = "import sys; from kvlab.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_haystack_hides_the_passkey_at_the_asked_length(document, tiny_llama):
    text = document.read_text()
    assert "4242" in text
    assert 480 <= len(tiny_llama.tokenizer(text)["input_ids"]) <= 610


def test_ask_json_reports_costs(document, capsys):
    code = main(["ask", "--model", "tiny-llama", "--context-file", str(document), "--question", QUESTION,
                 "--policy", "snapkv", "--ratio", "0.75", "--max-new-tokens", "4", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("answer", "context_tokens", "kept_tokens", "kv_bytes_full", "kv_bytes_kept", "prefill_s",
                "compress_s", "decode_s"):
        assert key in data
    assert data["policy"] == "snapkv" and data["ratio"] == 0.75
    assert data["kept_tokens"] == pytest.approx(data["context_tokens"] * 0.25, abs=1)
    assert data["kv_bytes_kept"] < 0.3 * data["kv_bytes_full"]


def test_ask_text_prints_answer_and_stats_line(document, capsys):
    code = main(["ask", "--model", "tiny-llama", "--context-file", str(document), "--question", QUESTION,
                 "--policy", "streaming_llm", "--budget", "64", "--max-new-tokens", "3"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    stats = lines[-1]
    assert stats.startswith("[streaming_llm query-agnostic] context ")
    assert "kept 64 tok/head" in stats and "full fp16" in stats and "decode" in stats


@pytest.mark.parametrize("argv, fragment", [
    (["--policy", "snapk"], "Did you mean: snapkv?"),
    (["--policy", "snapkv", "--ratio", "1.0"], "ratio"),
    (["--policy", "snapkv", "-p", "window_size=3"], "window_tokens"),
    (["--policy", "snapkv", "-p", "kernel_size=zero"], "kernel_size"),
    (["--model", "no-such-model"], "unknown model"),
])
def test_user_mistakes_end_in_one_line(document, capsys, argv, fragment):
    code = main(["ask", "--model", "tiny-llama", "--context-file", str(document), "--question", QUESTION, *argv])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvlab: error: ")
    assert fragment in lines[0]


def test_missing_context_file(capsys, tmp_path):
    code = main(["ask", "--model", "tiny-llama", "--context-file", str(tmp_path / "nope.txt"), "--question", "q"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_policies_listing_and_show(capsys):
    assert main(["policies"]) == 0
    listing = capsys.readouterr().out
    from kvlab.policies import POLICIES

    for name in POLICIES.names():
        assert name in listing
    assert main(["policies", "show", "snapkv"]) == 0
    shown = capsys.readouterr().out
    assert "window_tokens" in shown and "arXiv:2404.14469" in shown


def test_models_listing(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out


def test_ask_json_reports_held_bytes_against_fp16_full(document, capsys):
    base = ["ask", "--model", "tiny-llama", "--context-file", str(document), "--question", QUESTION,
            "--policy", "snapkv", "--ratio", "0.5", "--max-new-tokens", "3", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(base + ["--kv-quant", "int4", "--weights", "int8"]) == 0
    quantized = json.loads(capsys.readouterr().out)
    assert plain["kv_quant"] is None and quantized["kv_quant"] == "int4"
    assert plain["kv_bytes_full_fp16"] == quantized["kv_bytes_full_fp16"]
    # fp32 storage of half the tokens is the fp16 size of all of them; int4 holds far less than that
    assert plain["compression"] == pytest.approx(1.0, abs=0.05)
    assert quantized["kv_bytes_kept"] < plain["kv_bytes_kept"] / 2
    assert quantized["compression"] == pytest.approx(plain["kv_bytes_kept"] / quantized["kv_bytes_kept"]
                                                     * plain["compression"], rel=1e-3)


def test_unknown_weights_scheme_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--model", "tiny-llama", "--context-file", "x", "--question", "q", "--weights", "int3"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


@pytest.mark.parametrize("device,message", [("gpu", "unknown device 'gpu'"), ("cuda", "no CUDA"),
                                            ("cuda:7", "CUDA")])
def test_unusable_device_is_one_line(document, capsys, device, message):
    import torch

    if device == "cuda" and torch.cuda.is_available() or device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    code = main(["ask", "--model", "tiny-llama", "--context-file", str(document), "--question", QUESTION,
                 "--device", device])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra,message", [
    (["--cache", ""], "--cache is empty"),
    (["--context-file", " "], "--context-file is empty"),
    (["--context-file", "DOC", "--temperature", "nan"], "must be finite"),
])
def test_degenerate_values_are_one_line(document, capsys, extra, message):
    extra = [str(document) if item == "DOC" else item for item in extra]
    code = main(["ask", "--model", "tiny-llama", "--question", QUESTION, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_folder_without_a_model_is_one_line(document, tmp_path, capsys):
    code = main(["compress", "--model", str(tmp_path), "--context-file", str(document)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "could not load model" in err and len(err.splitlines()) == 1

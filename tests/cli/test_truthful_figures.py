"""Each figure `kvlab ask`, `ask --cache` and `compress` print means one thing (README: "What each figure means"):
``prefill_s`` times exactly ``prefilled_tokens``, the tokens this run fed through the model before decoding;
``kv_bytes_kept`` is what the cache holds in memory, ``file_bytes`` what its file takes on disk. Tiny model, one
process, a few seconds."""

from __future__ import annotations

import json
import re
from contextlib import redirect_stdout
from io import StringIO

import pytest

from kvlab.bench.haystack import build_haystack
from kvlab.cli import main
from kvlab.store import load_cache

QUESTION = "What is the pass key?"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("truthful-store")


@pytest.fixture(autouse=True)
def store_in_tmp(store_dir, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(store_dir))


@pytest.fixture(scope="module")
def document(tmp_path_factory, tiny_llama):
    count = lambda text: len(tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    path = tmp_path_factory.mktemp("truthful") / "doc.txt"
    path.write_text(build_haystack(count, 400, seed=1, needle="The pass key is 4242.", depth=0.5).text)
    return path


def run(capsys, *argv) -> str:
    assert main([str(arg) for arg in argv]) == 0
    return capsys.readouterr().out


def figures(line: str) -> dict:
    """The numbers of a stats line, by name."""
    prefill = re.search(r"prefill (\d+) tok in ([\d.]+) (ms|s) \((\d+) tok/s\)", line)
    kept = re.search(r"KV in memory ([\d.]+) MiB \(full fp16 ([\d.]+) MiB, compression ([\d.]+)x\)", line)
    assert prefill and kept, line
    seconds = float(prefill.group(2)) / (1000 if prefill.group(3) == "ms" else 1)
    return {"prefilled_tokens": int(prefill.group(1)), "prefill_s": seconds, "rate": int(prefill.group(4)),
            "kept_mib": float(kept.group(1)), "full_fp16_mib": float(kept.group(2)),
            "compression": float(kept.group(3))}


@pytest.fixture(scope="module")
def int4_file(document, store_dir, tmp_path_factory):
    """A snapkv + int4 file made by `kvlab compress --json`, with what it printed."""
    out = tmp_path_factory.mktemp("int4") / "doc.kv"
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(StringIO()) as printed:
        patch.setenv("KVLAB_CACHE_DIR", str(store_dir))
        assert main(["compress", "--model", "tiny-llama", "--context-file", str(document), "--policy", "snapkv",
                     "--ratio", "0.5", "--kv-quant", "int4", "--out", str(out), "--json"]) == 0
    return out, json.loads(printed.getvalue())


def test_compress_reports_memory_held_and_file_bytes_apart(int4_file):
    path, made = int4_file
    loaded = load_cache(path)
    assert made["file_bytes"] == path.stat().st_size
    # in memory: what the loaded (still quantized) cache holds, codes, scales and padding, not the file's size
    assert made["kv_bytes_kept"] == loaded.cache.held_bytes != made["file_bytes"]
    assert made["compression"] == pytest.approx(made["kv_bytes_full_fp16"] / made["kv_bytes_kept"], rel=1e-3)
    assert made["prefilled_tokens"] == made["context_tokens"] and made["prefill_s"] > 0


def test_compress_found_in_the_store_prefills_nothing(document, int4_file, capsys):
    _, made = int4_file
    again = json.loads(run(capsys, "compress", "--model", "tiny-llama", "--context-file", document, "--policy",
                           "snapkv", "--ratio", "0.5", "--kv-quant", "int4", "--json"))
    assert again["from_store"] and again["key"] == made["key"]
    assert again["prefilled_tokens"] == 0 and again["prefill_s"] == 0.0
    assert again["kv_bytes_kept"] == made["kv_bytes_kept"] and again["file_bytes"] == made["file_bytes"]


def test_ask_cache_times_the_question_it_prefilled_not_the_document(int4_file, capsys):
    path, made = int4_file
    asked = json.loads(run(capsys, "ask", "--model", "tiny-llama", "--cache", path, "--question", QUESTION,
                           "--max-new-tokens", "2", "--json"))
    assert asked["prefilled_tokens"] == asked["question_tokens"] < asked["context_tokens"] == made["context_tokens"]
    assert asked["kv_bytes_kept"] == made["kv_bytes_kept"] and asked["file_bytes"] == made["file_bytes"]
    assert asked["time_to_first_token_s"] == pytest.approx(asked["load_s"] + asked["prefill_s"])

    line = run(capsys, "ask", "--model", "tiny-llama", "--cache", path, "--question", QUESTION,
               "--max-new-tokens", "2").splitlines()[-1]
    shown = figures(line)
    assert shown["prefilled_tokens"] == asked["question_tokens"]
    # the rate is the question's tokens over the question's prefill: far below context_tokens / prefill_s
    # the time is shown rounded (whole ms under a second, else 0.01 s), so the rate is bounded by that rounding
    half_step = 0.0005 if shown["prefill_s"] < 1 else 0.005
    fastest = shown["prefilled_tokens"] / max(shown["prefill_s"] - half_step, 1e-9)
    slowest = shown["prefilled_tokens"] / (shown["prefill_s"] + half_step)
    assert slowest - 1 <= shown["rate"] <= fastest + 1
    assert shown["kept_mib"] == pytest.approx(made["kv_bytes_kept"] / 2**20, abs=0.006)
    assert f"file on disk {made['file_bytes'] / 2**20:.2f} MiB" in line


@pytest.mark.parametrize("query_aware", [False, True])
def test_ask_prefill_counts_what_was_prefilled(document, capsys, query_aware):
    flags = ["--query-aware"] if query_aware else []
    argv = ["ask", "--model", "tiny-llama", "--context-file", document, "--question", QUESTION, "--policy", "snapkv",
            "--ratio", "0.5", "--max-new-tokens", "2", *flags]
    asked = json.loads(run(capsys, *argv, "--json"))
    expected = asked["context_tokens"] + (asked["question_tokens"] if query_aware else 0)
    assert asked["prefilled_tokens"] == expected
    line = run(capsys, *argv).splitlines()[-1]
    shown = figures(line)
    assert shown["prefilled_tokens"] == expected
    assert shown["compression"] == pytest.approx(asked["compression"], abs=0.006)
    assert "with the chat" not in line  # a one-shot answer holds no chat

"""`kvlab ask --method` and ``ask_with_method``: figures of the original document, the tokens actually given."""

from __future__ import annotations

import json

import pytest

from kvlab.cli import main
from kvlab.engine import Engine
from kvlab.inputs import make_input_method
from kvlab.inputs.answer import ask_with_method
from kvlab.policies import make_policy

QUESTION = "What is the pass key?"


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    assert main(["haystack", "--model", "tiny-llama", "--tokens", "500", "--passkey", "5150", "--out", str(path)]) == 0
    return path


def test_keeping_everything_answers_like_the_full_cache(tiny_llama, document):
    engine = Engine(tiny_llama)
    text = document.read_text(encoding="utf-8")
    full = engine.ask(text, QUESTION, make_policy("full"), max_new_tokens=5)
    kept_all = ask_with_method(engine, make_input_method("selective_context"), text, QUESTION, ratio=0.0,
                               max_new_tokens=5)
    assert kept_all.token_ids == full.token_ids
    assert kept_all.kv_bytes_full_fp16 == full.kv_bytes_full_fp16 and kept_all.kv_bytes_full == full.kv_bytes_full
    shortened = ask_with_method(engine, make_input_method("rag_bm25"), text, QUESTION, ratio=0.75, max_new_tokens=5)
    assert shortened.context_tokens == full.context_tokens
    assert shortened.kv_bytes_full_fp16 == full.kv_bytes_full_fp16
    assert shortened.kept_tokens == shortened.extra["input_context_tokens"] < 0.3 * full.context_tokens
    assert shortened.compression > 3 * full.compression
    assert shortened.policy == "rag_bm25" and shortened.extra["family"] == "input"


def test_cli_method_json(document, capsys):
    code = main(["ask", "--model", "tiny-llama", "--context-file", str(document), "--question", QUESTION,
                 "--method", "rag_bm25", "--ratio", "0.5", "-p", "chunk_tokens=64", "--max-new-tokens", "3", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["policy"] == "rag_bm25" and data["policy_params"] == {"chunk_tokens": 64}
    assert data["prefilled_tokens"] == data["extra"]["input_context_tokens"] < data["context_tokens"]
    assert data["budget_tokens"] <= data["context_tokens"] // 2 + 1


@pytest.mark.parametrize("argv, fragment", [
    (["--method", "rag_bm25", "--policy", "snapkv"], "drop --policy"),
    (["--method", "rag_bm2"], "Did you mean: rag_bm25"),
    (["--method", "rag_bm25", "-p", "chunk=3"], "has no parameter 'chunk'"),
])
def test_method_mistakes_end_in_one_line(document, capsys, argv, fragment):
    code = main(["ask", "--model", "tiny-llama", "--context-file", str(document), "--question", QUESTION, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1

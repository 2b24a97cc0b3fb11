"""`kvlab compress`, `ask --cache`, `chat` and `cache`: a document compressed by one process answers in another
exactly as the in-memory path does; chats are saved and continued; the store is listed, pruned and emptied; and
every mistake ends in one line with exit status 2. Tiny models; three fresh processes in all (about 5 s each)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from kvlab.bench.haystack import build_haystack
from kvlab.cli import main
from kvlab.engine import Engine, SamplingConfig
from kvlab.policies import make_policy
from kvlab.store import CacheStore, load_cache
from kvlab.store.documents import compress_document, conversation_for, open_document

QUESTION = "What is the pass key?"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kvlab-cache")


@pytest.fixture(autouse=True)
def store_in_tmp(cache_dir, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(cache_dir))


@pytest.fixture(scope="module")
def document(tmp_path_factory, tiny_llama):
    count = lambda text: len(tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    path = tmp_path_factory.mktemp("docs") / "doc.txt"
    path.write_text(build_haystack(count, 300, seed=0, needle="The pass key is 4242.", depth=0.5).text)
    return path


def kvlab(cache_dir, *argv, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python -m kvlab ARGV`` in a fresh process (nothing shared with this one but files)."""
    env = {**os.environ, "KVLAB_CACHE_DIR": str(cache_dir)}
    return subprocess.run([sys.executable, "-m", "kvlab", *map(str, argv)], input=stdin, capture_output=True,
                          text=True, env=env, timeout=120)


def kvlab_in_one_process(cache_dir, argvs: list[list[str]]) -> subprocess.CompletedProcess:
    """Several ``kvlab`` commands in one fresh process (one interpreter start-up instead of several)."""
    code = "import json, sys; from kvlab.cli import main; sys.exit(max(main(a) for a in json.loads(sys.argv[1])))"
    env = {**os.environ, "KVLAB_CACHE_DIR": str(cache_dir)}
    return subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True, env=env,
                          timeout=120)


def run_json(capsys, *argv) -> dict:
    assert main(list(map(str, argv))) == 0
    return json.loads(capsys.readouterr().out)


def one_line_error(capsys, argv, fragment: str) -> str:
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kvlab: error: "), captured.err
    assert fragment in lines[0]
    return lines[0]


# -- one process compresses, another answers ----------------------------------------------------------------------
def test_compress_then_ask_in_another_process_answers_like_memory(cache_dir, document, tiny_gemma3, tmp_path,
                                                                   capsys):
    out = tmp_path / "doc.kv"
    compressed = kvlab(cache_dir, "compress", "--context-file", document, "--model", "tiny-llama", "--policy",
                       "snapkv", "--ratio", "0.5", "--out", out, "--json")
    assert compressed.returncode == 0, compressed.stderr
    made = json.loads(compressed.stdout)
    assert not made["from_store"] and made["path"] == str(out) and out.stat().st_size == made["file_bytes"]
    # Gemma 3's sliding-window layers too, compressed here and answered there. Its random model's greedy answer
    # repeats one token, so it samples (same seed): equal tokens then need equal distributions at every step.
    count = lambda text: len(tiny_gemma3.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    gemma_text = build_haystack(count, 300, seed=1, needle="The pass key is 77.", depth=0.3).text
    (tmp_path / "gemma.txt").write_text(gemma_text)
    gemma_made = run_json(capsys, "compress", "--context-file", tmp_path / "gemma.txt", "--model", "tiny-gemma3",
                          "--policy", "pyramidkv", "--out", tmp_path / "gemma.kv", "--json")

    asks = [["ask", "--cache", str(out), "--model", "tiny-llama", "--question", QUESTION, "--max-new-tokens", "8",
             "--json"],
            ["ask", "--cache", gemma_made["path"], "--model", "tiny-gemma3", "--question", QUESTION,
             "--temperature", "3", "--seed", "1", "--max-new-tokens", "8", "--json"]]
    asked = kvlab_in_one_process(cache_dir, asks)
    assert asked.returncode == 0, asked.stderr
    from_file, gemma_from_file = map(json.loads, asked.stdout.splitlines())

    in_memory = run_json(capsys, "ask", "--context-file", document, "--model", "tiny-llama", "--question", QUESTION,
                         "--policy", "snapkv", "--ratio", "0.5", "--max-new-tokens", "8", "--json")
    assert from_file["token_ids"] == in_memory["token_ids"] and len(set(in_memory["token_ids"])) > 1
    assert set(in_memory) | {"load_s"} <= set(from_file)
    for key in ("context_tokens", "kept_tokens", "kv_bytes_full", "kv_bytes_kept", "budget_tokens", "ratio",
                "policy", "policy_params", "question_tokens"):
        assert from_file[key] == in_memory[key], key
    assert from_file["load_s"] > 0 and from_file["compress_s"] == 0.0

    gemma_expected = Engine(tiny_gemma3).ask(gemma_text, QUESTION, make_policy("pyramidkv"), ratio=0.5,
                                             max_new_tokens=8, sampling=SamplingConfig(temperature=3.0, seed=1))
    assert gemma_from_file["token_ids"] == gemma_expected.token_ids and len(set(gemma_expected.token_ids)) > 1


def test_int8_file_through_the_cli(document, capsys):
    plain = run_json(capsys, "compress", "--context-file", document, "--model", "tiny-llama", "--policy", "snapkv",
                     "--json")
    quantized = run_json(capsys, "compress", "--context-file", document, "--model", "tiny-llama", "--policy",
                         "snapkv", "--quantize", "int8", "--json")
    assert quantized["key"] != plain["key"] and quantized["file_bytes"] < 0.6 * plain["file_bytes"]
    answer = run_json(capsys, "ask", "--cache", quantized["key"][:10], "--model", "tiny-llama", "--question",
                      QUESTION, "--max-new-tokens", "3", "--json")
    assert answer["extra"]["quantization"] == "int8" and answer["kv_bytes_kept"] == quantized["kv_bytes_kept"]


# -- chat: save, reopen, continue -------------------------------------------------------------------------------
def test_chat_save_then_ask_continues_the_conversation(cache_dir, document, tiny_llama, tmp_path, capsys):
    made = run_json(capsys, "compress", "--context-file", document, "--model", "tiny-llama", "--policy", "h2o",
                    "--ratio", "0.5", "--out", tmp_path / "doc.kv", "--json")
    first = "What is the pass key?"
    session = kvlab(cache_dir, "chat", "--cache", made["path"], "--model", "tiny-llama", "--max-new-tokens", "5",
                    stdin=f"\n/nonsense\n/save\n/save {tmp_path / 'early.kv'}\n{first}\n/stats\n"
                          f"/save {tmp_path / 'chat.kv'}\n/quit\nnever asked\n")
    assert session.returncode == 0, session.stderr
    lines = session.stdout.splitlines()
    assert lines[0].startswith("model> ") and lines[1].startswith("1 turns | ")
    assert lines[2].startswith("saved 1 turns to ") and len(lines) == 3
    assert "usage: /save FILE" in session.stderr and "nothing to save yet" in session.stderr
    assert not (tmp_path / "early.kv").exists()
    assert load_cache(tmp_path / "chat.kv").meta.extra["turns"] == 1

    follow = run_json(capsys, "ask", "--cache", tmp_path / "chat.kv", "--model", "tiny-llama", "--question",
                      "Are you sure?", "--max-new-tokens", "5", "--json")
    engine = Engine(tiny_llama)
    conversation = conversation_for(engine, open_document(engine, made["path"]))
    turn = conversation.ask(first, max_new_tokens=5)
    assert lines[0] == f"model> {turn.answer}"
    assert follow["token_ids"] == conversation.ask("Are you sure?", max_new_tokens=5).token_ids
    assert follow["kept_tokens"] == made["kept_tokens"]  # document tokens kept, as `kvlab ask` reports them


def test_chat_from_a_context_file_reads_until_end_of_input(document, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n/help\nWhy?\n/stats"))  # no /quit: end of input ends it
    assert main(["chat", "--context-file", str(document), "--model", "tiny-llama", "--policy", "streaming_llm",
                 "--budget", "64", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("model> ") and out[1].startswith("1 turns | ") and "kept" in out[1]
    (entry,) = [entry for entry in CacheStore().list() if entry.meta.policy == "streaming_llm"]
    assert entry.meta.budget_tokens == 64


# -- the store through `kvlab cache` -------------------------------------------------------------------------------
def test_cache_ls_rm_gc(document, tiny_llama, capsys):
    gc_all = main(["cache", "gc", "--max-size", "0"])
    assert gc_all == 0 and CacheStore().list() == []
    capsys.readouterr()
    first = run_json(capsys, "compress", "--context-file", document, "--model", "tiny-llama", "--policy", "knorm",
                     "--ratio", "0.5", "--json")
    again = run_json(capsys, "compress", "--context-file", document, "--model", "tiny-llama", "--policy", "knorm",
                     "--ratio", "0.5", "--json")
    assert again["from_store"] and again["key"] == first["key"] and again["prefill_s"] == 0.0
    # more entries (cheap, through the API) until two keys share a first character
    engine = Engine(tiny_llama)
    text = document.read_text()
    for ratio in (0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85):
        compress_document(engine, text, make_policy("knorm"), ratio=ratio)
    keys = [entry.key for entry in CacheStore().list()]
    assert len(keys) == 17

    assert main(["cache", "ls"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 18 and listing[-1].startswith("17 caches, ")
    assert {line.split()[0] for line in listing[:-1]} == {key[:12] for key in keys}
    assert main(["cache", "ls", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {row["key"] for row in rows} == set(keys) and {row["policy"] for row in rows} == {"knorm"}

    shared = next(key[0] for key in keys if sum(other[0] == key[0] for other in keys) > 1)
    one_line_error(capsys, ["cache", "rm", shared], "give more characters")
    one_line_error(capsys, ["cache", "rm", "xyz"], "no cache entry")
    one_line_error(capsys, ["cache", "gc", "--max-size", "12XB"], "cannot read size")
    one_line_error(capsys, ["cache", "gc", "--max-size", "2"], "has no unit")  # 2 bytes would empty the store
    assert len(CacheStore().list()) == 17
    assert main(["cache", "gc", "--max-size", "0", "--dry-run"]) == 0
    dry = capsys.readouterr().out.splitlines()
    assert dry[-1].startswith("would remove 17 caches") and len(dry) == 18
    assert len(CacheStore().list()) == 17  # nothing was removed
    assert main(["cache", "rm", first["key"][:10]]) == 0
    assert capsys.readouterr().out.startswith(f"removed {first['key'][:12]}")
    assert first["key"] not in {entry.key for entry in CacheStore().list()}
    assert main(["cache", "gc", "--max-size", "0"]) == 0
    assert capsys.readouterr().out.startswith("removed 16 caches")
    assert CacheStore().list() == [] and CacheStore().total_bytes() == 0


# -- mistakes ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_file(tmp_path_factory, tiny_gemma3):
    path = tmp_path_factory.mktemp("gemma") / "g.kv"
    engine = Engine(tiny_gemma3)
    document = compress_document(engine, "A short document about gardens. " * 8, make_policy("snapkv"), ratio=0.5,
                                 store=CacheStore(path.parent / "kv"))
    path.write_bytes(document.path.read_bytes())
    return path


def test_cache_for_another_model_names_it(gemma_file, capsys):
    for command in ("ask", "chat"):
        argv = [command, "--cache", gemma_file, "--model", "tiny-llama"] + (
            ["--question", QUESTION] if command == "ask" else [])
        line = one_line_error(capsys, argv, "made for model tiny-gemma3")
        assert "--model tiny-gemma3" in line


def test_truncated_and_missing_files_end_in_one_line(gemma_file, tmp_path, capsys):
    data = gemma_file.read_bytes()
    (tmp_path / "cut.kv").write_bytes(data[: len(data) - 100])
    ask = ["ask", "--model", "tiny-gemma3", "--question", QUESTION, "--cache"]
    one_line_error(capsys, [*ask, tmp_path / "cut.kv"], "truncated")
    one_line_error(capsys, [*ask, tmp_path / "missing.kv"], "no cache file")
    one_line_error(capsys, [*ask, tmp_path / "folder" / "doc"], "no cache file")
    one_line_error(capsys, [*ask, "0123abcd"], "no cache entry")
    one_line_error(capsys, [*ask, gemma_file, "--max-new-tokens", "0"], "max_new_tokens")


@pytest.mark.parametrize("extra", [["--policy", "snapkv"], ["--ratio", "0.5"], ["--budget", "10"],
                                   ["-p", "window_tokens=8"], ["--query-aware"]])
def test_ask_cache_refuses_other_policy_settings(gemma_file, capsys, extra):
    one_line_error(capsys, ["ask", "--cache", gemma_file, "--model", "tiny-gemma3", "--question", QUESTION, *extra],
                   "drop --")


def test_chat_cache_refuses_other_policy_settings(gemma_file, capsys):
    one_line_error(capsys, ["chat", "--cache", gemma_file, "--model", "tiny-gemma3", "--policy", "h2o"], "drop --")


def test_compress_out_that_cannot_be_written(document, capsys):
    one_line_error(capsys, ["compress", "--context-file", document, "--model", "tiny-llama", "--out",
                            "/proc/no-such-dir/doc.kv", "--json"], "cannot write")


def test_a_store_that_cannot_be_written(document, tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path / "a-file"))
    one_line_error(capsys, ["compress", "--context-file", document, "--model", "tiny-llama", "--json"],
                   "cannot write to the cache store")


def test_compress_without_a_policy_uses_the_recommended_recipe(document, capsys):
    from kvlab.store.documents import DEFAULT_RECIPE

    made = run_json(capsys, "compress", "--model", "tiny-llama", "--context-file", document, "--json")
    assert made["policy"] == DEFAULT_RECIPE.policy and made["ratio"] == DEFAULT_RECIPE.ratio
    assert made["kv_quant"]["scheme"] == DEFAULT_RECIPE.kv_quant.scheme
    assert made["kv_quant"]["residual_tokens"] == DEFAULT_RECIPE.kv_quant.residual_tokens
    assert made["compression"] > 4
    # each part can be overridden; --kv-quant none and --policy full give the plain cache
    plain = run_json(capsys, "compress", "--model", "tiny-llama", "--context-file", document, "--json",
                     "--policy", "full", "--kv-quant", "none")
    assert plain["policy"] == "full" and plain["kv_quant"] is None and plain["compression"] < 1.01
    mine = run_json(capsys, "compress", "--model", "tiny-llama", "--context-file", document, "--json",
                    "--ratio", "0.5", "--kv-quant", "int8")
    assert mine["policy"] == DEFAULT_RECIPE.policy and mine["ratio"] == 0.5 and mine["kv_quant"]["scheme"] == "int8"


# -- context extension: a cache remembers it ------------------------------------------------------------------------
def test_a_cache_made_with_extend_needs_it_and_says_so(document, tmp_path, capsys):
    """Keys rotated under Self-Extend mean something else without it: `ask --cache` refuses either mismatch in one
    line naming the flag, and answers with it."""
    extend = "self-extend:group=4:window=64"
    made = run_json(capsys, "compress", "--context-file", document, "--model", "tiny-llama", "--extend", extend,
                    "--out", tmp_path / "extended.kv", "--json")
    assert made and load_cache(tmp_path / "extended.kv").meta.extra["extension"] == extend
    one_line_error(capsys, ["ask", "--cache", tmp_path / "extended.kv", "--model", "tiny-llama", "--question",
                            QUESTION], f"pass --extend {extend}")
    answer = run_json(capsys, "ask", "--cache", tmp_path / "extended.kv", "--model", "tiny-llama", "--extend", extend,
                      "--question", QUESTION, "--max-new-tokens", "4", "--json")
    assert answer["answer"] is not None
    run_json(capsys, "compress", "--context-file", document, "--model", "tiny-llama", "--out", tmp_path / "plain.kv",
             "--json")
    one_line_error(capsys, ["ask", "--cache", tmp_path / "plain.kv", "--model", "tiny-llama", "--extend", extend,
                            "--question", QUESTION], "drop --extend")
    one_line_error(capsys, ["ask", "--cache", tmp_path / "plain.kv", "--model", "tiny-llama", "--extend", "ntk",
                            "--question", QUESTION], "unknown --extend 'ntk'")

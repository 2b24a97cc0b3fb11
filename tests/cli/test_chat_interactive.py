"""`kvlab chat` as a chat: answers stream while they are decoded, Ctrl-C stops only the answer (its text so far
stays in the conversation, exactly as an answer cut at --max-new-tokens does), slash commands, a persisted session
written at its end, what a resumed chat says it restored, and the whole thing in a real terminal (tmux).
Tiny Llama; the in-process tests take a few seconds each, the tmux one about ten."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from kvlab.bench.haystack import build_haystack
from kvlab.cli import main
from kvlab.cli.chat_session import AnswerPrinter, ChatSession, describe_time
from kvlab.engine import Engine, SamplingConfig
from kvlab.engine.runner import ModelRunner
from kvlab.policies import make_policy
from kvlab.store import load_cache
from kvlab.store.documents import compress_document, conversation_for, open_document

QUESTION = "What is the pass key?"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kvlab-cache")


@pytest.fixture(autouse=True)
def store_in_tmp(cache_dir, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(cache_dir))


@pytest.fixture(scope="module")
def document_kv(tiny_llama, cache_dir, tmp_path_factory):
    """An h2o-compressed 300-token haystack on the tiny Llama, as a .kv file."""
    count = lambda text: len(tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    text = build_haystack(count, 300, seed=0, needle="The pass key is 4242.", depth=0.5).text
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVLAB_CACHE_DIR", str(cache_dir))
        made = compress_document(Engine(tiny_llama), text, make_policy("h2o"), ratio=0.5)
    path = tmp_path_factory.mktemp("docs") / "doc.kv"
    shutil.copyfile(made.path, path)
    return path


def chat(monkeypatch, capsys, stdin: str, *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", "--model", "tiny-llama", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reference(tiny_llama, document_kv):
    engine = Engine(tiny_llama)
    return conversation_for(engine, open_document(engine, str(document_kv)))


class Recorder(io.StringIO):
    """stdout that logs each write between the decoder's forward passes."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events

    def write(self, text: str) -> int:
        self.events.append(("write", text))
        return super().write(text)


# -- streaming ---------------------------------------------------------------------------------------------------
def test_answer_streams_between_decode_steps_and_prints_the_stored_answer(tiny_llama, document_kv, monkeypatch):
    events: list = []
    step = ModelRunner.step

    def logged_step(runner, token):
        events.append(("step", token))
        return step(runner, token)

    monkeypatch.setattr(ModelRunner, "step", logged_step)
    monkeypatch.setattr(sys, "stdout", Recorder(events))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n"))
    assert main(["chat", "--cache", str(document_kv), "--model", "tiny-llama", "--max-new-tokens", "12"]) == 0

    writes = [index for index, (kind, _) in enumerate(events) if kind == "write"]
    steps = [index for index, (kind, _) in enumerate(events) if kind == "step"]
    printed = "".join(text for kind, text in events if kind == "write")
    expected = reference(tiny_llama, document_kv).ask(QUESTION, max_new_tokens=12)
    assert len(expected.answer) > 3
    assert len(steps) == 11  # 12 tokens sampled, the last one never fed
    # text reached stdout before the last forward pass, and more than once: it streamed
    assert writes[0] < steps[-1] and sum(1 for index in writes if index < steps[-1]) >= 2
    assert printed == f"model> {expected.answer}\n"


def test_printer_strips_like_the_stored_answer_and_escapes_controls_on_a_terminal():
    out = io.StringIO()
    printer = AnswerPrinter(out, escape_controls=True)
    for delta in (" ", "\n ", "Hello", " ", "\x1b[2J", "world\t ", " \n"):
        printer(delta)
    printer.finish()
    assert out.getvalue() == "model> Hello \\x1b[2Jworld\n"
    piped = io.StringIO()
    printer = AnswerPrinter(piped, escape_controls=False)
    printer("a\x1bb ")
    printer.finish()
    assert piped.getvalue() == "model> a\x1bb\n"


# -- Ctrl-C during an answer -------------------------------------------------------------------------------------
def test_ctrl_c_stops_the_answer_keeps_its_text_and_the_session_goes_on(tiny_llama, document_kv, monkeypatch,
                                                                         capsys):
    engine = Engine(tiny_llama)
    session = ChatSession(engine, open_document(engine, str(document_kv)), 40, SamplingConfig())
    steps = []
    step = ModelRunner.step

    def step_then_ctrl_c(runner, token):
        steps.append(token)
        if len(steps) == 3 and not session.conversation.turns:  # the first answer only
            os.kill(os.getpid(), signal.SIGINT)
        return step(runner, token)

    monkeypatch.setattr(ModelRunner, "step", step_then_ctrl_c)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\nAnd then?\n/stats\n"))
    assert session.run() == 0
    out, err = capsys.readouterr()
    first, second = session.conversation.turns
    assert first.stopped_by == "interrupted" and 3 <= len(first.token_ids) <= 5
    assert "interrupted after" in err and "partial answer stays" in err
    assert second.stopped_by != "interrupted"
    lines = out.splitlines()
    assert lines[0] == f"model> {first.answer}" and lines[-1].startswith("2 turns | ")

    # the interrupted answer is in the conversation as an answer cut at that many tokens would be
    cut = reference(tiny_llama, document_kv)
    assert cut.ask(QUESTION, max_new_tokens=len(first.token_ids)).token_ids == first.token_ids
    assert cut.ask("And then?", max_new_tokens=40).token_ids == second.token_ids


# -- slash commands ------------------------------------------------------------------------------------------------
def test_stats_reset_help_and_unknown_commands(tiny_llama, document_kv, monkeypatch, capsys):
    code, out, err = chat(monkeypatch, capsys, f"/stats\n{QUESTION}\n/stats\n/reset\n/stats\n/help\n/frobnicate\n",
                          "--cache", document_kv, "--max-new-tokens", "6")
    assert code == 0
    before, answer, during, after = out.splitlines()
    expected = reference(tiny_llama, document_kv)
    start_tokens, start_bytes = expected.cache.num_tokens, expected.cache.held_bytes
    assert before.startswith(f"0 turns | {start_tokens} tokens seen | ") and "no answer yet" in before
    turn = expected.ask(QUESTION, max_new_tokens=6)
    assert answer == f"model> {turn.answer}"
    cache = expected.cache
    assert during.startswith(f"1 turns | {cache.num_tokens} tokens seen | kept {cache.kept_tokens():.0f} tok/head")
    assert f"KV {cache.held_bytes / 2**20:.2f} MiB held in memory" in during
    assert cache.num_tokens > start_tokens and cache.held_bytes > start_bytes
    assert f"last answer {len(turn.token_ids)} tok at " in during
    assert after.startswith(f"0 turns | {start_tokens} tokens seen | ")
    assert f"KV {start_bytes / 2**20:.2f} MiB" in after
    assert "back to the start: 0 turns" in err and "/reset" in err and "/save [FILE]" in err
    hint = [line for line in err.splitlines() if "/frobnicate" in line]
    assert hint == ["unknown command /frobnicate; try /help, /stats, /save FILE, /reset or /quit"]


def test_a_persisted_session_is_written_when_it_ends(document_kv, tmp_path, monkeypatch, capsys):
    target = tmp_path / "chat.kv"
    code, out, err = chat(monkeypatch, capsys, f"{QUESTION}\n/save\nWhy?\n", "--cache", document_kv,
                          "--max-new-tokens", "4", "--save", target)
    assert code == 0
    saved = [line for line in out.splitlines() if line.startswith("saved ")]
    assert len(saved) == 2 and saved[0].startswith(f"saved 1 turns to {target} (")  # /save alone: the --save file
    assert saved[1].startswith(f"saved 2 turns to {target} (")  # the end of the session
    assert load_cache(target).meta.extra["turns"] == 2

    # without a save file the end of the session says what it drops, and writes nothing
    code, out, err = chat(monkeypatch, capsys, f"{QUESTION}\n", "--cache", document_kv, "--max-new-tokens", "4")
    assert code == 0 and "saved" not in out and "1 turns not saved (/save FILE" in err
    assert one_line_error(monkeypatch, capsys, ["--cache", document_kv, "--save", " "], "--save is empty")


def one_line_error(monkeypatch, capsys, argv, fragment: str) -> bool:
    code, _, err = chat(monkeypatch, capsys, "", *argv)
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("kvlab: error: ") and fragment in lines[0]


# -- resuming ------------------------------------------------------------------------------------------------------
def test_a_resumed_chat_says_what_it_restored(document_kv, tmp_path, monkeypatch, capsys):
    target = tmp_path / "resume.kv"
    chat(monkeypatch, capsys, f"{QUESTION}\nWhy?\n/save {target}\n", "--cache", document_kv, "--max-new-tokens",
         "4")
    meta = load_cache(target).meta
    code, out, err = chat(monkeypatch, capsys, "/stats\n", "--cache", target)
    assert code == 0
    restored = err.splitlines()[0]
    saved_at = datetime.fromisoformat(meta.extra["saved_at"])
    assert restored.startswith(f"restored a chat: 2 turns, {meta.num_tokens} tokens ({meta.context_tokens} of them "
                               f"the document), h2o cache of ")
    assert restored.endswith(f", saved {describe_time(meta.extra['saved_at'])}")
    assert f", saved {saved_at:%Y-%m-%d %H:%M} UTC (" in restored
    assert out.startswith(f"2 turns | {meta.num_tokens} tokens seen | ")

    # a fresh document is not a restored chat
    _, _, err = chat(monkeypatch, capsys, "", "--cache", document_kv)
    assert "restored" not in err and err.splitlines()[0].startswith(f"{meta.context_tokens}-token document, h2o")


def test_describe_time_names_the_age():
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert describe_time("2026-12-01T11:59:30+00:00", now) == "2026-12-01 11:59 UTC (just now)"
    assert describe_time("2026-12-01T11:15:00+00:00", now) == "2026-12-01 11:15 UTC (45 min ago)"
    assert describe_time("2026-12-01T02:00:00+00:00", now) == "2026-12-01 02:00 UTC (10 h ago)"
    assert describe_time("2026-11-28T12:00:00+00:00", now) == "2026-11-28 12:00 UTC (3 days ago)"
    assert describe_time("yesterday", now) == "yesterday"


# -- a real terminal -----------------------------------------------------------------------------------------------
TMUX = shutil.which("tmux")


class Pane:
    """A detached tmux session on its own server socket, read with capture-pane."""

    def __init__(self, name: str, command: str) -> None:
        self.base = [TMUX, "-L", name]
        subprocess.run([*self.base, "new-session", "-d", "-s", "chat", "-x", "200", "-y", "50", command], check=True)

    def text(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p", "-J", "-S", "-200", "-t", "chat"],
                              capture_output=True, text=True).stdout

    def send(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "chat", *keys], check=True)

    def wait(self, predicate, what: str, timeout_s: float = 90.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.text()
            if predicate(text):
                return text
            time.sleep(0.05)
        raise AssertionError(f"no {what} in the pane after {timeout_s:.0f} s:\n{self.text()}")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_in_a_terminal_streams_stops_on_ctrl_c_and_keeps_the_session(document_kv, cache_dir, tmp_path):
    saved = tmp_path / "tmux-chat.kv"
    command = (f"cd {tmp_path} && KVLAB_CACHE_DIR={cache_dir} {sys.executable} -m kvlab chat --cache {document_kv} "
               f"--model tiny-llama --max-new-tokens 3000 --force --save {saved}; echo chat-exited-$?; sleep 60")
    pane = Pane(f"kvlab-test-{os.getpid()}", command)
    try:
        pane.wait(lambda text: "you>" in text, "prompt", timeout_s=150)  # interpreter, torch and model start-up
        pane.send(QUESTION, "Enter")
        # streaming: answer text is on screen while the answer is still being decoded (no turn figures yet)
        streaming = pane.wait(lambda text: len(text.partition("model> ")[2].split("\n")[0]) >= 3, "streamed text")
        assert "tok in" not in streaming
        pane.send("C-c")
        stopped = pane.wait(lambda text: text.rstrip().endswith("you>"), "prompt after Ctrl-C")
        assert "[interrupted after " in stopped, stopped
        pane.send("/stats", "Enter")
        pane.wait(lambda text: "1 turns | " in text, "/stats line")
        pane.send("C-d")
        ended = pane.wait(lambda text: "chat-exited-" in text, "end of session", timeout_s=30)
        assert "chat-exited-0" in ended and f"saved 1 turns to {saved}" in ended
    finally:
        pane.close()
    meta = load_cache(saved).meta
    assert meta.extra["turns"] == 1 and len(meta.extra["pending_token_ids"]) == 1  # cut short: last token pending
    history = (cache_dir / "chat_history").read_text()
    assert QUESTION in history and "/stats" in history

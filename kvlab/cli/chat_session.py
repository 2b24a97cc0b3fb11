"""The interactive loop of ``kvlab chat``: streamed answers, Ctrl-C that stops only the answer, line editing with a
history file, slash commands, and saving a persisted session when it ends.

Answers go to stdout (``model> …``, streamed as decoded) and command results too; notes, per-turn figures and
errors go to stderr, so piped output holds the answers and command results alone. The ``you>`` prompt and line
editing are offered only when stdin is a terminal.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from kvlab.engine import Engine, compression
from kvlab.engine.conversation import Conversation, Turn
from kvlab.engine.sampling import SamplingConfig
from kvlab.errors import KvlabError
from kvlab.models.convert import cache_root
from kvlab.store.documents import conversation_for, save_conversation
from kvlab.store.format import LoadedCache
from kvlab.store.meta import utc_now
from kvlab.units import format_mib, per_second

HELP = """commands:
  /stats        turns, tokens and KV bytes held in memory, the last answer's tokens/s
  /save [FILE]  write the session to a .kv file; from then on the session is persisted there: /save alone and
                the end of the session write it again (`kvlab chat --cache FILE` resumes it)
  /reset        drop this session's turns: back to the document (or to the chat as it was resumed)
  /help         this list
  /quit         end the session (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while an answer streams stops that answer and returns to the prompt; the text printed so far stays in the
conversation as that turn's answer (as an answer cut at --max-new-tokens does)."""
HISTORY_FILE = "chat_history"  # under the kvlab cache folder ($KVLAB_CACHE_DIR)
HISTORY_LINES = 1000


@dataclass
class ChatSession:
    """One ``kvlab chat`` session over ``loaded``. ``save_path`` set means the session is persisted there: the
    end of the session writes the turns not yet saved."""

    engine: Engine
    loaded: LoadedCache
    max_new_tokens: int
    sampling: SamplingConfig
    force: bool = False
    save_path: str | None = None
    conversation: Conversation = field(init=False)
    last_turn: Turn | None = field(default=None, init=False)
    unsaved_turns: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.conversation = conversation_for(self.engine, self.loaded)

    def run(self) -> int:
        terminal = sys.stdin.isatty()
        save_history = enable_line_editing(cache_root() / HISTORY_FILE) if terminal else None
        try:
            while True:
                line = read_line(terminal)
                if line is None or line in ("/quit", "/exit"):
                    break
                if line.startswith("/"):
                    self.command(line)
                elif line:
                    self.answer(line)
        finally:
            if save_history is not None:
                save_history()
        self.end()
        return 0

    # -- answers -----------------------------------------------------------------------------------------------
    def answer(self, question: str) -> None:
        printer = AnswerPrinter(sys.stdout, escape_controls=sys.stdout.isatty())
        with interrupt_flag() as interrupted:
            try:
                turn = self.conversation.ask(question, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                                             force=self.force, on_text=printer, interrupted=interrupted)
            except KvlabError as error:
                printer.abandon()
                print(f"kvlab: error: {error}", file=sys.stderr)
                return
        printer.finish()
        self.last_turn, self.unsaved_turns = turn, self.unsaved_turns + 1
        speed = f"{len(turn.token_ids)} tok in {turn.decode_s:.1f} s, {tokens_per_s(turn):.1f} tok/s"
        note = " | re-compressed" if turn.recompressed else ""
        if turn.stopped_by == "interrupted":
            speed = f"interrupted after {speed}; the partial answer stays in the conversation"
        print(f"[{speed} | kept {turn.kept_tokens:.0f} tok/head{note}]", file=sys.stderr)

    # -- slash commands ----------------------------------------------------------------------------------------
    def command(self, line: str) -> None:
        name, _, argument = line.partition(" ")
        if name == "/stats":
            print(self.stats())
        elif name == "/save":
            self.save(argument.strip())
        elif name == "/reset":
            self.conversation, self.unsaved_turns = conversation_for(self.engine, self.loaded), 0
            print(f"back to the start: {self.conversation.answered} turns, {self.conversation.cache.num_tokens} "
                  f"tokens", file=sys.stderr)
        elif name == "/help":
            print(HELP, file=sys.stderr)
        else:
            print(f"unknown command {name}; try /help, /stats, /save FILE, /reset or /quit", file=sys.stderr)

    def stats(self) -> str:
        """Turns, tokens seen, tokens kept per head, ``kv_bytes_kept`` with its ``compression``, the last answer's
        decode tokens/s: the definitions of ``kvlab ask --json``."""
        conversation, cache = self.conversation, self.conversation.cache
        held = cache.held_bytes
        last = "no answer yet in this session" if self.last_turn is None else (
            f"last answer {len(self.last_turn.token_ids)} tok at {tokens_per_s(self.last_turn):.1f} tok/s")
        return (f"{conversation.answered} turns | {cache.num_tokens} tokens seen | kept {cache.kept_tokens():.0f} "
                f"tok/head | KV {format_mib(held)} held in memory, compression "
                f"{compression(cache.kv_bytes_full_fp16, held):.2f}x | {last}")

    def save(self, target: str) -> bool:
        target = target or (self.save_path or "")
        if not target:
            print("usage: /save FILE (after that, /save alone writes the same file again)", file=sys.stderr)
            return False
        self.loaded.meta.extra["saved_at"] = utc_now()  # shown when the chat is resumed
        try:
            written = save_conversation(target, self.engine, self.conversation, self.loaded)
        except KvlabError as error:
            print(f"kvlab: error: {error}", file=sys.stderr)
            return False
        self.save_path, self.unsaved_turns = target, 0
        print(f"saved {self.conversation.answered} turns to {target} ({format_mib(written)})")
        return True

    def end(self) -> None:
        """At the end of the session: write a persisted session's new turns; say what an unpersisted one drops."""
        if not self.unsaved_turns:
            return
        if self.save_path is not None:
            self.save(self.save_path)
        else:
            print(f"{self.unsaved_turns} turns not saved (/save FILE, or --save FILE from the start, keeps them)",
                  file=sys.stderr)


def restored_message(loaded: LoadedCache, conversation: Conversation) -> str:
    """What a resumed chat restored: turns, tokens, policy, when it was saved."""
    meta, cache = loaded.meta, conversation.cache
    saved_at = meta.extra.get("saved_at")
    when = f"saved {describe_time(saved_at)}" if saved_at else f"document compressed {describe_time(meta.created_at)}"
    return (f"restored a chat: {conversation.answered} turns, {cache.num_tokens} tokens "
            f"({meta.context_tokens} of them the document), {meta.policy} cache of {format_mib(cache.held_bytes)}, "
            f"{when}")


def describe_time(iso: str, now: datetime | None = None) -> str:
    """``'2026-12-01T23:10:00+00:00'`` → ``'2026-12-01 23:10 UTC (3 h ago)'``; an unreadable stamp as is."""
    try:
        moment = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return str(iso)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    if seconds < 60:
        age = "just now"
    elif seconds < 3600:
        age = f"{seconds // 60:.0f} min ago"
    elif seconds < 86400:
        age = f"{seconds // 3600:.0f} h ago"
    else:
        age = f"{seconds // 86400:.0f} days ago"
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC ({age})"


def tokens_per_s(turn: Turn) -> float:
    """Decode tokens per second of one answer (``decode_tokens_per_s`` of ``kvlab ask --json``)."""
    return per_second(len(turn.token_ids), turn.decode_s)


class AnswerPrinter:
    """Writes an answer's text deltas as they are decoded, after ``model> ``. Leading whitespace is dropped and
    trailing whitespace held back until more text follows, so the printed line is the stored (stripped) answer.
    With ``escape_controls`` (a terminal) control characters other than newline and tab are shown escaped
    (``\\x1b``), so a model's output cannot drive the terminal."""

    def __init__(self, out: TextIO, *, escape_controls: bool) -> None:
        self.out, self.escape_controls = out, escape_controls
        self.started = False
        self.held = ""

    def __call__(self, delta: str) -> None:
        if not self.started:
            delta = delta.lstrip()
            if not delta:
                return
            self._begin()
        text = self.held + delta
        body = text.rstrip()
        self.held = text[len(body):]
        if body:
            self.out.write(_escape(body) if self.escape_controls else body)
            self.out.flush()

    def finish(self) -> None:
        if not self.started:
            self._begin()
        self.out.write("\n")
        self.out.flush()

    def abandon(self) -> None:
        """End a line already started (an error cut the answer off); print nothing otherwise."""
        if self.started:
            self.out.write("\n")
            self.out.flush()

    def _begin(self) -> None:
        self.started = True
        self.out.write("model> ")


def _escape(text: str) -> str:
    return "".join(char if char.isprintable() or char in "\n\t" else char.encode("unicode_escape").decode("ascii")
                   for char in text)


@contextmanager
def interrupt_flag() -> Iterator[Callable[[], bool]]:
    """While inside, Ctrl-C (SIGINT) sets a flag instead of raising ``KeyboardInterrupt``; yields the flag's
    reader. The decoder polls it between tokens, so the cache is never left mid-step. Off the main thread (where
    signal handlers cannot be set) the flag never rises."""
    raised = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield raised.is_set
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: raised.set())
    try:
        yield raised.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def read_line(terminal: bool) -> str | None:
    """The next line of input, stripped; None at end of input or on Ctrl-C at the prompt. The ``you>`` prompt is
    shown only to a terminal."""
    try:
        if terminal:
            return input("you> ").strip()
        line = sys.stdin.readline()
    except (EOFError, KeyboardInterrupt):
        if terminal:
            print(file=sys.stderr)
        return None
    return line.strip() if line else None


def enable_line_editing(history: Path) -> Callable[[], None] | None:
    """Arrow keys, line editing and a persistent history for ``input()`` through the standard ``readline``
    module; returns the function that writes the history back, or None where readline is unavailable."""
    try:
        import readline
    except ImportError:  # some Python builds (Windows, minimal images) have none: plain input() still works
        return None
    try:
        readline.read_history_file(history)
    except OSError:  # no history yet, or unreadable: start empty
        pass
    readline.set_history_length(HISTORY_LINES)

    def save_history() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError as error:
            print(f"kvlab: note: chat history not written to {history} ({error.strerror}); set KVLAB_CACHE_DIR to "
                  f"a writable folder to keep it", file=sys.stderr)

    return save_history

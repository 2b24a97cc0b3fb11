"""kvlab chat: an interactive multi-turn session over one document's compressed cache."""

from __future__ import annotations

import argparse
import sys

HELP = "commands: /save FILE  keep the session in a .kv file | /stats  cache size | /quit (or Ctrl-D)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cache", help="a .kv file from `kvlab compress` (or a saved chat), or a store key prefix")
    source.add_argument("--context-file", help="a document to prefill and compress first")
    from kvlab.cli.common import add_kv_quant_argument, add_model_arguments, add_policy_arguments

    add_model_arguments(parser)
    add_policy_arguments(parser)
    add_kv_quant_argument(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="run past the model's window")


def run(args: argparse.Namespace) -> int:
    from kvlab.cli.common import kv_quant_from_args, policy_from_args, ratio_from_args, read_text
    from kvlab.engine import Engine, SamplingConfig
    from kvlab.errors import KvlabError
    from kvlab.models import load_model
    from kvlab.store.documents import compress_document, conversation_for, open_document, save_conversation
    from kvlab.units import format_mib

    for flag, value in (("--cache", args.cache), ("--context-file", args.context_file)):
        if value is not None and not value.strip():
            from kvlab.errors import ParameterError

            raise ParameterError(f"{flag} is empty; give a file path (or, for --cache, a store key prefix)")
    if args.cache:
        from kvlab.cli.ask import refuse_policy_flags

        refuse_policy_flags(args)
    if args.max_new_tokens < 1:
        raise KvlabError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    engine = Engine(load_model(args.model, device=args.device, dtype=args.dtype, weights=args.weights,
                               progress=True))
    if args.context_file:
        from kvlab.cli.compress import store_document

        text, policy = read_text(args.context_file), policy_from_args(args)
        document = store_document(lambda: compress_document(engine, text, policy, ratio=ratio_from_args(args),
                                                            budget_tokens=args.budget, force=args.force,
                                                            quantization=kv_quant_from_args(args), progress=True))
        source = str(document.path)
    else:
        source = args.cache
    loaded = open_document(engine, source, kv_quant=kv_quant_from_args(args))
    conversation = conversation_for(engine, loaded)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(f"{loaded.meta.context_tokens}-token document, {loaded.meta.policy} cache of "
          f"{format_mib(conversation.cache.held_bytes)}; {HELP}", file=sys.stderr)
    while True:
        line = _read_line()
        if line is None:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/stats":
            print(f"{conversation.answered} turns | {conversation.cache.num_tokens} tokens seen | kept "
                  f"{conversation.cache.kept_tokens():.0f} tok/head | KV {format_mib(conversation.cache.held_bytes)}")
            continue
        if line == "/save" or line.startswith("/save "):
            target = line.removeprefix("/save").strip()
            if not target:
                print("usage: /save FILE", file=sys.stderr)
                continue
            try:
                written = save_conversation(target, engine, conversation, loaded)
                print(f"saved {conversation.answered} turns to {target} ({format_mib(written)})")
            except KvlabError as error:
                print(f"kvlab: error: {error}", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(HELP, file=sys.stderr)
            continue
        try:
            turn = conversation.ask(line, max_new_tokens=args.max_new_tokens, sampling=sampling, force=args.force)
        except KvlabError as error:
            print(f"kvlab: error: {error}", file=sys.stderr)
            continue
        print(f"model> {turn.answer}")
        note = " | re-compressed" if turn.recompressed else ""
        print(f"[{len(turn.token_ids)} tok in {turn.decode_s:.1f} s | kept {turn.kept_tokens:.0f} tok/head{note}]",
              file=sys.stderr)


def _read_line() -> str | None:
    """The next line of input, stripped; None at end of input. The ``you>`` prompt is shown only to a terminal, so
    piped output holds the answers and command results alone."""
    if sys.stdin.isatty():
        try:
            return input("you> ").strip()
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.strip() if line else None

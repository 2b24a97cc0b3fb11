"""kvlab chat: an interactive multi-turn session over one document's compressed cache (the loop itself, with
streaming, Ctrl-C, line editing and slash commands, is ``cli.chat_session``)."""

from __future__ import annotations

import argparse
import sys


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
    parser.add_argument("--save", metavar="FILE", default=None,
                        help="persist the session in FILE: written by /save and again when the session ends")
    parser.epilog = ("in the session: /stats, /save [FILE], /reset, /help, /quit\n"
                     "Ctrl-C stops the answer being streamed (its text so far stays in the conversation);\n"
                     "Ctrl-C or Ctrl-D at the prompt ends the session (writing it first if it has a --save file)")


def run(args: argparse.Namespace) -> int:
    from kvlab.cli.chat_session import ChatSession, restored_message
    from kvlab.cli.common import kv_quant_from_args, load_model_from_args, policy_from_args, ratio_from_args, read_text
    from kvlab.engine import Engine, SamplingConfig
    from kvlab.errors import KvlabError
    from kvlab.store.documents import compress_document, open_document
    from kvlab.units import format_mib

    for flag, value in (("--cache", args.cache), ("--context-file", args.context_file), ("--save", args.save)):
        if value is not None and not value.strip():
            from kvlab.errors import ParameterError

            raise ParameterError(f"{flag} is empty; give a file path (or, for --cache, a store key prefix)")
    if args.cache:
        from kvlab.cli.ask import refuse_policy_flags

        refuse_policy_flags(args)
    if args.max_new_tokens < 1:
        raise KvlabError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    engine = Engine(load_model_from_args(args))
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
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    session = ChatSession(engine, loaded, args.max_new_tokens, sampling, force=args.force, save_path=args.save)
    conversation = session.conversation
    if conversation.turns_before:
        print(restored_message(loaded, conversation), file=sys.stderr)
    else:
        print(f"{loaded.meta.context_tokens}-token document, {loaded.meta.policy} cache of "
              f"{format_mib(conversation.cache.held_bytes)}", file=sys.stderr)
    print("ask a question; /help lists the commands; Ctrl-C stops an answer, Ctrl-D ends the session",
          file=sys.stderr)
    return session.run()

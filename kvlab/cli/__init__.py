# PYTHON_ARGCOMPLETE_OK
"""``kvlab`` command line: a small dispatcher; each subcommand lives in its own module, imported on use, so
``kvlab --help`` starts without importing torch. Shell completion: ``eval "$(register-python-argcomplete kvlab)"``
(argcomplete); the marker above lets argcomplete's global completion find this entry point too."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kvlab import __version__

SUBCOMMANDS = {
    "ask": "prefill a document, compress its KV cache with a policy, answer a question",
    "policies": "list the KV-cache policies, their parameters and papers",
    "models": "list the embedded models and whether their converted weights are cached",
    "profile": "measure which attention heads retrieve from the context, once per model (duo reads it); --show",
    "haystack": "write a generated long document with a hidden passkey (for trying policies)",
    "compress": "prefill a document once, compress its KV cache and persist it (.kv file, content-addressed store)",
    "chat": "an interactive multi-turn session over a document's compressed cache",
    "cache": "list, remove and garbage-collect persisted caches (ls, rm, gc)",
    "bench": "sweep policies x ratios over long-context tasks (one prefill per sample) and write a report",
    "report": "rebuild the tables and plots of a bench folder",
    "serve": "an OpenAI-compatible HTTP server with compressed document caches and session reuse",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlab", description="Fit a long document into a KV-cache budget and measure what it costs.",
        epilog="examples:\n  kvlab haystack --tokens 2000 --out doc.txt\n"
               "  kvlab ask --context-file doc.txt --question 'What is the pass key?' --policy snapkv --ratio 0.75\n"
               "  kvlab policies show snapkv",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kvlab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"kvlab.cli.{name}")
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions: argcomplete answers and exits here
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    from kvlab.errors import KvlabError

    try:
        return args.run(args) or 0
    except KvlabError as error:
        print(f"kvlab: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130


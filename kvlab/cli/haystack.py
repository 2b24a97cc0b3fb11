"""kvlab haystack: write a generated document of N model tokens with a passkey hidden at a chosen depth."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=2000,
                        help="document length in the model's tokens (default: 2000)")
    parser.add_argument("--passkey", default="68219", help="the value to hide (default: 68219)")
    parser.add_argument("--depth", type=float, default=0.5, help="where to hide it: 0 = start, 1 = end (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="text generator seed (default: 0)")
    parser.add_argument("--model", default="smollm2-135m", help="model whose tokenizer measures the length")
    parser.add_argument("--out", required=True, help="output file ('-' for stdout)")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from kvlab.bench.haystack import build_haystack
    from kvlab.errors import ParameterError
    from kvlab.models import load_model

    if args.tokens < 50:
        raise ParameterError(f"--tokens must be at least 50 (got {args.tokens})")
    if not 0 <= args.depth <= 1:
        raise ParameterError(f"--depth must be in [0, 1] (got {args.depth})")
    tokenizer = load_model(args.model, progress=True).tokenizer
    needle = f"The pass key is {args.passkey}. Remember it. {args.passkey} is the pass key."
    haystack = build_haystack(lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                              args.tokens, seed=args.seed, needle=needle, depth=args.depth)
    if args.out == "-":
        sys.stdout.write(haystack.text + "\n")
    else:
        Path(args.out).write_text(haystack.text + "\n", encoding="utf-8")
        print(f"wrote {args.out}: ~{args.tokens} tokens, passkey {args.passkey} at depth {args.depth}",
              file=sys.stderr)
    return 0

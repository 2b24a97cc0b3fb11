"""kvlab report: rebuild the tables and plots of a bench folder from its results.jsonl."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a folder written by `kvlab bench --out`")


def run(args: argparse.Namespace) -> int:
    from kvlab.bench.session import report_folder

    paths = report_folder(args.folder)
    print(paths["header"])  # the same lines `kvlab bench` printed for this folder
    print()
    print(paths["table"])
    print(f"report: {paths['html']}")
    return 0

"""kvlab policies [show NAME]: what each policy keeps, its parameters and its paper."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    parser.add_argument("name", nargs="?", help="policy name for `show`")


def run(args: argparse.Namespace) -> int:
    from kvlab.errors import ParameterError
    from kvlab.policies import POLICIES
    from kvlab.policies.catalog import parameter_rows, short_parameters

    if args.action == "show":
        if not args.name:
            raise ParameterError("`kvlab policies show` needs a policy name, e.g. `kvlab policies show snapkv`")
        cls = POLICIES.get(args.name)
        print(f"{args.name}: {cls.rule}\npaper: {cls.paper}\n")
        doc = (cls.__module__ and __import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip()
        if doc:
            print(doc + "\n")
        rows = parameter_rows(cls)
        print("parameters (set with -p KEY=VALUE):" if rows else "parameters: none")
        for row in rows:
            unit = f" {row['unit']}" if row["unit"] else ""
            bounds = f", {row['range']}" if row["range"] else ""
            print(f"  {row['name']} = {row['default']}{unit}{bounds}: {row['help']}")
        return 0
    width = max(len(name) for name in POLICIES.names())
    for name in POLICIES.names():
        cls = POLICIES.get(name)
        print(f"{name:<{width}}  {cls.rule}\n{'':<{width}}  params: {short_parameters(cls)}\n"
              f"{'':<{width}}  paper: {cls.paper}")
    return 0

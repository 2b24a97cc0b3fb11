"""kvlab models: the embedded defaults, whether their packages are installed and their conversion cached."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from kvlab.models.convert import converted_dir, is_converted
    from kvlab.models.embedded import EMBEDDED_MODELS, TINY_MODELS

    rows = []
    for model in EMBEDDED_MODELS.values():
        rows.append({"name": model.name, "description": model.description, "installed": model.is_installed(),
                     "converted": is_converted(model), "cache_dir": str(converted_dir(model)),
                     "install": model.install_command})
    for name, description in TINY_MODELS.items():
        rows.append({"name": name, "description": description, "installed": True, "converted": None,
                     "cache_dir": None, "install": None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        if row["converted"] is None:
            state = "built in"
        elif not row["installed"]:
            state = f"not installed ({row['install']})"
        else:
            state = (f"converted, cached at {row['cache_dir']}" if row["converted"]
                     else "installed; converts on first load (20-80 s)")
        print(f"{row['name']:<13} {row['description']}\n{'':<13} {state}")
    print("Any Hugging Face model id or local folder also works with --model.")
    return 0

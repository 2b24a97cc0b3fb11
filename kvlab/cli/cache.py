"""kvlab cache: list, remove and garbage-collect the persisted caches in the store ($KVLAB_CACHE_DIR/kv)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("ls", help="list stored caches, most recently used first")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    remove = actions.add_parser("rm", help="remove one stored cache by key (or a unique key prefix)")
    remove.add_argument("key")
    collect = actions.add_parser("gc", help="remove least recently used caches until the store fits a size")
    collect.add_argument("--max-size", required=True, help="size with a unit, e.g. 2GB, 500MiB; 0 empties the store")
    collect.add_argument("--dry-run", action="store_true", help="list what would be removed and remove nothing")


def run(args: argparse.Namespace) -> int:
    import json

    from kvlab.store.store import CacheStore, parse_size
    from kvlab.units import format_mib

    store = CacheStore()
    if args.action == "ls":
        entries = store.list()
        for entry in entries:
            if args.json:
                print(json.dumps(entry.summary()))
                continue
            meta = entry.meta
            what = (f"{meta.model} {meta.policy} ratio={meta.ratio} {meta.context_tokens} tok"
                    f"{' ' + meta.quantization.scheme if meta.quantization else ''}") if meta else entry.problem
            print(f"{entry.key[:12]}  {format_mib(entry.size_bytes):>10}  {what}")
        if not args.json:
            print(f"{len(entries)} caches, {format_mib(store.total_bytes())} on disk in {store.root} (sizes are "
                  f"file bytes)")
        return 0
    if args.action == "rm":
        entry = store.remove(args.key)
        print(f"removed {entry.key[:12]} ({format_mib(entry.size_bytes)})")
        return 0
    report = store.gc(parse_size(args.max_size, require_unit=True), dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    if args.dry_run:
        for entry in report.removed:
            print(f"would remove {entry.key[:12]}  {format_mib(entry.size_bytes):>10}")
    for entry in report.in_use:
        print(f"skipped {entry.key[:12]}  {format_mib(entry.size_bytes):>10}  in use by another process (being "
              f"loaded or written); run gc again later")
    left = store.total_bytes() - (report.removed_bytes if args.dry_run else 0)
    print(f"{verb} {len(report.removed)} caches ({format_mib(report.removed_bytes)} on disk); {format_mib(left)} "
          f"{'would be ' if args.dry_run else ''}left in {store.root}"
          f"{f'; {len(report.in_use)} in use were skipped' if report.in_use else ''}")
    return 0

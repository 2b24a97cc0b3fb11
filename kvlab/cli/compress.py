"""kvlab compress: prefill a document once, compress (and optionally quantize) its KV cache, persist it."""

from __future__ import annotations

import argparse
import json

from kvlab.cli.common import (
    add_kv_quant_argument,
    add_model_arguments,
    add_policy_arguments,
    kv_quant_from_args,
    policy_from_args,
    ratio_from_args,
    read_text,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context-file", required=True, help="document to prefill (UTF-8 text; - for stdin)")
    add_model_arguments(parser)
    add_policy_arguments(parser, default_help="default: the recommended query-agnostic recipe, kvzip held in int4, "
                                              "printed with the result; --policy full keeps every token")
    add_kv_quant_argument(parser, aliases=("--quantize",))
    parser.add_argument("--out", default=None, help="also copy the cache file here (a .kv file or a folder)")
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="prefill chunk size in tokens (default: 4096)")
    parser.add_argument("--max-kv-memory", default=None, metavar="SIZE",
                        help="bound the KV memory held while reading (with a unit, e.g. 1GB): a document whose full "
                             "cache would not fit is prefilled chunk by chunk and compressed to the budget as it goes "
                             "(default: no bound; the full cache is built, then compressed)")
    parser.add_argument("--force", action="store_true", help="run even if the document exceeds the model's window")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def apply_default_recipe(args: argparse.Namespace) -> None:
    """Without --policy, compress with ``store.documents.DEFAULT_RECIPE``; explicit flags override its parts
    (--ratio/--budget, -p, --kv-quant, --kv-residual-tokens)."""
    if args.policy is not None:
        return
    from kvlab.store.documents import DEFAULT_RECIPE as recipe

    args.policy = recipe.policy
    args.param = [f"{key}={value}" for key, value in recipe.params] + list(args.param)
    if args.ratio is None and args.budget is None:
        args.ratio = recipe.ratio
    if args.kv_quant is None and recipe.kv_quant is not None:
        args.kv_quant = recipe.kv_quant.scheme
        if args.kv_residual_tokens is None:
            args.kv_residual_tokens = recipe.kv_quant.residual_tokens


def run(args: argparse.Namespace) -> int:
    from kvlab.cli.common import load_model_from_args
    from kvlab.engine import Engine, compression, memory_figures
    from kvlab.store.documents import compress_document, copy_out
    from kvlab.store.store import parse_size
    from kvlab.units import format_mib, format_seconds, per_second

    text = read_text(args.context_file)
    apply_default_recipe(args)
    policy = policy_from_args(args)
    quantization = kv_quant_from_args(args)
    max_kv_bytes = None if args.max_kv_memory is None else parse_size(args.max_kv_memory, require_unit=True)
    engine = Engine(load_model_from_args(args, progress=not args.json),
                    chunk_tokens=args.chunk_tokens)
    document = store_document(lambda: compress_document(
        engine, text, policy, ratio=ratio_from_args(args), budget_tokens=args.budget, quantization=quantization,
        force=args.force, progress=not args.json, max_kv_bytes=max_kv_bytes))
    streamed = document.meta.extra.get("streamed")
    path = copy_out(document.path, args.out) if args.out else document.path
    prefilled = 0 if document.from_store else document.context_tokens  # a stored file is found, not recomputed
    if args.json:
        print(json.dumps({"path": str(path), "key": document.key, "from_store": document.from_store,
                          "policy": policy.name, "policy_params": policy.params(), "ratio": ratio_from_args(args),
                          "kv_quant": None if quantization is None else quantization.to_dict(),
                          "context_tokens": document.context_tokens, "kept_tokens": document.kept_tokens,
                          **memory_figures(document.kv_bytes_full, document.kv_bytes_kept,
                                           document.kv_bytes_full_fp16),
                          "file_bytes": document.file_bytes, "prefilled_tokens": prefilled,
                          "prefill_s": document.prefill_s, "compress_s": document.compress_s,
                          "streamed": streamed}))
        return 0
    origin = "found in the store (not recomputed)" if document.from_store else (
        f"prefill {prefilled} tok in {format_seconds(document.prefill_s)} "
        f"({per_second(prefilled, document.prefill_s):.0f} tok/s), compress {format_seconds(document.compress_s)}")
    if streamed:
        origin += (f" | streamed in chunks of {streamed['chunk_tokens']} tok, KV peak "
                   f"{format_mib(streamed['peak_kv_bytes'])} (full cache {format_mib(document.kv_bytes_full)})")
    ratio = ratio_from_args(args)
    held = (f"{policy.describe()}{'' if ratio is None else f' @ ratio {ratio:g}'}"
            f"{' + ' + quantization.scheme if quantization else ''}")
    print(f"{path}\n[{held}] context {document.context_tokens} "
          f"tok | kept {document.kept_tokens:.0f} tok/head | KV in memory {format_mib(document.kv_bytes_kept)} "
          f"(full fp16 {format_mib(document.kv_bytes_full_fp16)}, compression "
          f"{compression(document.kv_bytes_full_fp16, document.kv_bytes_kept):.2f}x) | "
          f"file on disk {format_mib(document.file_bytes)} | {origin} | key {document.key[:12]}")
    return 0


def store_document(compress):
    """Run ``compress()``; a store that cannot be written (full disk, no permission) ends in one line, not a
    traceback. Shared with `kvlab chat --context-file`."""
    from kvlab.errors import KvlabError
    from kvlab.store.store import CacheStore

    try:
        return compress()
    except OSError as error:
        raise KvlabError(f"cannot write to the cache store {CacheStore().root}: {error.strerror or error}; free "
                         f"space (`kvlab cache gc --max-size ...`) or point KVLAB_CACHE_DIR elsewhere") from None

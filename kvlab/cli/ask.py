"""kvlab ask: prefill a document, compress its KV cache with a policy, answer a question, report the costs."""

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
from kvlab.units import format_mib, format_seconds, per_second


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--context-file", help="document to prefill (UTF-8 text; - for stdin)")
    source.add_argument("--cache", help="a .kv file from `kvlab compress` (or a store key prefix): only the question "
                                        "is prefilled")
    parser.add_argument("--question", required=True, help="question asked after the document")
    add_model_arguments(parser)
    add_policy_arguments(parser)
    parser.add_argument("--method", default=None,
                        help="input-level method instead of a KV policy: shorten the document's text to the budget "
                             "(--ratio, default 0.5, or --budget), then prefill it whole: rag_bm25, rag_dense, "
                             "selective_context, llmlingua; -p sets its parameters")
    add_kv_quant_argument(parser)
    parser.add_argument("--query-aware", action="store_true",
                        help="put the question in the prefix so the policy can score with it (SnapKV's setting); "
                             "default is query-agnostic: compress the document before the question is seen")
    parser.add_argument("--answer-prefix", default="",
                        help="text that starts the model's answer, e.g. 'The pass key is' (keeps small models terse)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens; 0 = off (default)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for sampling (default: 0); the random policy takes -p seed=N")
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="prefill chunk size in tokens (default: 4096)")
    parser.add_argument("--force", action="store_true", help="run even if the prompt exceeds the model's window")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from kvlab.cli.common import load_model_from_args
    from kvlab.engine import Engine, SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    for flag, value in (("--cache", args.cache), ("--context-file", args.context_file)):
        if value is not None and not value.strip():
            from kvlab.errors import ParameterError

            raise ParameterError(f"{flag} is empty; give a file path (or, for --cache, a store key prefix)")
    if args.method and (args.cache or args.policy != "full"):
        from kvlab.errors import ParameterError

        raise ParameterError("--method shortens the document's text and keeps its cache whole; drop --policy and "
                             "give the document with --context-file (not --cache)")
    if args.cache:
        return run_cached(args, sampling)
    context = read_text(args.context_file)
    policy = None if args.method else policy_from_args(args)
    loaded = load_model_from_args(args, progress=not args.json)
    engine = Engine(loaded, chunk_tokens=args.chunk_tokens)
    options = dict(query_aware=args.query_aware, max_new_tokens=args.max_new_tokens, sampling=sampling,
                   force=args.force, progress=not args.json, answer_prefix=args.answer_prefix,
                   kv_quant=kv_quant_from_args(args))
    if policy is None:
        answer = method_answer(engine, context, args, options)
    else:
        answer = engine.ask(context, args.question, policy, ratio=ratio_from_args(args), budget_tokens=args.budget,
                            **options)
    # query-aware: the question is prefilled with the document; query-agnostic: the document alone is (the question
    # is fed at the start of decoding and timed in neither figure); an input method prefills its shortened text
    context_prefilled = answer.extra.get("input_context_tokens", answer.context_tokens)
    prefilled = context_prefilled + (answer.question_tokens if args.query_aware else 0)
    if args.json:
        print(json.dumps({"model": loaded.name, "device": str(loaded.device), **answer.to_dict(),
                          "prefilled_tokens": prefilled}))
    else:
        print(answer.answer)
        print(stats_line(answer, prefilled))
    return 0


def method_answer(engine, context: str, args: argparse.Namespace, options: dict):
    """Answer with the input method ``--method`` (its parameters from -p; ratio 0.5 unless --ratio or --budget)."""
    from kvlab.errors import ParameterError
    from kvlab.inputs import make_input_method
    from kvlab.inputs.answer import ask_with_method

    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"--param expects KEY=VALUE (got {item!r})")
        params[key.strip()] = value.strip()
    method = make_input_method(args.method, **params)
    ratio = 0.5 if args.ratio is None and args.budget is None else args.ratio
    return ask_with_method(engine, method, context, args.question, ratio=ratio, budget_tokens=args.budget, **options)


def run_cached(args: argparse.Namespace, sampling) -> int:
    """Answer from a persisted cache: load and verify it, prefill the question only, decode."""
    from kvlab.cache.quantized import quantization_of
    from kvlab.cli.common import load_model_from_args
    from kvlab.engine import Answer, Engine, context_kept_tokens
    from kvlab.store.documents import conversation_for, open_document

    refuse_policy_flags(args)
    if args.query_aware:
        from kvlab.errors import ParameterError

        raise ParameterError("--cache holds a document compressed before any question was seen; drop "
                             "--query-aware (or use --context-file for a query-aware run)")
    loaded = load_model_from_args(args, progress=not args.json)
    engine = Engine(loaded, chunk_tokens=args.chunk_tokens)
    document = open_document(engine, args.cache, kv_quant=kv_quant_from_args(args))
    meta = document.meta
    held_bytes, full_fp16 = document.cache.held_bytes, document.cache.kv_bytes_full_fp16
    held_quantization = quantization_of(document.cache)
    turn = conversation_for(engine, document).ask(args.question, max_new_tokens=args.max_new_tokens,
                                                  sampling=sampling, answer_prefix=args.answer_prefix,
                                                  force=args.force)
    answer = Answer(
        answer=turn.answer, token_ids=turn.token_ids, policy=meta.policy, policy_params=meta.policy_params,
        query_aware=False, ratio=meta.ratio, budget_tokens=meta.budget_tokens, context_tokens=meta.context_tokens,
        question_tokens=turn.question_tokens, kept_tokens=context_kept_tokens(document.cache, meta.context_tokens),
        kv_bytes_full=int(meta.extra.get("kv_bytes_full", 0)), kv_bytes_kept=held_bytes,
        kv_bytes_allocated=document.cache.allocated_bytes, kv_bytes_full_fp16=full_fp16, prefill_s=turn.question_s,
        compress_s=turn.compress_s, decode_s=turn.decode_s, decode_tokens=len(turn.token_ids),
        kv_quant=None if held_quantization is None else held_quantization.scheme,
        extra={"stopped_by": turn.stopped_by, "kv_bytes_read": document.cache.decode_read_bytes,
               "cache_file": str(args.cache), "file_bytes": document.file_bytes,
               "quantization": meta.quantization.scheme if meta.quantization else None})
    load_s = meta.extra["load_s"]
    if args.json:
        print(json.dumps({"model": loaded.name, "device": str(loaded.device), **answer.to_dict(),
                          "prefilled_tokens": turn.question_tokens, "file_bytes": document.file_bytes,
                          "load_s": load_s, "time_to_first_token_s": load_s + turn.question_s}))
    else:
        print(answer.answer)
        print(stats_line(answer, turn.question_tokens) + f" | file on disk {format_mib(document.file_bytes)}, "
              f"loaded in {format_seconds(load_s)}")
    return 0


def refuse_policy_flags(args: argparse.Namespace) -> None:
    """A persisted cache carries its policy and budget; flags that would pick others are mistakes, not no-ops."""
    if args.policy != "full" or args.ratio is not None or args.budget is not None or args.param:
        from kvlab.errors import ParameterError

        raise ParameterError("--cache answers with the policy the cache was compressed with; drop --policy, "
                             "--ratio, --budget and -p (or compress again with `kvlab compress`)")


def read_part(answer) -> str:
    """`` | read per token X MiB`` where a decode step reads less than the cache holds (``quest``), else nothing."""
    read = answer.extra.get("kv_bytes_read")
    return "" if read is None or read >= answer.kv_bytes_kept else f" | KV read per token {format_mib(read)}"


def stats_line(answer, prefilled_tokens: int) -> str:
    """One line of figures, each meaning what the README's "What each figure means" says: ``prefilled_tokens`` are
    the tokens this run ran through the model before decoding, in ``answer.prefill_s`` seconds (with ``--cache``,
    the question alone: the document was prefilled by `kvlab compress`)."""
    mode = "query-aware" if answer.query_aware else "query-agnostic"
    quant = f" {answer.kv_quant}" if answer.kv_quant else ""
    return (f"[{answer.policy}{quant} {mode}] context {answer.context_tokens} tok | kept {answer.kept_tokens:.0f} "
            f"tok/head | KV in memory {format_mib(answer.kv_bytes_kept)} (full fp16 "
            f"{format_mib(answer.kv_bytes_full_fp16)}, compression {answer.compression:.2f}x)"
            f"{read_part(answer)} | prefill {prefilled_tokens} tok in {format_seconds(answer.prefill_s)} "
            f"({per_second(prefilled_tokens, answer.prefill_s):.0f} tok/s)"
            f" | compress {format_seconds(answer.compress_s)} | decode {answer.decode_tokens} tok in "
            f"{format_seconds(answer.decode_s)} ({answer.decode_tokens_per_s:.1f} tok/s)")

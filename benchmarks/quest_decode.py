"""Decode speed and bytes read per token of ``quest`` against the full cache on one long document, in one run.

One prefill of a ``--length``-token haystack (past the model's window if need be: speed, not accuracy, is measured
here, so the window check is skipped). From it: the full cache, ``quest`` reading 1/8 of the pages
(``--ratio 0.875``), and both held int4 (KIVI). Each then answers the same question query-agnostically (the
question is fed on top of the stored document) and decodes ``--new-tokens`` greedy tokens, end-of-sequence
ignored. The variants take turns for ``--rounds`` rounds and the median decode rate of each is kept, so a load swing
hits them alike. Reported per variant: decode tokens/s, KV bytes held, KV bytes read per decoded token, pages read
per step, and the speed ratio against the full cache.

    python benchmarks/quest_decode.py --length 32768 --out benchmarks/results/quest_decode_smollm2_32k.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import environment, write_json

from kvlab.bench.haystack import build_haystack
from kvlab.cache.paged import PagedLayerCache
from kvlab.cache.quant import QuantizationParams
from kvlab.cache.quantized import quantize_in_memory
from kvlab.engine import Engine
from kvlab.engine.sampling import SamplingConfig
from kvlab.models import load_model
from kvlab.policies import make_policy

QUESTION = "What is the pass key? Answer with the number only."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=32768, help="document length in tokens")
    parser.add_argument("--ratio", type=float, default=0.875, help="quest: share of the pages not read per step")
    parser.add_argument("--page-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    loaded = load_model(args.model)
    engine = Engine(loaded)
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    text = build_haystack(count, args.length, seed=0, needle="The pass key is 71432.", depth=0.5).text
    prefix = engine.prompt(text, "").prefix_ids
    started = time.perf_counter()
    prefill = engine.prefill(prefix, progress=True)
    prefill_s = time.perf_counter() - started
    print(f"prefilled {prefix.numel()} tokens in {prefill_s:.0f} s")

    int4 = QuantizationParams("int4", group_size=args.page_tokens)
    quest = make_policy("quest", page_tokens=args.page_tokens)
    full_cache = prefill.cache
    quest_cache, budget, _ = engine.compress(prefill, quest, ratio=args.ratio)
    variants = {"full": full_cache, f"quest@{args.ratio:g}": quest_cache,
                "full + int4": quantize_in_memory(full_cache, int4, sliding=False),
                f"quest@{args.ratio:g} + int4": quantize_in_memory(quest_cache, int4, sliding=False)}
    question = engine.question_ids(QUESTION, "")
    rates: dict[str, list[float]] = {name: [] for name in variants}
    answers: dict[str, str] = {}
    for round_index in range(args.rounds):
        for name, cache in variants.items():
            fork = cache.fork()
            first = engine.feed(fork, question)
            generation = engine.continue_and_decode(fork, None, first, max_new_tokens=args.new_tokens,
                                                    sampling=SamplingConfig(), ignore_eos=True)
            rates[name].append(len(generation.token_ids) / generation.seconds)
            answers[name] = loaded.tokenizer.decode(generation.token_ids[:12], skip_special_tokens=True)
            print(f"round {round_index + 1} {name}: {rates[name][-1]:.2f} tok/s")

    full_rate = statistics.median(rates["full"])
    rows = []
    for name, cache in variants.items():
        paged = [layer for layer in cache.layers if isinstance(layer, PagedLayerCache)]
        rate = statistics.median(rates[name])
        rows.append({
            "variant": name, "decode_tokens_per_s": rate, "runs_tokens_per_s": rates[name],
            "speed_vs_full": rate / full_rate, "kv_bytes_held": cache.held_bytes,
            "kv_bytes_read_per_token": cache.decode_read_bytes,
            "pages_read_per_step": paged[0].read_pages() if paged else None,
            "pages": paged[0].pages if paged else None, "answer_start": answers[name]})
    print(f"\n{args.model}, {prefix.numel()} tokens, quest budget {budget} tokens per head, "
          f"{args.new_tokens} tokens per run, median of {args.rounds}")
    print("| variant | decode tok/s | vs full | KV held MiB | KV read per token MiB | pages read |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        pages = "all" if row["pages"] is None else f"{row['pages_read_per_step']}/{row['pages']}"
        print(f"| {row['variant']} | {row['decode_tokens_per_s']:.2f} | {row['speed_vs_full']:.2f}x | "
              f"{row['kv_bytes_held'] / 2**20:.0f} | {row['kv_bytes_read_per_token'] / 2**20:.0f} | {pages} |")
    write_json(args.out, {"model": args.model, "context_tokens": int(prefix.numel()), "ratio": args.ratio,
                          "page_tokens": args.page_tokens, "budget_tokens": budget, "prefill_s": prefill_s,
                          "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows,
                          "torch_threads": torch.get_num_threads(), "environment": environment()})


if __name__ == "__main__":
    main()

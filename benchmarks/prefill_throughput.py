"""Prefill throughput: kvlab's chunked prefill (our attention function, position bookkeeping, observation
recording) against a plain transformers forward over the same tokens (sdpa attention, logits for the last
position only). Prints tokens/s for each and their ratio, measured in one run; writes JSON.

    python benchmarks/prefill_throughput.py --model smollm2-135m --tokens 2000 --repeats 3 \
        --out benchmarks/results/prefill_smollm2_cpu.json
"""

from __future__ import annotations

import argparse

import torch
from _common import environment, summary, timed_runs, write_json

from kvlab.bench.haystack import build_haystack
from kvlab.cache.observations import ObservationRequest
from kvlab.engine import Engine
from kvlab.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=2000, help="document length in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (after one warm-up)")
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()

    loaded = load_model(args.model, device=args.device, progress=False)
    engine = Engine(loaded, chunk_tokens=args.chunk_tokens)
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    text = build_haystack(count, args.tokens, seed=0).text
    token_ids = torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"], device=loaded.device)
    tokens = int(token_ids.numel())
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

    def plain_forward():
        with torch.inference_mode():
            loaded.model(input_ids=token_ids[None], use_cache=True, logits_to_keep=1)

    variants = {
        "transformers_forward": plain_forward,
        "kvlab_prefill": lambda: engine.prefill(token_ids),
        "kvlab_prefill_window_queries": lambda: engine.prefill(token_ids, ObservationRequest(window_tokens=32)),
        "kvlab_prefill_attention_sums": lambda: engine.prefill(
            token_ids, ObservationRequest(window_tokens=32, attention_sums=True)),
    }
    results = {}
    for name, run in variants.items():
        times = timed_runs(run, args.repeats, sync)
        results[name] = {**summary(times), "tokens_per_s": tokens / summary(times)["median_s"]}
    baseline = results["transformers_forward"]["tokens_per_s"]
    print(f"{args.model} on {loaded.device}, {tokens} tokens, median of {args.repeats} runs, chunk {args.chunk_tokens}")
    for name, result in results.items():
        result["speed_vs_transformers"] = result["tokens_per_s"] / baseline
        print(f"  {name:32s} {result['tokens_per_s']:8.1f} tok/s   {result['median_s']:7.3f} s"
              f"   x{result['speed_vs_transformers']:.2f} of plain transformers")
    write_json(args.out, {"benchmark": "prefill_throughput", "model": args.model, "device": str(loaded.device),
                          "tokens": tokens, "chunk_tokens": args.chunk_tokens, "repeats": args.repeats,
                          "results": results, "environment": environment()})


if __name__ == "__main__":
    main()

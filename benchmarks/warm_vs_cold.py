"""Prefill once, ask many times: cold time-to-first-token (prefill the whole document, then the question) against
warm time-to-first-token from a persisted ``.kv`` file (load + verify + prefill only the question), file sizes per
storage quantization, and the accuracy those quantizations keep on a small NIAH grid. All measured in one run.

    python benchmarks/warm_vs_cold.py --model smollm2-135m --tokens 7000 --out benchmarks/results/warm_vs_cold.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import environment, write_json

from kvlab.bench.haystack import build_haystack
from kvlab.bench.results import ResultsFile
from kvlab.bench.runner import grid, run_grid
from kvlab.bench.summary import overall, summarize
from kvlab.bench.tasks import make_samples
from kvlab.cache.quant import QuantizationParams
from kvlab.engine import Engine
from kvlab.models import load_model
from kvlab.policies import make_policy
from kvlab.store.documents import compress_document, conversation_for, open_document
from kvlab.store.store import CacheStore

QUESTION = "What is the pass key? Answer with the number only."


def first_token_seconds(engine: Engine, text: str, repeats: int) -> list[float]:
    """Cold: prefill document + question from nothing, up to the first token's logits."""
    parts = engine.prompt(text, QUESTION)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = engine.prefill(parts.prefix_ids)
        engine.feed(result.cache, parts.suffix_ids)
        times.append(time.perf_counter() - started)
    return times


def warm_seconds(engine: Engine, path: Path, repeats: int) -> tuple[list[float], str]:
    """Warm: open and verify the file, prefill the question, up to the first token (then answer once)."""
    times, answer = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        loaded = open_document(engine, str(path))
        turn = conversation_for(engine, loaded).ask(QUESTION, max_new_tokens=1)
        times.append(time.perf_counter() - started - turn.decode_s)
    loaded = open_document(engine, str(path))
    answer = conversation_for(engine, loaded).ask(QUESTION, max_new_tokens=12).answer
    return times, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=7000, help="document length in tokens")
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid-samples", type=int, default=5, help="samples per NIAH task in the accuracy grid")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    loaded = load_model(args.model, progress=False)
    engine = Engine(loaded)
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    text = build_haystack(count, args.tokens, seed=0, needle="The pass key is 68219. Remember it.", depth=0.5).text
    policy = make_policy(args.policy)
    report: dict = {"benchmark": "warm_vs_cold", "model": args.model, "policy": args.policy, "ratio": args.ratio}
    with tempfile.TemporaryDirectory() as folder:
        store = CacheStore(Path(folder))
        cold = first_token_seconds(engine, text, args.repeats)
        report["cold_ttft_s"] = statistics.median(cold)
        print(f"{args.model}, {count(text)}-token document, {args.policy} @ {args.ratio}, median of {args.repeats}")
        print(f"  cold time to first token (prefill document + question): {report['cold_ttft_s']:.2f} s")
        for scheme in (None, "int8", "int4"):
            quantization = QuantizationParams(scheme) if scheme else None
            document = compress_document(engine, text, policy, ratio=args.ratio, quantization=quantization,
                                         store=store)
            warm, answer = warm_seconds(engine, document.path, args.repeats)
            kept_model_dtype = document.kv_bytes_full * document.kept_tokens / document.context_tokens
            kept_fp16 = kept_model_dtype * 2 / loaded.dtype.itemsize
            entry = {"warm_ttft_s": statistics.median(warm), "file_bytes": document.file_bytes,
                     "kv_bytes_kept_model_dtype": kept_model_dtype, "kv_bytes_kept_fp16_equivalent": kept_fp16,
                     "answer": answer}
            entry["warm_over_cold"] = entry["warm_ttft_s"] / report["cold_ttft_s"]
            entry["file_over_kept_kv"] = document.file_bytes / entry["kv_bytes_kept_model_dtype"]
            entry["file_over_fp16_equivalent"] = document.file_bytes / kept_fp16
            report[scheme or "none"] = entry
            print(f"  [{scheme or 'no quantization':>15}] warm TTFT {entry['warm_ttft_s']:.3f} s "
                  f"({entry['warm_over_cold']:.1%} of cold) | file {document.file_bytes / 2**20:.2f} MiB = "
                  f"{entry['file_over_kept_kv']:.3f}x kept KV ({loaded.dtype}), "
                  f"{entry['file_over_fp16_equivalent']:.3f}x fp16-equivalent | answer {answer!r}")
        samples = [sample for task in ("niah_single_2", "niah_multikey_1")
                   for sample in make_samples(task, count, 1024, args.grid_samples, seed=0)]
        outcome = run_grid(engine, samples, grid(["full", args.policy], [args.ratio], [None, "int8", "int4"]),
                           ResultsFile(Path(folder) / "grid.jsonl"), mode="multi-request", progress=False)
        report["niah_grid"] = [{k: row[k] for k in ("policy", "ratio", "quantization", "score", "stderr", "n",
                                                     "kl_vs_full", "kv_bytes_kept")}
                               for row in overall(summarize(outcome.rows))]
        print(f"  NIAH grid (niah_single_2 + niah_multikey_1, 1024 tokens, {args.grid_samples} samples each, "
              f"multi-request from .kv files):")
        for row in report["niah_grid"]:
            print(f"    {row['policy']:>8} @ {row['ratio']:<4g} {row['quantization'] or 'none':>5}: score "
                  f"{row['score']:.2f} ± {row['stderr']:.2f}, KL {row['kl_vs_full']:.4f}, "
                  f"KV {row['kv_bytes_kept'] / 2**20:.2f} MiB")
    report["environment"] = environment()
    write_json(args.out, report)


if __name__ == "__main__":
    main()

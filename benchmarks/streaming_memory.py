"""Peak memory of `kvlab compress` with and without streaming prefill, on generated documents of several lengths.

Each run is a fresh `python -m kvlab compress ... --json` process; its peak resident memory is the kernel's
(``os.wait4``'s ru_maxrss), so the model's weights and the interpreter count, as a user would see them. For each
length: streaming with `--max-kv-memory` (prefilled chunk by chunk, compressed to the budget as it goes) and, up
to `--full-max-tokens`, the same compression after a full prefill. Documents past the model's window run with
`--force` (memory is what is measured here, not answers). Target (issue 11): a 64K-token document with a
2K-token budget compresses with peak RSS <= 2 GiB. Prints a table; writes JSON.

    python benchmarks/streaming_memory.py --lengths 16384,65536 --budget 2048 \
        --out benchmarks/results/streaming_memory_smollm2.json
    python benchmarks/streaming_memory.py --lengths 65536 --kinds full --full-max-tokens 65536 \
        --out benchmarks/results/streaming_memory_smollm2_64k_full.json      # the full prefill beside it (~1 h)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, write_json

GIB = 1024 ** 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="16384,65536", help="document lengths in tokens")
    parser.add_argument("--budget", type=int, default=2048, help="tokens kept per head")
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--chunk-tokens", type=int, default=2048)
    parser.add_argument("--max-kv-memory", default="512MiB", help="the streaming runs' bound on held KV memory")
    parser.add_argument("--full-max-tokens", type=int, default=16384,
                        help="longest document also compressed after a full prefill (its attention is quadratic)")
    parser.add_argument("--kinds", default="streaming,full",
                        help="which runs per length: streaming, full (a full prefill, up to --full-max-tokens) or both")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    wanted = {item.strip() for item in args.kinds.split(",")}
    if not wanted <= {"streaming", "full"}:
        raise SystemExit(f"--kinds takes streaming, full or both (got {args.kinds})")
    from kvlab.bench.haystack import build_haystack
    from kvlab.models import load_model

    tokenizer = load_model(args.model, progress=False).tokenizer
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    runs = []
    with tempfile.TemporaryDirectory(prefix="kvlab-streaming-") as folder:
        for length in [int(item) for item in args.lengths.split(",")]:
            document = Path(folder) / f"doc{length}.txt"
            document.write_text(build_haystack(count, length, seed=length, needle="The pass key is 73019.",
                                               depth=0.5).text)
            kinds = (["streaming"] if "streaming" in wanted else []) + (
                ["full prefill"] if "full" in wanted and length <= args.full_max_tokens else [])
            for kind in kinds:
                runs.append(run(args, kind, length, document, Path(folder) / f"cache-{kind[:4]}-{length}"))
                print_run(runs[-1])
    target = next((item for item in runs if item["kind"] == "streaming" and item["length_tokens"] >= 65536), None)
    if target is not None:
        met = target["peak_rss_bytes"] <= 2 * GIB
        print(f"64K-token document, budget {args.budget}: peak RSS {target['peak_rss_bytes'] / GIB:.2f} GiB "
              f"(target <= 2 GiB: {'met' if met else 'NOT met'})")
    write_json(args.out, {"environment": environment(), "settings": vars(args), "runs": runs})


def run(args, kind: str, length: int, document: Path, cache_dir: Path) -> dict:
    command = [sys.executable, "-m", "kvlab", "compress", "--model", args.model, "--context-file", str(document),
               "--policy", args.policy, "--budget", str(args.budget), "--chunk-tokens", str(args.chunk_tokens),
               "--force", "--json"]
    if kind == "streaming":
        command += ["--max-kv-memory", args.max_kv_memory]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "KVLAB_CACHE_DIR": str(cache_dir)})
    stdout = process.stdout.read() if process.stdout is not None else ""
    _, status, usage = os.wait4(process.pid, 0)  # the child's own rusage: its peak RSS, nobody else's
    wall_s = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit status {os.waitstatus_to_exitcode(status)})")
    result = json.loads(stdout)
    peak_rss = usage.ru_maxrss * 1024  # Linux reports KiB
    streamed = result.get("streamed") or {}
    return {"kind": kind, "length_tokens": length, "context_tokens": result["context_tokens"],
            "kept_tokens": result["kept_tokens"], "wall_s": round(wall_s, 1), "prefill_s": result["prefill_s"],
            "compress_s": result["compress_s"], "peak_rss_bytes": peak_rss,
            "peak_kv_bytes": streamed.get("peak_kv_bytes", result["kv_bytes_full"]),
            "full_cache_bytes": result["kv_bytes_full"], "chunk_tokens": streamed.get("chunk_tokens")}


def print_run(item: dict) -> None:
    rss = f"{item['peak_rss_bytes'] / GIB:.2f} GiB"
    print(f"{item['length_tokens']:>6} tok {item['kind']:<12} peak RSS {rss:>9} | KV peak "
          f"{item['peak_kv_bytes'] / 2 ** 20:7.0f} MiB (full cache {item['full_cache_bytes'] / 2 ** 20:.0f} MiB) | "
          f"{item['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

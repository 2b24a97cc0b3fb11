"""Bytes held by a cache quantized in memory, against the uncompressed cache at 2 bytes per element, for each
scheme and group size: codes, fp16 scales and zero points, and the full-precision residual window. Writes JSON.

    python benchmarks/kv_quant_bytes.py --tokens 6000 --out benchmarks/results/kv_quant_bytes.json
"""

from __future__ import annotations

import argparse

import torch
from _common import environment, write_json

from kvlab.bench.haystack import build_haystack
from kvlab.cache.quant import QuantizationParams
from kvlab.cache.quantized import quantize_in_memory
from kvlab.engine import Engine
from kvlab.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=6000, help="document length in tokens")
    parser.add_argument("--groups", default="32,64,128", help="group sizes to measure")
    parser.add_argument("--residual-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    loaded = load_model(args.model, progress=False)
    engine = Engine(loaded)
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    ids = engine.prompt(build_haystack(count, args.tokens, seed=0).text, "").prefix_ids
    cache = engine.prefill(ids).cache
    full_fp16 = cache.kv_bytes_full_fp16
    rows = []
    print(f"{args.model}, {cache.num_tokens} tokens; full cache {full_fp16 / 2**20:.1f} MiB at fp16")
    for scheme in ("int8", "int4", "int2"):
        for group in [int(x) for x in args.groups.split(",")]:
            held = quantize_in_memory(cache, QuantizationParams(scheme, group, args.residual_tokens)).held_bytes
            rows.append({"scheme": scheme, "group_size": group, "residual_tokens": args.residual_tokens,
                         "kv_bytes_kept": held, "kept_over_fp16": held / full_fp16})
            print(f"  {scheme} group {group:4d}: held {held / 2**20:7.1f} MiB = {held / full_fp16:.3f} of fp16 "
                  f"({full_fp16 / held:.2f}x compression)")
    write_json(args.out, {"benchmark": "kv_quant_bytes", "model": args.model, "tokens": cache.num_tokens,
                          "kv_bytes_full_fp16": full_fp16, "rows": rows, "torch_dtype": str(torch.get_default_dtype()),
                          "environment": environment()})


if __name__ == "__main__":
    main()

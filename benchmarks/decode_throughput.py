"""Decode and prefill throughput of kvlab's runtime against plain transformers (and llama.cpp when given), measured
in one run on one machine, so the ratios hold even when absolute speeds swing with load. Writes JSON.

Decode: greedy, the end-of-sequence token ignored, ``--new-tokens`` steps after the prompt; per-step time is the
decode time divided by the forward passes it ran. transformers ``generate`` gets the same prompt ids (document plus
question); its per-step time is (time for N+1 new tokens - time for 1) / N. kvlab's full cache prefills the same
ids (one chunk up to 4096 tokens, as generate does), so its tokens must equal generate's; compressed cells run
query-agnostic (the document is prefilled and compressed first, then the question is fed), as a persisted cache
would be used. Rows:
  full, snapkv@0.875, full + int4 (held quantized), snapkv@0.875 + int4, and full with ``--weights int8``.
Prefill: one plain transformers forward over the whole document (sdpa, logits for the last position) against
kvlab's chunked prefill.

    python benchmarks/decode_throughput.py --out benchmarks/results/decode_throughput.json
    python benchmarks/decode_throughput.py --llamacpp-python venv-llamacpp/bin/python --gguf PATH/TO/model.gguf
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import environment, write_json

from kvlab.bench.haystack import build_haystack
from kvlab.cache.quant import QuantizationParams
from kvlab.engine import Engine
from kvlab.models import LoadedModel, load_model
from kvlab.policies import make_policy

QUESTION = "What is the pass key? Answer with the number only."
ANCHOR = Path(__file__).resolve().parents[1] / ".." / "shared" / "anchors" / "llamacpp_decode.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="2000,6000", help="document lengths for decode, in tokens")
    parser.add_argument("--prefill-lengths", default="2000,7000", help="document lengths for prefill, in tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--llamacpp-python", default=None, help="python of a venv with llama-cpp-python")
    parser.add_argument("--gguf", default=None, help="the GGUF file llama.cpp runs (the one kvlab converted)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--markdown", default=None, metavar="JSON",
                        help="print the README table of a results file written earlier, and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return

    loaded = load_model(args.model, progress=False)
    engine = Engine(loaded)
    int8 = int8_engine(loaded)
    results = {"decode": {}, "prefill": {}, "weights_int8_fidelity": None, "llama_cpp": {}}
    for length in [int(x) for x in args.lengths.split(",")]:
        text = document(loaded, length)
        results["decode"][length] = decode_rows(engine, int8, text, args.new_tokens)
        if args.llamacpp_python and args.gguf:
            results["llama_cpp"][length] = llama_cpp(args.llamacpp_python, args.gguf, text, args.new_tokens)
    for length in [int(x) for x in args.prefill_lengths.split(",")]:
        results["prefill"][length] = prefill_rows(engine, document(loaded, length))
    from kvlab.models.weights import weight_fidelity

    fidelity_ids = torch.tensor(loaded.tokenizer(document(loaded, 512))["input_ids"])
    results["weights_int8_fidelity"] = weight_fidelity(loaded.model, int8.model, fidelity_ids)
    report(results, args.model)
    data = {"benchmark": "decode_throughput", "model": args.model, "new_tokens": args.new_tokens,
            "results": results, "environment": environment()}
    print(markdown(json.loads(json.dumps(data))))
    write_json(args.out, data)


def document(loaded: LoadedModel, tokens: int) -> str:
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return build_haystack(count, tokens, seed=0).text


def int8_engine(loaded: LoadedModel) -> Engine:
    from kvlab.models.weights import quantize_weights

    model = copy.deepcopy(loaded.model)
    quantize_weights(model, "int8")
    return Engine(LoadedModel(name=f"{loaded.name}+int8", model=model, tokenizer=loaded.tokenizer))


def generate_step_ms(engine: Engine, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    model = engine.model
    with torch.inference_mode():
        model.generate(ids[None, :64], max_new_tokens=2, do_sample=False)  # warm-up
        one = many = float("inf")
        for _ in range(2):  # the faster of two runs each: the difference of two timings is sensitive to noise
            started = time.perf_counter()
            model.generate(ids[None], max_new_tokens=1, do_sample=False)
            one = min(one, time.perf_counter() - started)
            started = time.perf_counter()
            out = model.generate(ids[None], max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1,
                                 do_sample=False)
            many = min(many, time.perf_counter() - started)
    return (many - one) / new_tokens * 1000, out[0, ids.numel():].tolist()


def kvlab_run(engine: Engine, text: str, new_tokens: int, policy: str, ratio: float | None,
              kv_quant: str | None) -> dict:
    # the full cache is prefilled with the question, as generate does, so their tokens can be compared
    answer = engine.ask(text, QUESTION, make_policy(policy), ratio=ratio, max_new_tokens=new_tokens + 1,
                        kv_quant=None if kv_quant is None else QuantizationParams(kv_quant), ignore_eos=True,
                        query_aware=policy == "full")
    steps = max(answer.decode_tokens - 1, 1)
    return {"step_ms": answer.decode_s / steps * 1000, "tokens": answer.token_ids,
            "kv_bytes_kept": answer.kv_bytes_kept, "kv_bytes_full_fp16": answer.kv_bytes_full_fp16,
            "kept_tokens": answer.kept_tokens, "compression": answer.compression, "prefill_s": answer.prefill_s}


def decode_rows(engine: Engine, int8: Engine, text: str, new_tokens: int) -> dict:
    parts = engine.prompt(text, QUESTION)
    ids = torch.cat([parts.prefix_ids, parts.suffix_ids])
    kvlab_run(engine, text[:2000], 4, "full", None, None)  # warm-up
    generate_ms, generate_tokens = generate_step_ms(engine, ids, new_tokens)
    rows = {"transformers_generate": {"step_ms": generate_ms, "tokens": generate_tokens}}
    for name, policy, ratio, quant, runner in [("full", "full", None, None, engine),
                                                ("snapkv@0.875", "snapkv", 0.875, None, engine),
                                                ("full+int4", "full", None, "int4", engine),
                                                ("snapkv@0.875+int4", "snapkv", 0.875, "int4", engine),
                                                ("full, weights int8", "full", None, None, int8)]:
        rows[name] = kvlab_run(runner, text, new_tokens, policy, ratio, quant)
    for row in rows.values():
        row["tokens_per_s"] = 1000 / row["step_ms"]
    # generate's min_new_tokens forbids the end-of-sequence token that kvlab (ignoring it as a stop) may pick, so
    # the tokens are compared up to the first place either sequence holds it: the answer itself
    stops = engine.stop_ids
    cut = next((index for index, (a, b) in enumerate(zip(rows["full"]["tokens"], generate_tokens))
                if a in stops or b in stops), len(generate_tokens))
    rows["full"]["compared_tokens"] = cut
    rows["full"]["same_tokens_as_generate"] = rows["full"]["tokens"][:cut] == generate_tokens[:cut]
    rows["context_tokens"] = int(parts.prefix_ids.numel())
    return rows


def prefill_rows(engine: Engine, text: str) -> dict:
    ids = engine.prompt(text, "").prefix_ids
    model = engine.model

    def plain() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
            return time.perf_counter() - started

    def kvlab() -> float:
        return engine.prefill(ids).seconds

    plain(), kvlab()  # warm-up
    plain_s, kvlab_s = plain(), kvlab()
    return {"tokens": int(ids.numel()), "transformers_forward_tok_s": ids.numel() / plain_s,
            "kvlab_prefill_tok_s": ids.numel() / kvlab_s, "ratio": plain_s / kvlab_s}


def llama_cpp(python: str, gguf: str, text: str, new_tokens: int) -> dict | None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write(text)
    run = subprocess.run([python, str(ANCHOR.resolve()), gguf, handle.name, str(new_tokens)], capture_output=True,
                         text=True, check=False)
    Path(handle.name).unlink(missing_ok=True)
    if run.returncode:
        print(f"llama.cpp run failed: {run.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def report(results: dict, model: str) -> None:
    print(f"{model}, {torch.get_num_threads()} threads, one run")
    for length, rows in results["decode"].items():
        base = rows["transformers_generate"]["tokens_per_s"]
        full = rows["full"]["tokens_per_s"]
        print(f"\ndecode at {length} tokens ({rows['context_tokens']} context tokens)")
        for name, row in rows.items():
            if not isinstance(row, dict):
                continue
            extra = ""
            if "kv_bytes_kept" in row:
                extra = (f"  held {row['kv_bytes_kept'] / 2**20:7.1f} MiB  {row['compression']:5.2f}x vs fp16 full"
                         f"  x{row['tokens_per_s'] / full:.2f} of kvlab full")
            print(f"  {name:22s} {row['tokens_per_s']:6.1f} tok/s  "
                  f"x{row['tokens_per_s'] / base:.2f} of generate{extra}")
        print(f"  full: same tokens as generate: {rows['full']['same_tokens_as_generate']} "
              f"({rows['full']['compared_tokens']} tokens before an end-of-sequence token)")
        anchor = results["llama_cpp"].get(length)
        if anchor:
            print(f"  llama.cpp {anchor['decode_tok_s']:.1f} tok/s; kvlab weights int8 = "
                  f"x{rows['full, weights int8']['tokens_per_s'] / anchor['decode_tok_s']:.2f} of it")
    for row in results["prefill"].values():
        print(f"prefill at {row['tokens']} tokens: transformers {row['transformers_forward_tok_s']:.0f} tok/s, "
              f"kvlab {row['kvlab_prefill_tok_s']:.0f} tok/s, x{row['ratio']:.2f}")
    fidelity = results["weights_int8_fidelity"]
    print(f"weights int8 vs fp32: mean KL {fidelity['kl_mean']:.4f} nats/token, greedy agreement "
          f"{fidelity['top1_agreement']:.1%}")


def markdown(data: dict) -> str:
    """The README table: decode tokens/s per cell and length, with ratios, held bytes and llama.cpp beside."""
    results = data["results"]
    lengths = list(results["decode"])
    head = "| cell | " + " | ".join(f"decode tok/s @{length}" for length in lengths) + " | held KV @" + \
        f"{lengths[-1]} | compression |"
    lines = [head, "| --- |" + " --- |" * (len(lengths) + 2)]
    names = [name for name, row in results["decode"][lengths[0]].items() if isinstance(row, dict)]
    for name in names:
        cells = []
        for length in lengths:
            rows = results["decode"][length]
            base = rows["transformers_generate"]["tokens_per_s"]
            cells.append(f"{rows[name]['tokens_per_s']:.1f} (x{rows[name]['tokens_per_s'] / base:.2f})")
        last = results["decode"][lengths[-1]][name]
        held = f"{last['kv_bytes_kept'] / 2**20:.1f} MiB" if "kv_bytes_kept" in last else "-"
        ratio = f"{last['compression']:.2f}x" if "compression" in last else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {held} | {ratio} |")
    anchors = [results["llama_cpp"].get(length) for length in lengths]
    if any(anchors):
        lines.append("| llama.cpp Q4_1 (same GGUF) | " + " | ".join(
            f"{anchor['decode_tok_s']:.1f}" if anchor else "-" for anchor in anchors) + " | - | - |")
    same = all(results["decode"][length]["full"].get("same_tokens_as_generate") for length in lengths)
    prefill = "; ".join(f"{row['tokens']} tokens x{row['ratio']:.2f}" for row in results["prefill"].values())
    fidelity = results["weights_int8_fidelity"]
    lines += ["", f"(x: tokens/s against transformers `generate` in the same run; full-cache tokens identical to "
                  f"generate's: {'yes' if same else 'no'}. Prefill against one plain transformers forward: {prefill}. "
                  f"Weights int8 against fp32: mean KL {fidelity['kl_mean']:.4f} nats/token, greedy agreement "
                  f"{fidelity['top1_agreement']:.1%}.)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

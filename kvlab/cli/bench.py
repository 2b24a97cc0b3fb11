"""kvlab bench: sweep policies x ratios over long-context tasks with one prefill per sample; write a report."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvlab.cli.common import add_dtype_argument, add_extend_argument

    parser.add_argument("--preset", choices=["quick", "standard"], default=None,
                        help="a named grid (quick: ~5 min on 2 CPU cores); explicit flags override its values")
    parser.add_argument("--model", default="smollm2-135m", help="model to benchmark (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_dtype_argument(parser)
    add_extend_argument(parser)
    parser.add_argument("--weights", choices=["fp", "int8"], default="fp",
                        help="int8: weight-only int8 linear layers; the model changes (and so its fingerprint)")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (see --list-tasks)")
    parser.add_argument("--data", default=None, metavar="[FORMAT:]FILE",
                        help="cases from a JSONL file instead of generated tasks: kvlab's own format or a published "
                             "benchmark's (longbench, longbench2, ruler, infinitebench, scbench; told from the "
                             "fields unless FORMAT is given); FORMAT:hub:OWNER/NAME[/CONFIG][@SPLIT] reads a hub "
                             "dataset through the datasets package (see --list-formats)")
    parser.add_argument("--lengths", default=None, help="comma-separated context lengths in tokens (e.g. 1024,2048)")
    parser.add_argument("--samples", type=int, default=None, help="samples per task and length")
    parser.add_argument("--policies", default=None,
                        help="comma-separated policies (see `kvlab policies`) and input methods (rag_bm25, "
                             "rag_dense, selective_context, llmlingua: the context text is shortened to the same "
                             "ratio); NAME:KEY=VALUE sets a parameter (e.g. kvzip:heads=shared)")
    parser.add_argument("--ratios", default=None, help="comma-separated eviction ratios in [0, 1)")
    parser.add_argument("--query-aware", action=argparse.BooleanOptionalAction, default=None,
                        help="put the question in the prefix before compressing (default: the preset's setting; "
                             "query-agnostic without a preset)")
    parser.add_argument("--mode", choices=["single", "multi-request", "multi-turn"], default="single",
                        help="single: each question on its own; multi-request: every question from the same "
                             "persisted .kv file; multi-turn: follow-ups in one conversation (default: single)")
    parser.add_argument("--kv-quant", "--quantize", dest="quantize", default=None,
                        help="comma-separated KV quantizations crossed with every policy cell: none,int8,int4,int2 "
                             "(KIVI; the cache is held quantized while decoding, e.g. snapkv@0.5 + int4); "
                             "SCHEME:gN sets the group size, SCHEME:rN the full-precision recent tokens "
                             "(e.g. int4:r0)")
    parser.add_argument("--max-kv-memory", default=None, metavar="SIZE[,SIZE...]",
                        help="comma-separated limits on the KV memory held while reading a document (with a unit, "
                             "e.g. 64MiB,256MiB): each adds a variant of every cell of an evicting policy whose "
                             "document is prefilled chunk by chunk and compressed as it goes, as `kvlab compress "
                             "--max-kv-memory` does (query-agnostic runs only)")
    parser.add_argument("--haystack-dir", default=None, help="folder of .txt files to use as haystack prose")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task generators (default: 0)")
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="prefill chunk size in tokens (default: 4096)")
    parser.add_argument("--force", action="store_true", help="run samples longer than the model's window")
    parser.add_argument("--out", default="kvlab-bench", help="output folder; rerunning resumes (default: %(default)s)")
    ray = parser.add_argument_group("Ray (pip install 'kvlab[ray]'; see README, Bench on a Ray cluster)")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run the samples on Ray workers: alone, on a local cluster started for the run; 'auto' or "
                          "an address (e.g. ray://head:10001), on an existing cluster")
    ray.add_argument("--ray-workers", type=int, default=None,
                     help="workers, each loading the model once (default: as many as the cluster's CPUs, or GPUs, "
                          "allow)")
    ray.add_argument("--ray-cpus-per-worker", type=float, default=1.0,
                     help="CPUs each worker reserves; its torch threads (default: %(default)s)")
    ray.add_argument("--ray-gpus-per-worker", type=float, default=0.0,
                     help="GPUs each worker reserves (e.g. 1, or 0.5 to share one); 0: CPU workers "
                          "(default: %(default)s)")
    ray.add_argument("--ray-retries", type=int, default=2,
                     help="times a failed sample is retried before it is recorded as failed (default: %(default)s)")
    parser.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")
    parser.add_argument("--list-formats", action="store_true",
                        help="list the --data formats, the fields each reads and its metrics, and exit")


RAY_DEFAULTS = {"ray_workers": None, "ray_cpus_per_worker": 1.0, "ray_gpus_per_worker": 0.0, "ray_retries": 2}


def run(args: argparse.Namespace) -> int:
    if args.list_formats:
        from kvlab.bench.formats import list_formats_text  # no torch: the formats need no model

        print(list_formats_text())
        return 0
    from kvlab.bench.session import BenchRequest, list_tasks_text, run_bench

    if args.list_tasks:
        print(list_tasks_text())
        return 0
    request = BenchRequest.from_cli(args)
    ray = None
    if args.ray is not None:
        from kvlab.bench.distributed import RayOptions

        ray = RayOptions(address=None if args.ray == "local" else args.ray, workers=args.ray_workers,
                         cpus_per_worker=args.ray_cpus_per_worker, gpus_per_worker=args.ray_gpus_per_worker,
                         retries=args.ray_retries)
    elif any(getattr(args, name) != default for name, default in RAY_DEFAULTS.items()):
        from kvlab.errors import ParameterError

        raise ParameterError("--ray-workers, --ray-cpus-per-worker, --ray-gpus-per-worker and --ray-retries apply "
                             "to a Ray run: add --ray")
    outcome = run_bench(request, progress=True, ray=ray)
    print(outcome.paths["header"])  # the same lines `kvlab report` prints for this folder
    print()
    print(outcome.table)
    print(outcome.status_line)
    print(f"report: {outcome.paths['html']}")
    return 130 if outcome.interrupted else 0

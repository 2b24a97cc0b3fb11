"""kvlab profile: measure a model's head profile once (which KV heads retrieve from the context), or show it.

The samples are built here: offline prose from ``bench.haystack`` in the model's own tokens, with a needle of
random vocabulary tokens at depths spread from 0 to 1, then the needle again (``engine.profile`` scores the heads
while the model reads that copy). Policies that rank heads (``duo``) read the stored profile.
"""

from __future__ import annotations

import argparse

from kvlab.cli.common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--samples", type=int, default=8, help="copy samples to average over (default: %(default)s)")
    parser.add_argument("--length", type=int, default=1024,
                        help="tokens per sample, haystack, needle and its copy (default: %(default)s)")
    parser.add_argument("--needle-tokens", type=int, default=16,
                        help="random tokens in the needle the model copies (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the haystack text and needles (default: 0)")
    parser.add_argument("--out", default=None,
                        help="profile file to write, or with --show to read (default: the profile store, the only "
                             "place duo reads: $KVLAB_CACHE_DIR/profiles/<fingerprint>.json)")
    parser.add_argument("--show", action="store_true",
                        help="print the stored profile and write its heatmap instead of measuring")
    parser.add_argument("--heatmap", default=None, help="heatmap PNG for --show (default: next to the profile file)")
    parser.epilog = ("examples:\n  kvlab profile --model smollm2-135m\n"
                     "  kvlab profile --model smollm2-135m --show\n"
                     "  kvlab ask --model smollm2-135m --context-file doc.txt --question '...' --policy duo "
                     "--ratio 0.75")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvlab.cli.common import load_model_from_args
    from kvlab.models.profile import load_profile, profile_path, read_profile, save_profile, write_heatmap

    loaded = load_model_from_args(args)
    if args.show:
        path = Path(args.out).expanduser() if args.out else profile_path(loaded.fingerprint)
        profile = (read_profile(path, expected_fingerprint=loaded.fingerprint, model=args.model) if args.out
                   else load_profile(loaded.fingerprint, model=args.model))
        print(describe(profile))
        heatmap = write_heatmap(profile, args.heatmap or path.with_suffix(".png"))
        print(f"heatmap: {heatmap}")
        return 0
    profile = measure(loaded, args)
    path = save_profile(profile, args.out)
    print(describe(profile))
    print(f"wrote {path}")
    return 0


def measure(loaded, args: argparse.Namespace):
    import torch

    from kvlab.bench.haystack import paragraphs
    from kvlab.engine.profile import copy_samples, measure_profile

    tokenizer = loaded.tokenizer
    special = set(tokenizer.all_special_ids)
    vocab_ids = torch.tensor(sorted(set(tokenizer.get_vocab().values()) - special))

    def prose(index: int, tokens: int) -> torch.Tensor:
        ids: list[int] = []
        for sentences in paragraphs(f"profile-{args.seed}-{index}"):
            ids += tokenizer(" ".join(sentences) + "\n\n", add_special_tokens=False)["input_ids"]
            if len(ids) >= tokens:
                return torch.tensor(ids[:tokens])
        raise AssertionError("paragraphs() is endless")

    samples = copy_samples(vocab_ids, samples=args.samples, length_tokens=args.length,
                           needle_tokens=args.needle_tokens, seed=args.seed, haystack=prose)
    settings = {"length_tokens": args.length, "needle_tokens": args.needle_tokens, "seed": args.seed,
                "haystack": "prose"}
    return measure_profile(loaded, samples, settings=settings, progress=True)


def describe(profile) -> str:
    """The profile as a table (layers x KV heads) and the best heads."""
    settings = ", ".join(f"{key}={value}" for key, value in profile.settings.items())
    lines = [f"head profile of {profile.model} (fingerprint {profile.fingerprint}; {profile.method}: {settings})"]
    heads = len(profile.scores[0])
    lines.append("layer  " + "  ".join(f"head {head:<3}" for head in range(heads)).rstrip())
    for layer, row in zip(profile.layers, profile.scores):
        lines.append(f"{layer:<5}  " + "  ".join(f"{score:<8.4f}" for score in row).rstrip())
    if len(profile.layers) < profile.num_layers:
        lines.append(f"({profile.num_layers - len(profile.layers)} sliding-window layers are not profiled)")
    best = profile.ranked_heads()[:5]
    lines.append("best heads: " + ", ".join(f"layer {layer} head {head} ({score:.4f})" for layer, head, score in best))
    return "\n".join(lines)

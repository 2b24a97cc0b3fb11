"""Options shared by subcommands that load a model or apply a policy; parsed values become typed objects here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvlab.errors import KvlabError, ParameterError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # models.dtypes.DTYPE_CHOICES; --help imports no torch


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded name (smollm2-135m, gemma3-270m, tiny-llama, tiny-gemma3), local folder or "
                             "Hugging Face id (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_dtype_argument(parser)
    parser.add_argument("--weights", choices=["fp", "int8"], default="fp",
                        help="int8: weight-only int8 linear layers (gpt-fast's scheme), faster CPU decoding; this "
                             "changes the model, not the cache (default: fp, the model's own weights)")
    add_extend_argument(parser)


def add_extend_argument(parser: argparse.ArgumentParser) -> None:
    """``--extend``: context extension past the trained window (``models.extension``)."""
    parser.add_argument("--extend", default=None, metavar="METHOD[:KEY=VALUE...]",
                        help="run past the model's trained window without training: self-extend[:group=G][:window=W] "
                             "groups positions further than W tokens back by G (default G=8, W=1024; the window "
                             "becomes (native - W) x G + W); yarn[:factor=F] interpolates RoPE (window: native x F, "
                             "default F=4); caches made with it need it (default: none)")


def load_model_from_args(args: argparse.Namespace, *, progress: bool = True):
    """The model the command's --model, --device, --dtype, --weights and --extend describe."""
    from kvlab.models import load_model
    from kvlab.models.extension import parse_extension

    extension = parse_extension(getattr(args, "extend", None))  # a bad spec fails before the model loads
    return load_model(args.model, device=args.device, dtype=args.dtype, weights=args.weights, progress=progress,
                      extension=extension)


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--dtype``: the weights' dtype (``models.dtypes``); part of ``add_model_arguments``, alone for ``bench``."""
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights' dtype; auto: float32 on CPU (about 5x faster there than bfloat16), the "
                             "checkpoint's own on a GPU; float16 needs a GPU (default: %(default)s)")


def add_policy_arguments(parser: argparse.ArgumentParser, *, default_help: str | None = None) -> None:
    """``default_help``: the command has its own default recipe (``--policy`` then defaults to None)."""
    if default_help is None:
        parser.add_argument("--policy", default="full",
                            help="KV-cache policy; see `kvlab policies` (default: %(default)s)")
    else:
        parser.add_argument("--policy", default=None, help=f"KV-cache policy; see `kvlab policies` ({default_help})")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, default=None,
                        help="fraction of context tokens evicted, in [0, 1) (default 0.5 for any policy but full)")
    amount.add_argument("--budget", type=int, default=None, help="context tokens kept per head per layer (mean)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="policy parameter, repeatable (e.g. -p window_tokens=64); see `kvlab policies show P`")


KV_QUANT_SCHEMES = ("int8", "int4", "int2")  # cache.quant.SCHEME_BITS, listed here so --help imports no torch
NO_KV_QUANT = "none"


def add_kv_quant_argument(parser: argparse.ArgumentParser, *, flag: str = "--kv-quant",
                          aliases: tuple[str, ...] = ()) -> None:
    parser.add_argument(flag, *aliases, dest="kv_quant", choices=(NO_KV_QUANT, *KV_QUANT_SCHEMES), default=None,
                        help="hold the KV cache quantized in memory while decoding (KIVI: keys per channel, values "
                             "per token); default: none")
    parser.add_argument("--kv-group-size", "--group-size", dest="kv_group_size", type=int, default=32,
                        help="tokens per key group and channels per value group (default: %(default)s; 64 holds "
                             "fewer scale bytes)")
    parser.add_argument("--kv-residual-tokens", "--residual-tokens", dest="kv_residual_tokens", type=int, default=None,
                        help="most recent tokens kept in full precision (default: 32)")


def kv_quant_from_args(args: argparse.Namespace):
    from kvlab.cache.quant import DEFAULT_RESIDUAL_TOKENS, QuantizationParams

    if args.kv_quant in (None, NO_KV_QUANT):
        return None
    residual = DEFAULT_RESIDUAL_TOKENS if args.kv_residual_tokens is None else args.kv_residual_tokens
    return QuantizationParams(args.kv_quant, args.kv_group_size, residual)


def policy_from_args(args: argparse.Namespace):
    from kvlab.policies import make_policy

    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParameterError(f"--param expects KEY=VALUE (got {item!r})")
        params[key.strip()] = value.strip()
    return make_policy(args.policy, **params)


def ratio_from_args(args: argparse.Namespace) -> float | None:
    if args.ratio is None and args.budget is None and args.policy != "full":
        return 0.5
    return args.ratio


def read_text(path: str) -> str:
    """Read a UTF-8 text file, or standard input for ``-``."""
    if path == "-":
        return sys.stdin.read()
    file = Path(path).expanduser()
    if not file.is_file():
        raise KvlabError(f"context file {path!r} does not exist; pass a UTF-8 text file to --context-file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KvlabError(f"context file {path!r} is not UTF-8 text; convert it first (e.g. iconv -t utf-8)") from None

"""kvlab serve: an OpenAI-compatible HTTP server (uvicorn) with compressed document caches and session reuse."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvlab.cli.common import add_kv_quant_argument, add_model_arguments, add_policy_arguments

    add_model_arguments(parser)
    add_policy_arguments(parser)
    add_kv_quant_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--store", default=None, help="document store folder (default: $KVLAB_CACHE_DIR/kv)")
    parser.add_argument("--max-queue", type=int, default=8,
                        help="requests that may wait for the model; more get 429 (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a request may take, queueing included; then 504 (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="tokens generated when a chat request gives no max_tokens (default: %(default)s)")
    parser.add_argument("--session-cache", default="1GiB",
                        help="KV bytes kept for documents and conversation prefixes (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.epilog = ("example:\n  kvlab serve --policy snapkv --ratio 0.75 --port 8000\n"
                     "  then any OpenAI client with base_url=http://127.0.0.1:8000/v1")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        from kvlab.errors import KvlabError

        raise KvlabError("kvlab serve needs the server extra: pip install 'kvlab[server]'") from None
    from kvlab.cli.common import policy_from_args, ratio_from_args
    from kvlab.server import Settings, create_app
    from kvlab.store.store import parse_size

    policy = policy_from_args(args)  # an unknown policy or parameter fails before the model loads
    settings = Settings(model=args.model, device=args.device, weights=args.weights, policy=policy.name,
                        policy_params=policy.params(), ratio=ratio_from_args(args), budget_tokens=args.budget,
                        kv_quant=None if args.kv_quant in (None, "none") else args.kv_quant,
                        store_root=args.store,
                        max_queue=args.max_queue, request_timeout_s=args.timeout,
                        default_max_tokens=args.max_tokens, session_cache_bytes=parse_size(args.session_cache,
                                                                                      require_unit=True))
    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

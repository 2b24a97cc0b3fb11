"""kvlab serve: an OpenAI-compatible HTTP server (uvicorn) with compressed document caches and session reuse; with
``--replicas N``, N model replicas behind one endpoint on Ray Serve (``kvlab.server.replicas``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvlab.cli.common import add_kv_quant_argument, add_model_arguments, add_policy_arguments

    add_model_arguments(parser)
    add_policy_arguments(parser)
    add_kv_quant_argument(parser)
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send and GET /v1/models lists (default: the --model's name); "
                             "the weights still load from --model")
    parser.add_argument("--compress-above", default="1024", type=_compress_above, metavar="TOKENS|off",
                        help="compress a request without a document with --policy once its prompt is longer than "
                             "this many tokens (its context, not its question); 0: every prompt; off: only requests "
                             "that name kvlab.policy or kvlab.ratio (default: %(default)s)")
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
    parser.add_argument("--max-document-tokens", type=int, default=None,
                        help="longest document POST /v1/documents may store, in tokens (default: the model's window)")
    parser.add_argument("--max-store-size", default=None,
                        help="quota: a document POST that would take the store past this size (with a unit, e.g. "
                             "2GB) gets 507 and stores nothing; nothing is evicted (default: no quota)")
    parser.add_argument("--max-store-documents", type=int, default=None,
                        help="quota: a document POST that would take the store past this many entries gets 507 "
                             "(default: no limit)")
    guard = parser.add_argument_group("access (see README, Serving)")
    guard.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                            "$KVLAB_API_KEY, else no key)")
    guard.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    guard.add_argument("--allowed-hosts", default=None,
                       help="comma-separated Host header values to answer ('*': any); default: localhost, "
                            "127.0.0.1, ::1 and --host")
    slow = parser.add_argument_group("slow clients (uvicorn; with --replicas only --keep-alive applies)")
    slow.add_argument("--read-timeout", type=float, default=30.0,
                      help="seconds a request's headers and body may take to arrive; then the connection is closed "
                           "(default: %(default)s)")
    slow.add_argument("--keep-alive", type=int, default=5,
                      help="seconds an idle keep-alive connection stays open (default: %(default)s)")
    slow.add_argument("--max-header-size", default="16KiB",
                      help="largest request header block, with a unit (default: %(default)s)")
    slow.add_argument("--max-connections", type=int, default=64,
                      help="open connections at once; beyond it uvicorn answers 503 (default: %(default)s)")
    scale = parser.add_argument_group("replicas (Ray Serve; see README, Serving)")
    scale.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="serve N model replicas behind one endpoint on Ray Serve, with document cache affinity "
                            "(default: one process on uvicorn, without Ray)")
    scale.add_argument("--ray", default=None, metavar="ADDRESS",
                       help="with --replicas: join this Ray cluster ('auto' or HOST:PORT; give every node the same "
                            "--store path) instead of starting a local one")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.epilog = ("example:\n  kvlab serve --policy snapkv --ratio 0.75 --port 8000\n"
                     "  then any OpenAI client with base_url=http://127.0.0.1:8000/v1")


def _compress_above(value: str) -> int | None:
    if value.strip().lower() in ("off", "none", "never"):
        return None
    try:
        tokens = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'off' (got {value!r})") from None
    if tokens < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 tokens, or 'off' (got {tokens})")
    return tokens


def run(args: argparse.Namespace) -> int:
    from kvlab.errors import ParameterError

    if args.replicas is not None and args.replicas < 1:
        raise ParameterError(f"--replicas must be >= 1 (got {args.replicas}); leave it out to serve in one process")
    if args.ray is not None and args.replicas is None:
        raise ParameterError("--ray joins a Ray cluster for --replicas N; give --replicas too")
    try:
        import uvicorn
    except ImportError:
        from kvlab.errors import KvlabError

        raise KvlabError("kvlab serve needs the server extra: pip install 'kvlab[server]'") from None
    if args.replicas is not None:
        from kvlab.server.replicas import require_ray

        require_ray()  # before the settings are checked and long before a model loads
    settings = _settings(args)
    if args.replicas is not None:
        return _serve_replicas(args, settings)
    from kvlab.server import create_app
    from kvlab.server.slowclients import uvicorn_config
    from kvlab.store.store import parse_size

    config = uvicorn_config(None, args.host, args.port, log_level=args.log_level, read_timeout_s=args.read_timeout,
                            keep_alive_s=args.keep_alive,
                            max_header_bytes=parse_size(args.max_header_size, require_unit=True),
                            limit_concurrency=args.max_connections)  # checked before the model loads
    config.app = create_app(settings)
    uvicorn.Server(config).run()
    return 0


def _serve_replicas(args: argparse.Namespace, settings) -> int:
    """Start the replicas on Ray Serve, print where, and serve until Ctrl-C or SIGTERM; then remove the app (and stop
    a local cluster, which would otherwise outlive this process)."""
    import signal
    import time

    from kvlab.server import replicas

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        url = replicas.start(settings, args.replicas, args.host, args.port, address=args.ray,
                             keep_alive_s=args.keep_alive, log_level=args.log_level)
        print(f"kvlab: serving {settings.model} on {url}/v1 with {args.replicas} replica"
              f"{'s' if args.replicas > 1 else ''} (Ray Serve{', cluster ' + args.ray if args.ray else ''}); "
              f"Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        replicas.stop(joined=args.ray is not None)


def _settings(args: argparse.Namespace):
    import os

    from kvlab.cli.common import policy_from_args, ratio_from_args
    from kvlab.errors import ParameterError
    from kvlab.models.extension import extension_label
    from kvlab.server import Settings
    from kvlab.server.settings import LOOPBACK_HOSTS
    from kvlab.store.store import parse_size

    policy = policy_from_args(args)  # an unknown policy or parameter fails before the model loads
    if args.allowed_hosts is not None:
        hosts = tuple(host.strip() for host in args.allowed_hosts.split(",") if host.strip())
    else:
        hosts = (*LOOPBACK_HOSTS, args.host)
    for name in ("read_timeout", "keep_alive", "max_connections"):
        if getattr(args, name) <= 0:
            raise ParameterError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    settings = Settings(model=args.model, device=args.device, dtype=args.dtype, weights=args.weights,
                        extension=extension_label(args.extend),
                        policy=policy.name,
                        policy_params=policy.params(), ratio=ratio_from_args(args), budget_tokens=args.budget,
                        kv_quant=None if args.kv_quant in (None, "none") else args.kv_quant,
                        store_root=args.store,
                        max_queue=args.max_queue, request_timeout_s=args.timeout,
                        default_max_tokens=args.max_tokens, session_cache_bytes=parse_size(args.session_cache,
                                                                                      require_unit=True),
                        max_document_tokens=args.max_document_tokens,
                        max_store_bytes=(None if args.max_store_size is None
                                         else parse_size(args.max_store_size, require_unit=True)),
                        max_store_documents=args.max_store_documents,
                        api_key=args.api_key or os.environ.get("KVLAB_API_KEY") or None,
                        metrics_public=args.metrics_public, allowed_hosts=hosts,
                        served_model_name=args.served_model_name, compress_above=args.compress_above)
    parse_size(args.max_header_size, require_unit=True)  # a bad size fails before the model loads, with any server
    return settings

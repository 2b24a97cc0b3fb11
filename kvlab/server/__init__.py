"""An OpenAI-compatible HTTP server with persisted, compressed document caches and conversation prefix reuse.

Start it with ``kvlab serve`` (uvicorn) or build the ASGI app with ``create_app(Settings(...))``. Any OpenAI client
works against ``http://HOST:PORT/v1``:

- ``GET /v1/models``; ``POST /v1/chat/completions`` and ``POST /v1/completions``, streaming or not, with
  ``temperature``, ``top_p``, ``max_tokens`` (``max_completion_tokens``), ``stop``, ``seed`` and
  ``stream_options.include_usage``. Defaults follow OpenAI: temperature 1, top_p 1.
- ``POST /v1/documents`` ``{"text": ..., "policy"?, "ratio"?, "budget_tokens"?, "policy_params"?}`` prefills the
  text once, compresses its KV cache with the server's policy (or the one given) and stores it; the answer has its
  ``id``, ``context_tokens``, ``kept_tokens`` and KV and file bytes. ``GET /v1/documents``,
  ``GET /v1/documents/{id}``, ``DELETE /v1/documents/{id}``.
- ``GET /health``; ``GET /metrics`` (Prometheus text).

**The ``kvlab`` extension field.** A completion request may carry ``"kvlab": {"document_id": ID, "ignore_eos":
false, "top_k": 0}`` (the openai client: ``extra_body={"kvlab": {"document_id": ID}}``). With ``document_id`` the
messages are asked about the document: only the messages are prefilled, on top of the document's compressed cache;
the first user message continues the user turn that holds the document, and system messages go at its start.
Responses carry ``usage.prompt_tokens_details.cached_tokens`` (prompt tokens not prefilled: the document and any
earlier turns found in the prefix cache) and a ``kvlab`` object with ``prefilled_tokens``, ``cached_tokens``,
``kv_bytes``, ``prefill_s``, ``decode_s`` and ``queue_s``.

**Sessions.** A conversation's next turn sends the earlier turns again, as OpenAI clients do; the server finds the
longest cached prefix of its tokens and prefills only the rest (``sessions.py``).

Errors use OpenAI's JSON shape (``errors.py``); one model runs one request at a time behind a bounded queue
(``worker.py``). ``kvlab serve --replicas N`` runs N such apps on Ray Serve behind one endpoint (``replicas.py``).
"""

from kvlab.server.app import create_app
from kvlab.server.settings import Settings

__all__ = ["Settings", "create_app"]

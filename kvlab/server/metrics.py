"""Prometheus text exposition (format 0.0.4), written by hand: counters and gauges with HELP and TYPE lines.

Counters only grow; gauges are read when ``/metrics`` is scraped. Seconds are wall-clock; bytes are KV bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

COUNTERS = {
    "kvlab_requests_total": "HTTP requests by route and status code; 499: the client went away before the answer",
    "kvlab_prompt_tokens_total": "prompt tokens of completed generations (document tokens included)",
    "kvlab_prefilled_tokens_total": "prompt tokens run through the model (the rest came from cached prefixes)",
    "kvlab_cached_prompt_tokens_total": "prompt tokens served from a document or prefix cache",
    "kvlab_completion_tokens_total": "tokens returned by completed generations",
    "kvlab_generated_tokens_total": "tokens sampled, cancelled generations included",
    "kvlab_prefill_seconds_total": "seconds spent prefilling prompts",
    "kvlab_decode_seconds_total": "seconds spent decoding",
    "kvlab_prefix_cache_hits_total": "generations that continued a cached prefix (a document or earlier turns)",
    "kvlab_session_recompressions_total": "document sessions compressed again after outgrowing their budget",
    "kvlab_prefix_cache_misses_total": "generations prefilled from scratch",
    "kvlab_document_loads_total": "document caches read from the store into memory",
    "kvlab_documents_created_total": "documents prefilled, compressed and stored",
    "kvlab_generations_cancelled_total": "generations stopped early, by reason (disconnect, timeout, shutdown)",
    "kvlab_uploads_abandoned_total": "document uploads stopped before storing, by reason (disconnect, timeout, "
                                     "shutdown); they write and count nothing else",
    "kvlab_rejected_requests_total": "requests refused with 429 because the queue was full, by kind (generation, "
                                     "document)",
}


class Metrics:
    """Thread-safe counters with optional labels, plus gauges computed at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = {}
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name!r}")
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + amount

    def value(self, name: str, **labels: str) -> float:
        """A counter's value; without labels, the sum over all label sets."""
        with self._lock:
            if labels:
                return self._counters.get((name, tuple(sorted(labels.items()))), 0)
            return sum(value for (counter, _), value in self._counters.items() if counter == name)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges[name] = (help_text, read)

    def render(self) -> str:
        lines = []
        with self._lock:
            counters = dict(self._counters)
        for name, help_text in COUNTERS.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            series = [(labels, value) for (counter, labels), value in counters.items() if counter == name]
            for labels, value in sorted(series) or [((), 0)]:
                lines.append(f"{name}{_labels(labels)} {_number(value)}")
        for name, (help_text, read) in self._gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_number(read())}"]
        return "\n".join(lines) + "\n"


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels) + "}"


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` from an exposition (for tests and the load benchmark)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values

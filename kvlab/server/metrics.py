"""The server's Prometheus metrics on ``prometheus_client``: counters, histograms and scrape-time gauges, each app with
its own ``CollectorRegistry`` (tests run several apps in one process; the default registry would mix them).

Counters only grow; gauges are read when ``/metrics`` is scraped; histograms hold latencies. Seconds are
wall-clock; bytes are KV bytes. Every name and label set is declared here, so a typo fails at the first ``inc``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# generate_latest writes text format 0.0.4 for names like these (no UTF-8 escaping needed), which every Prometheus
# version reads; newer prometheus_client versions advertise 1.0.0 by default, older ones have no constant for it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {  # name -> (help, label names)
    "kvlab_requests_total": ("HTTP requests by route and status code; 499: the client went away before the answer",
                             ("route", "status")),
    "kvlab_prompt_tokens_total": ("prompt tokens of completed generations (document tokens included)", ()),
    "kvlab_prefilled_tokens_total": ("prompt tokens run through the model (the rest came from cached prefixes)", ()),
    "kvlab_cached_prompt_tokens_total": ("prompt tokens served from a document or prefix cache", ()),
    "kvlab_completion_tokens_total": ("tokens returned by completed generations", ()),
    "kvlab_generated_tokens_total": ("tokens sampled, cancelled generations included", ()),
    "kvlab_prefill_seconds_total": ("seconds spent prefilling prompts", ()),
    "kvlab_decode_seconds_total": ("seconds spent decoding", ()),
    "kvlab_prefix_cache_hits_total": ("generations that continued a cached prefix (a document or earlier turns)", ()),
    "kvlab_session_recompressions_total": ("document sessions compressed again after outgrowing their budget", ()),
    "kvlab_prefix_cache_misses_total": ("generations prefilled from scratch", ()),
    "kvlab_document_loads_total": ("document caches read from the store into memory", ()),
    "kvlab_documents_created_total": ("documents prefilled, compressed and stored", ()),
    "kvlab_generations_cancelled_total": ("generations stopped early, by reason (disconnect, timeout, shutdown)",
                                          ("reason",)),
    "kvlab_uploads_abandoned_total": ("document uploads stopped before storing, by reason (disconnect, timeout, "
                                      "shutdown); they write and count nothing else", ("reason",)),
    "kvlab_rejected_requests_total": ("requests refused with 429 because the queue was full, by kind (generation, "
                                      "document)", ("kind",)),
}

# Upper bounds in seconds: from a cached prefix on a GPU (milliseconds) to a long CPU prefill (minutes).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kvlab_time_to_first_token_seconds": ("seconds from a generation request's arrival to its first sampled token "
                                          "(queueing and prefill included), by route", ("route",)),
    "kvlab_request_latency_seconds": ("seconds from a generation request's arrival to its last token, by route; "
                                      "completed generations only", ("route",)),
}


class Metrics:
    """Counters, histograms and scrape-time gauges in one registry; thread-safe (prometheus_client locks)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters = {name: Counter(name, help_text, labels, registry=self.registry)
                          for name, (help_text, labels) in COUNTERS.items()}
        self._histograms = {name: Histogram(name, help_text, labels, buckets=LATENCY_BUCKETS_S,
                                            registry=self.registry)
                            for name, (help_text, labels) in HISTOGRAMS.items()}
        self._gauges: dict[str, Gauge] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        if name not in self._counters:
            raise KeyError(f"unknown counter {name!r}")
        counter = self._counters[name]
        (counter.labels(**labels) if labels else counter).inc(amount)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        if name not in self._histograms:
            raise KeyError(f"unknown histogram {name!r}")
        histogram = self._histograms[name]
        (histogram.labels(**labels) if labels else histogram).observe(seconds)

    def value(self, name: str, **labels: str) -> float:
        """A counter's value for the series matching ``labels``; without labels, the sum over all series."""
        if name not in self._counters:
            raise KeyError(f"unknown counter {name!r}")
        return sum(sample.value for family in self._counters[name].collect() for sample in family.samples
                   if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()))

    def count(self, name: str, **labels: str) -> int:
        """How many observations a histogram holds for the series matching ``labels`` (all series without)."""
        if name not in self._histograms:
            raise KeyError(f"unknown histogram {name!r}")
        return int(sum(sample.value for family in self._histograms[name].collect() for sample in family.samples
                       if sample.name == f"{name}_count"
                       and all(sample.labels.get(key) == value for key, value in labels.items())))

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge read by ``read()`` at each scrape; registering a name again replaces its reader."""
        if name not in self._gauges:
            self._gauges[name] = Gauge(name, help_text, registry=self.registry)
        self._gauges[name].set_function(read)

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")


def parse(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` from an exposition (for tests and the load benchmark)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def merge(expositions: Iterable[tuple[str, bool]], extra: Iterable[Metric] = ()) -> str:
    """One exposition summing several servers' (``kvlab serve --replicas``): ``(text, live)`` pairs, each text one
    server's ``render()``. Samples with the same name and labels add up: counters and histograms of every server,
    gauges of the ``live`` ones only (a server that stopped reporting holds no queue or memory any more, but what it
    counted before it went stays counted). ``*_created`` timestamps take the earliest. ``extra`` families (e.g. the
    number of replicas) are appended as they are."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text, live in expositions:
        for family in text_string_to_metric_families(text):
            if family.type == "gauge" and not live and not family.name.endswith("_created"):
                continue
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            summed = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if sample.name.endswith("_created"):
                    summed[key] = min(summed.get(key, sample.value), sample.value)
                else:
                    summed[key] = summed.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*families.values(), *extra]))
    return generate_latest(registry).decode("utf-8")


class _Fixed(Collector):
    """Families built elsewhere, exposed as they are."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families

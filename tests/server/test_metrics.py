"""``/metrics`` on prometheus_client: one registry per app, histograms of time to first token and request latency
by route, observed by the generation path."""

from __future__ import annotations

import httpx
import pytest

from kvlab.server.metrics import LATENCY_BUCKETS_S, Metrics, parse

MODEL = "tiny-llama"


def test_each_metrics_object_has_its_own_registry():
    first, second = Metrics(), Metrics()
    first.inc("kvlab_documents_created_total")
    first.inc("kvlab_requests_total", route="/health", status="200")
    first.inc("kvlab_requests_total", route="/health", status="499")
    assert first.value("kvlab_documents_created_total") == 1 and second.value("kvlab_documents_created_total") == 0
    assert first.value("kvlab_requests_total") == 2 and first.value("kvlab_requests_total", status="499") == 1
    assert parse(second.render())["kvlab_documents_created_total"] == 0


def test_names_and_labels_are_declared():
    metrics = Metrics()
    with pytest.raises(KeyError, match="unknown counter"):
        metrics.inc("kvlab_requests_totl")
    with pytest.raises(KeyError, match="unknown histogram"):
        metrics.observe("kvlab_ttft", 0.1)
    with pytest.raises(ValueError):
        metrics.inc("kvlab_requests_total", route="/health")  # the status label is missing


def test_histogram_buckets_count_observations():
    metrics = Metrics()
    metrics.observe("kvlab_request_latency_seconds", 0.07, route="/v1/completions")
    metrics.observe("kvlab_request_latency_seconds", 3.0, route="/v1/completions")
    values = parse(metrics.render())
    series = 'kvlab_request_latency_seconds_bucket{le="%s",route="/v1/completions"}'
    assert values[series % "0.05"] == 0 and values[series % "0.1"] == 1 and values[series % "5.0"] == 2
    assert values['kvlab_request_latency_seconds_sum{route="/v1/completions"}'] == pytest.approx(3.07)
    assert metrics.count("kvlab_request_latency_seconds", route="/v1/completions") == 2
    assert metrics.count("kvlab_time_to_first_token_seconds") == 0
    assert list(LATENCY_BUCKETS_S) == sorted(LATENCY_BUCKETS_S)


def test_gauge_is_read_at_scrape_time_and_can_be_replaced():
    metrics, held = Metrics(), [5]
    metrics.gauge("kvlab_kv_bytes_held", "bytes", lambda: held[0])
    held[0] = 7
    assert parse(metrics.render())["kvlab_kv_bytes_held"] == 7
    metrics.gauge("kvlab_kv_bytes_held", "bytes", lambda: 11)
    assert parse(metrics.render())["kvlab_kv_bytes_held"] == 11


def test_generations_observe_latency_histograms_by_route(start):
    with start() as first, start() as second:
        completion = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0,
                      "kvlab": {"ignore_eos": True}}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "kvlab": {"ignore_eos": True}}
        assert httpx.post(f"{first.url}/v1/completions", json=completion, timeout=30).status_code == 200
        assert httpx.post(f"{first.url}/v1/chat/completions", json=chat, timeout=30).status_code == 200
        values = first.metrics()
        for route in ("/v1/completions", "/v1/chat/completions"):
            assert values[f'kvlab_time_to_first_token_seconds_count{{route="{route}"}}'] == 1
            assert values[f'kvlab_request_latency_seconds_count{{route="{route}"}}'] == 1
            assert values[f'kvlab_request_latency_seconds_bucket{{le="+Inf",route="{route}"}}'] == 1
            # the first token comes before the last
            assert (values[f'kvlab_time_to_first_token_seconds_sum{{route="{route}"}}']
                    <= values[f'kvlab_request_latency_seconds_sum{{route="{route}"}}'])
        assert values["kvlab_completion_tokens_total"] == 5
        # the second app, in the same process, saw none of it
        other = second.metrics()
        assert other["kvlab_completion_tokens_total"] == 0
        assert not any(name.startswith("kvlab_request_latency_seconds_count") for name in other)
        scraped = httpx.get(f"{first.url}/metrics")
        assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "# TYPE kvlab_time_to_first_token_seconds histogram" in scraped.text


def test_scoring_only_request_has_no_first_token(start):
    with start() as running:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 0, "echo": True, "logprobs": 1}
        assert httpx.post(f"{running.url}/v1/completions", json=body, timeout=30).status_code == 200
        assert running.state.metrics.count("kvlab_time_to_first_token_seconds") == 0
        assert running.state.metrics.count("kvlab_request_latency_seconds", route="/v1/completions") == 1

"""Normal clients beside hostile ones (issue 14): does the server stay usable while it is abused?

Conditions: one server on loopback (uvicorn in a background thread, tiny random model unless --model), a fresh
temporary store, 4 normal clients asking short chats on a stored document in a loop. The normal and the hostile
clients run in two processes of their own at a lower CPU priority (nice 10), standing in for clients on other
machines: client work (sending 14 MB bodies) never competes with the server for its interpreter lock or its cores.
Phase 1 runs the normal clients alone; phase 2 adds 4 hostile clients, one per kind: huge stop strings, 14 MB
prompts, uploads abandoned after 0.2 s, and concurrent GETs of the document. Reported: normal clients' failures
(anything but 200, or 429 with Retry-After), their p95 latency in both phases and its ratio, the server process's
peak RSS, and the store entries written by cancelled uploads (should be 0), each checked against the issue's target
(the RSS bound is --rss-bound-mib).
Prints the figures and writes JSON to benchmarks/results/server_abuse.json.

    python benchmarks/server_abuse.py --seconds 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

NORMAL_CLIENTS = 4
HOSTILE_KINDS = ("huge_stop", "huge_prompt", "abandoned_upload", "concurrent_get")
DOCUMENT = "The pass key is 4242. " + "The sky was grey and the sea was calm. " * 40


def normal_client(url: str, model: str, document_id: str, stop_at: float, latencies: list, failures: list) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "What is the pass key?"}], "max_tokens": 8,
            "temperature": 0, "kvlab": {"document_id": document_id}}
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            response = client.post("/v1/chat/completions", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            elif response.status_code == 429 and "retry-after" in response.headers:
                time.sleep(float(response.headers["retry-after"]))
            else:
                failures.append(f"{response.status_code} {response.text[:120]}")


def hostile_client(kind: str, url: str, model: str, document_id: str, stop_at: float, answers: list) -> None:
    # The big bodies are encoded once, as an attacker would: the client process's own CPU (on the same 2 cores as
    # the server, here) is not what is measured.
    json_type = {"content-type": "application/json"}
    huge_prompt = json.dumps({"model": model, "prompt": "x" * 14_000_000}).encode()
    huge_stop = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                            "stop": "a" * 1_000_000}).encode()
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.monotonic() < stop_at:
            try:
                if kind == "huge_stop":
                    response = client.post("/v1/chat/completions", content=huge_stop, headers=json_type)
                elif kind == "huge_prompt":
                    response = client.post("/v1/completions", content=huge_prompt, headers=json_type)
                elif kind == "abandoned_upload":
                    text = f"{time.monotonic()} " + "word " * 700  # new text each time: never found in the store
                    response = httpx.post(f"{url}/v1/documents", json={"text": text}, timeout=0.2)
                else:
                    response = client.get(f"/v1/documents/{document_id}")
                answers.append((kind, response.status_code))
            except httpx.TimeoutException:
                answers.append((kind, "abandoned"))
            except httpx.TransportError:  # a body refused from its Content-Length: the server closed mid-upload
                answers.append((kind, "closed"))
            time.sleep(0.05)


def clients(kinds: list[str], url: str, model: str, document_id: str, stop_at: float) -> tuple:
    """Run one group of clients (``"normal"`` or a hostile kind each) until ``stop_at`` (``time.time()``); runs in a
    client process of its own, so the clients' work never competes with the server for its interpreter lock."""
    latencies: list[float] = []
    failures: list[str] = []
    answers: list = []
    stop_monotonic = time.monotonic() + (stop_at - time.time())
    threads = [threading.Thread(target=normal_client, args=(url, model, document_id, stop_monotonic, latencies,
                                                             failures)) if kind == "normal" else
               threading.Thread(target=hostile_client, args=(kind, url, model, document_id, stop_monotonic, answers))
               for kind in kinds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures, answers


def _lower_priority(niceness: int) -> None:
    """Client processes run at ``--client-nice`` (10): on a 2-core machine they stand in for clients on other
    machines, so the server gets the CPU it asks for and the clients the rest, in both phases alike."""
    import os

    os.nice(niceness)


def phase(pool, url: str, model: str, document_id: str, seconds: float, hostile: bool) -> dict:
    stop_at = time.time() + seconds
    normal = pool.apply_async(clients, (["normal"] * NORMAL_CLIENTS, url, model, document_id, stop_at))
    attack = pool.apply_async(clients, (list(HOSTILE_KINDS) if hostile else [], url, model, document_id, stop_at))
    latencies, failures, _ = normal.get(timeout=seconds + 120)
    answers = attack.get(timeout=seconds + 120)[2]
    p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) >= 2 else float("nan")
    hostile_answers: dict[str, dict[str, int]] = {}
    for kind, status in answers:
        hostile_answers.setdefault(kind, {}).setdefault(str(status), 0)
        hostile_answers[kind][str(status)] += 1
    return {"requests": len(latencies), "failures": len(failures), "failure_examples": failures[:5],
            "p95_s": round(p95, 4), "hostile_answers": hostile_answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/server_abuse.json")
    parser.add_argument("--client-nice", type=int, default=10,
                        help="niceness of the client processes; 0 makes them compete with the server for the "
                             "cores as equals (default: %(default)s)")
    parser.add_argument("--rss-bound-mib", type=float, default=1024.0,
                        help="the server process's stated peak-RSS bound, checked (default: %(default)s)")
    args = parser.parse_args()
    from kvlab.server import Settings, create_app  # here, not at the top: the client processes never import torch
    from kvlab.server.background import serve_in_background

    store = Path(tempfile.mkdtemp(prefix="kvlab-abuse-"))
    app = create_app(Settings(model=args.model, store_root=store, request_timeout_s=60, max_queue=8))
    state = app.state.kvlab
    spawn = multiprocessing.get_context("spawn")
    with serve_in_background(app) as url, spawn.Pool(2, _lower_priority, (args.client_nice,)) as pool:
        pool.map(time.sleep, [1.0, 1.0], chunksize=1)  # both client processes started before the clock runs
        document_id = httpx.post(f"{url}/v1/documents", json={"text": DOCUMENT}, timeout=120).json()["id"]
        entries_before = len(state.store.list())
        calm = phase(pool, url, args.model, document_id, args.seconds, hostile=False)
        abused = phase(pool, url, args.model, document_id, args.seconds, hostile=True)
        state.worker.stop(timeout_s=30)
        written = len(state.store.list()) - entries_before
    created = state.metrics.value("kvlab_documents_created_total") - 1
    result = {
        "conditions": {"model": args.model, "fingerprint": state.fingerprint, "seconds_per_phase": args.seconds,
                       "normal_clients": NORMAL_CLIENTS, "hostile_clients": len(HOSTILE_KINDS),
                       "clients": "two client processes (normal, hostile) beside the server's",
                       "client_nice": args.client_nice,
                       "python": platform.python_version(),
                       "machine": platform.machine(), "git_hash": _git_hash()},
        "calm": calm, "abused": abused,
        "p95_ratio": round(abused["p95_s"] / calm["p95_s"], 3) if calm["p95_s"] else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "store_entries_written_by_hostile_uploads": written, "documents_created_counted": created,
    }
    result["targets"] = {
        "normal clients fail only with 429 + Retry-After": calm["failures"] == 0 and abused["failures"] == 0,
        "abused p95 within 2x of calm": result["p95_ratio"] is not None and result["p95_ratio"] <= 2.0,
        f"server peak RSS under {args.rss_bound_mib:g} MiB": result["peak_rss_mib"] <= args.rss_bound_mib,
        "nothing written by cancelled uploads": written == 0 and created == 0,
    }
    print(f"normal clients: calm {calm['requests']} requests, p95 {calm['p95_s']} s, {calm['failures']} failures; "
          f"abused {abused['requests']} requests, p95 {abused['p95_s']} s, {abused['failures']} failures "
          f"(p95 ratio {result['p95_ratio']})")
    print(f"peak RSS {result['peak_rss_mib']} MiB; store entries written by abandoned uploads: {written} "
          f"(documents counted as created: {created})")
    print(f"hostile answers: {abused['hostile_answers']}")
    for target, met in result["targets"].items():
        print(f"  {'met    ' if met else 'NOT met'}  {target}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def _git_hash() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()

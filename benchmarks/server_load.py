"""Load on `kvlab serve`: N concurrent clients for T seconds, then time-to-first-token for a question on a stored
document against the same question with the whole document in the prompt.

The server runs in this process on loopback (uvicorn in a thread) unless --url names a running one, or --replicas N
starts `kvlab serve` in a subprocess on a free port (N = 1: one process, no Ray; N >= 2: `kvlab serve --replicas N`
on a local Ray cluster), polled until /health answers and stopped with Ctrl-C's signal at the end. Load phase: each
client sends non-streaming chat requests back to back (unique prompts, so nothing is served from the prefix cache;
fixed-length answers via kvlab's ``ignore_eos``); a 429 is counted apart from failures and the client waits for
its Retry-After (at most 1 s). Latency is per request, client side; tokens/s is completion tokens over the phase's
wall time. TTFT phase (server idle): a ~D-token generated document is posted once; each question is streamed
(a) naming the document (only the question is prefilled) and (b) with the document in the message (all of it is
prefilled); TTFT is the time to the first content chunk. The first document question also reads the document from
the store, so it is reported apart ("cold"). Prints the figures; writes JSON.

    python benchmarks/server_load.py --model smollm2-135m --clients 4 --seconds 20 --max-tokens 16 \
        --out benchmarks/results/server_load_smollm2_cpu.json
    python benchmarks/server_load.py --model smollm2-135m --clients 4 --seconds 20 --replicas 2 \
        --out benchmarks/results/server_replicas_smollm2_2.json
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _common import environment, write_json

MAX_CLIENTS, MAX_SECONDS = 64, 600
QUESTIONS = ["What is the pass key?", "Which number is the pass key?", "Tell me the pass key.",
             "What number should I remember?", "Repeat the pass key.", "What is the secret number?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start one in this process)")
    parser.add_argument("--model", default="smollm2-135m", help="model to serve (in-process or --replicas server)")
    parser.add_argument("--replicas", type=int, default=None,
                        help="start `kvlab serve` in a subprocess: 1 = one process (no Ray), N >= 2 = --replicas N "
                             "on a local Ray cluster (default: the server runs in this process)")
    parser.add_argument("--policy", default="full", help="document policy of the in-process server")
    parser.add_argument("--ratio", type=float, default=None)
    parser.add_argument("--clients", type=int, default=4, help=f"concurrent clients, 1..{MAX_CLIENTS}")
    parser.add_argument("--seconds", type=float, default=20, help=f"load phase length, at most {MAX_SECONDS}")
    parser.add_argument("--max-tokens", type=int, default=16, help="completion tokens per load request")
    parser.add_argument("--max-queue", type=int, default=8, help="queue bound of the in-process server")
    parser.add_argument("--doc-tokens", type=int, default=2000, help="document length for the TTFT comparison")
    parser.add_argument("--ttft-repeats", type=int, default=3, help="questions asked each way")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be in 1..{MAX_CLIENTS} and --seconds in (0, {MAX_SECONDS}]")
    if not 1 <= args.ttft_repeats < len(QUESTIONS):
        parser.error(f"--ttft-repeats must be in 1..{len(QUESTIONS) - 1}")
    if args.replicas is not None and (args.replicas < 1 or args.url):
        parser.error("--replicas must be >= 1, and it starts its own server (leave out --url)")

    with server(args) as (url, tokenizer):
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        chat(url, model, "Warm up.", args.max_tokens)  # the first forward passes are slow; not timed
        load = load_phase(url, model, args)
        ttft = ttft_phase(url, model, args, tokenizer)
    report(args, model, load, ttft)
    write_json(args.out, {"benchmark": "server_load", "model": model, "settings": vars(args), "load": load,
                          "ttft": ttft, "environment": environment()})


@contextlib.contextmanager
def server(args):
    if args.url:
        yield args.url.rstrip("/"), None
        return
    if args.replicas is not None:
        with tempfile.TemporaryDirectory() as folder, serve_subprocess(args, Path(folder)) as url:
            yield url, None
        return
    from kvlab.server import Settings, create_app
    from kvlab.server.background import serve_in_background

    with tempfile.TemporaryDirectory() as store:
        settings = Settings(model=args.model, policy=args.policy, ratio=args.ratio, store_root=store,
                            max_queue=args.max_queue)
        app = create_app(settings)
        with serve_in_background(app) as url:
            yield url, app.state.kvlab.engine.tokenizer


@contextlib.contextmanager
def serve_subprocess(args, folder: Path, start_timeout_s: float = 600):
    """`kvlab serve` (with --replicas N when N >= 2) on a free port, its store and log in ``folder``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "kvlab", "serve", "--model", args.model, "--policy", args.policy,
               "--port", str(port), "--store", str(folder / "store"), "--max-queue", str(args.max_queue),
               "--log-level", "warning"]
    command += [] if args.ratio is None else ["--ratio", str(args.ratio)]
    command += ["--replicas", str(args.replicas)] if args.replicas >= 2 else []
    url = f"http://127.0.0.1:{port}"
    with open(folder / "serve.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout_s
            while not healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(command)} did not become healthy:\n"
                                       + (folder / "serve.log").read_text()[-3000:])
                time.sleep(0.5)
            yield url
        finally:
            process.send_signal(signal.SIGINT)  # as Ctrl-C: the replicas' cluster is stopped too
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def chat(url: str, model: str, content: str, max_tokens: int, client: httpx.Client | None = None) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "kvlab": {"ignore_eos": True}}
    return (client or httpx).post(f"{url}/v1/chat/completions", json=body, timeout=600)


def load_phase(url: str, model: str, args) -> dict:
    latencies_s: list[float] = []
    counts = {"ok": 0, "rejected_429": 0, "failed": 0, "completion_tokens": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def client_loop(index: int) -> None:
        with httpx.Client() as client:
            sent = 0
            while time.monotonic() < stop_at:
                sent += 1
                started = time.perf_counter()
                try:
                    response = chat(url, model, f"Client {index}, request {sent}: name a colour and a fruit.",
                                    args.max_tokens, client)
                except httpx.HTTPError:
                    response = None
                elapsed = time.perf_counter() - started
                with lock:
                    if response is not None and response.status_code == 200:
                        counts["ok"] += 1
                        counts["completion_tokens"] += response.json()["usage"]["completion_tokens"]
                        latencies_s.append(elapsed)
                    elif response is not None and response.status_code == 429:
                        counts["rejected_429"] += 1
                    else:
                        counts["failed"] += 1
                if response is not None and response.status_code == 429:
                    time.sleep(min(1.0, float(response.headers.get("retry-after", 1))))

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(index,)) for index in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started  # past --seconds by the requests in flight at the end
    return {**counts, "wall_s": wall_s, "latency_p50_s": percentile(latencies_s, 50),
            "latency_p95_s": percentile(latencies_s, 95), "tokens_per_s": counts["completion_tokens"] / wall_s,
            "requests_per_s": counts["ok"] / wall_s}


def ttft_phase(url: str, model: str, args, tokenizer) -> dict:
    from kvlab.bench.haystack import build_haystack

    if tokenizer is None:  # a remote server: measure the document in the served model's tokens is not possible
        count = lambda text: len(text) // 4  # noqa: E731  (about 4 characters per token)
    else:
        count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    text = build_haystack(count, args.doc_tokens, seed=0, needle="The pass key is 68219. Remember it.",
                          depth=0.5).text
    posted_at = time.perf_counter()
    posted = httpx.post(f"{url}/v1/documents", json={"text": text}, timeout=600)
    if posted.status_code not in (200, 201):
        raise RuntimeError(f"POST /v1/documents answered {posted.status_code}: {posted.text}")
    document = posted.json()
    post_s = time.perf_counter() - posted_at
    with_document, in_prompt = [], []
    for question in QUESTIONS[:args.ttft_repeats + 1]:  # one more: the first document question loads it (cold)
        with_document.append(first_token_s(url, model, [{"role": "user", "content": question}],
                                           {"document_id": document["id"]}))
    for question in QUESTIONS[1:args.ttft_repeats + 1]:
        in_prompt.append(first_token_s(url, model, [{"role": "user", "content": f"{text}\n\n{question}"}], {}))
    warm = statistics.median(with_document[1:])
    whole = statistics.median(in_prompt)
    return {"document_id": document["id"], "document_tokens": document["context_tokens"],
            "document_post_s": post_s, "document_prefill_s": document.get("prefill_s"),
            "ttft_document_cold_s": with_document[0], "ttft_document_s": warm, "ttft_document_runs_s": with_document,
            "ttft_whole_prompt_s": whole, "ttft_whole_prompt_runs_s": in_prompt, "speedup": whole / warm}


def first_token_s(url: str, model: str, messages: list[dict], kvlab: dict) -> float:
    body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0, "stream": True,
            "kvlab": {**kvlab, "ignore_eos": True}}
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                return time.perf_counter() - started
    raise RuntimeError("the stream ended without content")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(args, model: str, load: dict, ttft: dict) -> None:
    where = ("in this process" if args.replicas is None and not args.url else args.url or
             ("`kvlab serve`, one process" if args.replicas == 1 else f"`kvlab serve --replicas {args.replicas}`"))
    print(f"{model} ({where}), {args.clients} clients for {args.seconds:g} s, {args.max_tokens} tokens per answer, "
          f"queue bound {args.max_queue}")
    p50, p95 = load["latency_p50_s"], load["latency_p95_s"]
    print(f"  requests ok {load['ok']} | failed {load['failed']} | 429 {load['rejected_429']} | "
          f"latency p50 {p50 if p50 is None else round(p50, 3)} s, p95 {p95 if p95 is None else round(p95, 3)} s | "
          f"{load['tokens_per_s']:.1f} completion tok/s | {load['requests_per_s']:.2f} req/s")
    print(f"  TTFT on a {ttft['document_tokens']}-token document: named document {ttft['ttft_document_s']:.3f} s "
          f"(first, read from the store: {ttft['ttft_document_cold_s']:.3f} s) vs whole document in the prompt "
          f"{ttft['ttft_whole_prompt_s']:.3f} s: x{ttft['speedup']:.1f}")


if __name__ == "__main__":
    main()

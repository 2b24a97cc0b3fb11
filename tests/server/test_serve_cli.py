"""`kvlab serve` refuses bad settings with one line and exit status 2, before loading a model."""

from __future__ import annotations

import pytest

from kvlab.cli import main


@pytest.mark.parametrize("argv, fragment", [
    (["--policy", "snapk"], "Did you mean"),
    (["--policy", "snapkv", "-p", "window=3"], "window_tokens"),
    (["--session-cache", "lots"], "cannot read size"),
    (["--max-queue", "-1"], "max_queue"),
    (["--read-timeout", "0"], "--read-timeout"),
    (["--max-header-size", "16"], "has no unit"),
    (["--api-key", "short"], "at least 8 characters"),
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--ray", "auto"], "give --replicas too"),
])
def test_bad_settings_fail_in_one_line(argv, fragment, capsys, monkeypatch):
    import kvlab.server.app

    monkeypatch.setattr(kvlab.server.app, "build_state", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["serve", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("kvlab: error: ") and fragment in error and len(error.strip().splitlines()) == 1


def test_replicas_without_ray_name_the_extra(capsys, monkeypatch):
    import sys

    import kvlab.server.app

    monkeypatch.setattr(kvlab.server.app, "build_state", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    assert main(["serve", "--replicas", "2"]) == 2
    assert capsys.readouterr().err.strip() == "kvlab: error: kvlab serve --replicas needs Ray: pip install 'kvlab[ray]'"


def test_one_process_serving_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys, argparse; import kvlab.server, kvlab.server.app, kvlab.cli.serve as serve; "
            "parser = argparse.ArgumentParser(); serve.add_arguments(parser); parser.parse_args([]); "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_kvlab_serve_answers_an_openai_client(tmp_path):
    """The real command: `kvlab serve` in a subprocess, polled until healthy, then one chat through the client."""
    import socket
    import subprocess
    import sys
    import time

    import httpx
    from openai import OpenAI

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "kvlab", "serve", "--model", "tiny-llama", "--port", str(port),
               "--store", str(tmp_path), "--log-level", "warning", "--api-key", "key-for-tests"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "kvlab serve did not become healthy"
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="key-for-tests", max_retries=0)
        reply = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens <= 3 and reply.choices[0].finish_reason in ("stop", "length")
    finally:
        process.terminate()
        process.wait(10)

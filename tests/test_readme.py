"""The README's shell examples run as written, on the tiny model, in a temporary folder and cache directory.

Convention: every block fenced as ``bash`` runs, in order, with ``set -e`` (each command must succeed), unless its
first line is ``# not run in CI`` (hour-long benchmark grids, a server that runs until stopped, a GPU, files the
reader brings) or it runs ``scripts/install.sh`` (CI's own install and test steps, which ``.ci/run`` runs and
``tests/test_project.py`` holds to the README). What the test changes, all of it here:

- ``kvlab`` is a shim on ``PATH`` that runs ``kvlab.cli.main`` (in a fork of a process that has imported kvlab
  already, see ``SERVER``) with the embedded models mapped to the tiny ones
  (``MODEL_FOR``; a command that loads a model and names none gets ``--model tiny-llama``) and the example key
  prefix of `kvlab cache rm` (``EXAMPLE_KEY``) replaced by the prefix of a key in the store;
- ``report.txt``, the reader's document in the examples, is a generated document holding the answer;
- ``/tmp/`` in a block means the test's folder, and ``$KVLAB_CACHE_DIR`` a temporary cache directory; stdin is empty.

The whole file takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = "# not run in CI"
INSTALL = "scripts/install.sh"
MODEL_FOR = {"smollm2-135m": "tiny-llama", "gemma3-270m": "tiny-gemma3"}
MODEL_COMMANDS = ("ask", "compress", "chat", "profile", "haystack", "bench", "serve")
EXAMPLE_KEY = "3fa2c1"
BLOCK_SECONDS = 150

# The shim runs each command in a fork of one process that has imported kvlab, torch and transformers already, so
# the ~20 commands pay that import once instead of once each; a command still gets its own process, argv, folder,
# environment and standard streams (passed over a Unix socket), and its exit status.
SERVER = '''
import json, os, socket, sys
import kvlab.cli, kvlab.engine, kvlab.models, kvlab.store, transformers  # noqa: E401  imported once, before forking

MODEL_FOR, MODEL_COMMANDS, EXAMPLE_KEY = json.loads(sys.argv[2])


def mapped(argv):
    if argv and argv[0] in MODEL_COMMANDS:
        if "--model" in argv:
            at = argv.index("--model") + 1
            argv[at] = MODEL_FOR.get(argv[at], argv[at])
        else:
            argv += ["--model", "tiny-llama"]
    if argv[:3] == ["cache", "rm", EXAMPLE_KEY]:
        argv[2] = kvlab.store.CacheStore().list()[0].key[:6]
    return argv


listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen()
while True:
    connection, _ = listener.accept()
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    request = json.loads(message)
    child = os.fork()
    if child == 0:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        code = 1
        try:
            code = kvlab.cli.main(mapped(request["argv"]))
        except SystemExit as exited:  # argparse: --help, --version, usage errors
            code = exited.code if isinstance(exited.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(child, 0)
    connection.sendall(str(os.waitstatus_to_exitcode(status)).encode())
    connection.close()
'''

SHIM = '''#!{python}
import json, os, socket, sys

connection = socket.socket(socket.AF_UNIX)
connection.connect({socket_path!r})
request = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}
socket.send_fds(connection, [json.dumps(request).encode()], [0, 1, 2])
code = int(connection.recv(16) or b"1")
sys.exit(code if code >= 0 else 128 - code)
'''


def runnable_blocks() -> list[str]:
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    return [block for block in blocks if not block.startswith(NOT_RUN) and INSTALL not in block]


def block_id(block: str) -> str:
    return " ".join(block.split()[:3])


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_llama):
    """A working folder holding report.txt, a bin folder with the ``kvlab`` shim, and the environment to run in."""
    from kvlab.bench.haystack import build_haystack

    folder = tmp_path_factory.mktemp("readme")
    count = lambda text: len(tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    needle = "The contract was signed by Ada Lovelace on 3 March."
    (folder / "report.txt").write_text(build_haystack(count, 600, seed=3, needle=needle, depth=0.4).text)
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    socket_path = str(folder / "kvlab.sock")
    settings = json.dumps([MODEL_FOR, MODEL_COMMANDS, EXAMPLE_KEY])
    server = subprocess.Popen([sys.executable, "-c", SERVER, socket_path, settings])
    shim = bin_dir / "kvlab"
    shim.write_text(SHIM.format(python=sys.executable, socket_path=socket_path))
    shim.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "KVLAB_CACHE_DIR": str(folder / "cache")}
    for _ in range(600):  # the server imports torch and transformers first
        if os.path.exists(socket_path) or server.poll() is not None:
            break
        time.sleep(0.1)
    assert server.poll() is None and os.path.exists(socket_path), "the kvlab fork server did not start"
    yield folder, env
    server.kill()
    server.wait()


def test_the_convention_leaves_something_to_run():
    blocks = runnable_blocks()
    assert len(blocks) >= 4
    assert any("kvlab ask --cache" in block for block in blocks)


@pytest.mark.parametrize("block", runnable_blocks(), ids=block_id)
def test_readme_block_runs(block, sandbox):
    folder, env = sandbox
    script = "set -euo pipefail\n" + block.replace("/tmp/", f"{folder}/")
    done = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=BLOCK_SECONDS)
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n" \
                                 f"{done.stderr[-3000:]}"

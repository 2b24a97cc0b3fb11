"""What the command says about itself: its version, its shell completion, and "did you mean" suggestions that
never echo back the name that was refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import kvlab
from kvlab.cli import main


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    assert kvlab.__version__ == version("kvlab")
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"kvlab {kvlab.__version__}"


def test_version_of_an_uninstalled_source_tree_comes_from_pyproject(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(kvlab, "version", missing)
    found = kvlab._find_version()
    assert found.endswith("+source") and found.removesuffix("+source") == kvlab.__version__


def complete(line: str, tmp_path) -> list[str]:
    """What argcomplete offers for ``line`` (the text before the cursor) of ``python -m kvlab ...``, asked the way
    the shell function of `register-python-argcomplete kvlab` asks: environment variables, answers in a file."""
    answers = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "3", "COMP_LINE": line, "COMP_POINT": str(len(line)),
           "_ARGCOMPLETE_STDOUT_FILENAME": str(answers), "_ARGCOMPLETE_IFS": "\n"}
    done = subprocess.run([sys.executable, "-m", "kvlab"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return answers.read_text().split("\n")


def test_completion_offers_subcommands_and_their_options(tmp_path):
    assert set(complete("python -m kvlab ", tmp_path)) >= {"ask", "compress", "chat", "cache", "bench", "serve"}
    assert set(complete("python -m kvlab c", tmp_path)) == {"compress", "chat", "cache"}
    assert set(complete("python -m kvlab cache ", tmp_path)) >= {"ls", "rm", "gc"}
    assert "--dry-run" in complete("python -m kvlab cache gc --", tmp_path)
    assert {"int8", "int4", "int2", "none"} <= set(complete("python -m kvlab ask --kv-quant ", tmp_path))


def test_the_marker_lets_global_completion_find_the_entry_point():
    from pathlib import Path

    for module in ("cli/__init__.py", "__main__.py"):
        head = (Path(kvlab.__file__).parent / module).read_bytes()[:1024]
        assert b"PYTHON_ARGCOMPLETE_OK" in head


def test_did_you_mean_never_suggests_the_refused_name():
    from fastapi.exceptions import RequestValidationError

    from kvlab.server.errors import did_you_mean, validation_error
    from kvlab.server.schemas import request_field_names

    known = request_field_names()
    assert "top_k" in known  # a field of the kvlab object, refused at the top level of a request
    problem = {"type": "extra_forbidden", "loc": ("body", "top_k"), "msg": "Extra inputs are not permitted"}
    refused = RequestValidationError([problem])
    message = validation_error(refused, known).message
    assert message.startswith("unrecognized request argument 'top_k'") and "did you mean 'top_k'" not in message
    assert did_you_mean("top_k", known) == "; did you mean 'top_p'?"
    assert did_you_mean("temprature", known) == "; did you mean 'temperature'?"
    assert did_you_mean("zzzzzz", known) == ""
    assert did_you_mean("seed", {"seed"}) == ""  # nothing close but the name itself: no suggestion


@pytest.mark.parametrize("argv, fragment", [
    (["cache", "gc", "--max-size", "2"], "has no unit"),
    (["ask", "--model", "tiny-llama", "--context-file", "-", "--question", "q", "--device", "gpu"],
     "unknown device 'gpu'"),
])
def test_mistakes_are_one_line_naming_the_fix(argv, fragment, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvlab: error: ") and fragment in lines[0]

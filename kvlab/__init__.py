"""kvlab: run a Hugging Face causal LM with a compressed KV cache and measure what each compression policy costs.

Importing the package has no side effects and imports no torch; the API lives in the subpackages
(``kvlab.models.load_model``, ``kvlab.engine.Engine``, ``kvlab.policies.make_policy``, ``kvlab.store``).
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _find_version() -> str:
    """The installed distribution's version; from a source tree that was never installed, the version in the
    ``pyproject.toml`` beside the package, marked as a local build; ``0+unknown`` when neither exists."""
    try:
        return version("kvlab")
    except PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        found = None
    return f"{found.group(1)}+source" if found else "0+unknown"


__version__ = _find_version()

"""Project-level contracts: the layering the README promises, the generated README table, CI calling the README's
test command."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["errors", "registry", "units", "fileio", "models", "cache", "policies", "engine", "inputs", "store", "bench",
          "server", "cli"]


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "kvlab" and len(parts) > 1 and parts[1] in LAYERS else None


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "kvlab").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_data_flows_one_way(path):
    own = layer_of("kvlab." + ".".join(path.relative_to(ROOT / "kvlab").with_suffix("").parts))
    if own is None:
        return
    for module in imported_modules(path):
        other = layer_of(module)
        if other is not None:
            assert LAYERS.index(other) <= LAYERS.index(own), f"{path.name} ({own}) imports {module} ({other})"


def test_readme_policy_table_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "policy_table.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    test_command = next(block.strip() for block in blocks if "pytest" in block)
    # CI runs the README's commands in order, one per line (with lint and type checks between them)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    steps = [step.strip() for step in test_command.split("&&")]
    assert all(step in ci_lines for step in steps), (steps, ci_lines)
    assert [ci_lines.index(step) for step in steps] == sorted(ci_lines.index(step) for step in steps)

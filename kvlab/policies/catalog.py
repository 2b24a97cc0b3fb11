"""Describe registered policies from their dataclass fields: CLI listings and the README table come from here."""

from __future__ import annotations

import dataclasses


def parameter_rows(policy_cls) -> list[dict]:
    rows = []
    for field in dataclasses.fields(policy_cls):
        meta = field.metadata
        bounds = [f">= {meta['minimum']}" if meta.get("minimum") is not None else "",
                  f"<= {meta['maximum']}" if meta.get("maximum") is not None else ""]
        rows.append({"name": field.name, "default": field.default, "unit": meta.get("unit", ""),
                     "range": " ".join(b for b in bounds if b), "help": meta.get("help", "")})
    return rows


def short_parameters(policy_cls) -> str:
    return ", ".join(f"{row['name']}={row['default']}" for row in parameter_rows(policy_cls)) or "-"


def markdown_table() -> str:
    """The policy table of README.md (regenerate with ``python scripts/policy_table.py --write``)."""
    from kvlab.policies import POLICIES

    lines = ["| policy | rule | parameters (defaults) | paper |", "| --- | --- | --- | --- |"]
    for name in POLICIES.names():
        cls = POLICIES.get(name)
        lines.append(f"| `{name}` | {cls.rule} | {short_parameters(cls)} | {cls.paper} |")
    return "\n".join(lines)

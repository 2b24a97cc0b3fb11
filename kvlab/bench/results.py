"""``results.jsonl``: one JSON object per answered cell, appended and fsynced as each finishes.

A run killed mid-write leaves at most one partial last line; opening the file drops it (and says so), so the
file always holds whole rows and a rerun resumes from them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kvlab.errors import KvlabError

KEY_FIELDS = ("sample_id", "question_index", "policy", "policy_params", "ratio", "query_aware")
OPTIONAL_KEY_FIELDS = {"quantization": None, "mode": "single"}


def cell_key(row: dict) -> tuple:
    """What identifies a row: the same key is the same measurement, so a resumed run skips it."""
    return (tuple(json.dumps(row[name], sort_keys=True) for name in KEY_FIELDS)
            + tuple(json.dumps(row.get(name, default)) for name, default in OPTIONAL_KEY_FIELDS.items()))


class ResultsFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict] = self._load()

    def _load(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete, _, partial = data.rpartition(b"\n")
        if partial:
            # an interrupted write: keep the whole rows before it
            print(f"kvlab: dropping an incomplete last row of {self.path}", file=sys.stderr)
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete) + 1 if complete else 0)
        rows = []
        for number, line in enumerate(complete.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                cell_key(row)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise KvlabError(f"{self.path} line {number} is not a kvlab result row; move the file away or use "
                                 f"another --out folder") from None
            rows.append(row)
        return rows

    def append(self, row: dict) -> None:
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.append(row)

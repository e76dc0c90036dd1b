"""What a GPU check records: a JSON object written to disk after every entry, so that a check
killed at its time budget still leaves what it had measured."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str))
    os.replace(tmp, path)


class Record:
    """One check's results. ``put`` stores a value under a key and writes the file at once;
    ``fail`` marks the check failed (it goes on, so later measurements are still taken);
    ``skip`` marks it skipped with the reason."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: Dict[str, Any] = {}

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        self.flush()
        # the check's log shows progress, and what was measured even if the JSON is lost
        print(f"[record] {key}: {json.dumps(value, default=str)[:2000]}", flush=True)
        return value

    def fail(self, reason: str) -> None:
        self.data["status"] = "failed"
        self.data.setdefault("failures", []).append(reason)
        self.data.setdefault("error", reason)
        self.flush()

    def skip(self, reason: str) -> None:
        if self.data.get("status") != "failed":
            self.data["status"] = "skipped"
        self.data.setdefault("skipped", []).append(reason)
        self.data.setdefault("reason", reason)
        self.flush()

    def flush(self) -> None:
        write_json(self.path, self.data)

"""train_log.jsonl: one JSON object per training step or validation, truncated on resume to the checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path


def read_run_log(path: Path) -> list[dict]:
    """The rows of a train_log.jsonl (none if it does not exist yet)."""
    if not path.is_file():
        return []
    return [json.loads(r) for r in path.read_text(encoding="utf-8").splitlines() if r.strip()]


class RunLog:
    """train_log.jsonl: one JSON object per training step or validation."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(row, time=round(time.time(), 3))) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop rows past the checkpoint, so a resumed run's log reads like an uninterrupted one."""
        if self.enabled and self.path.is_file():
            kept = [r for r in read_run_log(self.path) if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

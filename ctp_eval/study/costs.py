"""Training cost per step (time, peak memory) of each recovery method, as `bench/train_speed.py --json` measured it.

Speed is not read from the training runs themselves: those share the machine with other jobs, and a second job on
a small machine slows a step 2-10x. A leaderboard takes its cost columns from a `train_cost*.json` file under its
results folders, written by one bench run on an idle machine, with the command, machine and load that produced it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctp_eval import files

FORMAT = "ctp-train-cost/1"
# bench variant -> the leaderboard run kind it prices (a learned prompt trains with ctp-train's default step)
KIND_OF_VARIANT = {"ctp": "learned", "lora": "lora"}


@dataclass
class StepCost:
    """Medians over the bench's repeated runs of one variant at one dtype."""

    variant: str
    dtype: str
    trainable: int
    tok_s: float
    s_per_step: float
    peak_mib: float
    runs_s_per_step: list[float] = field(default_factory=list)
    runs_peak_mib: list[float] = field(default_factory=list)


@dataclass
class TrainCost:
    """One bench run: its settings, where it ran, and the per-variant medians."""

    command: str
    machine: str
    date: float
    model: str
    batch_size: int
    seqlen: int
    k: int
    steps: int
    repeats: int
    memory: str  # what peak_mib measures (CUDA allocator peak, or peak RSS above the loaded model)
    load_before: str
    load_after: str
    rows: list[StepCost] = field(default_factory=list)
    file: str = ""  # where it was read from (set by load_costs)

    def step(self, kind: str, dtype: str) -> StepCost | None:
        return next((r for r in self.rows if KIND_OF_VARIANT.get(r.variant) == kind and r.dtype == dtype), None)


def save_cost(path: str | os.PathLike, cost: TrainCost) -> Path:
    record = {"format": FORMAT, **asdict(cost)}
    record.pop("file")
    return files.write_text(Path(path), json.dumps(record, indent=1) + "\n")


def read_cost(path: Path, root: Path | None = None) -> TrainCost:
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.pop("format", None) != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (write it with bench/train_speed.py --json)")
    rows = [StepCost(**r) for r in record.pop("rows")]
    return TrainCost(**record, rows=rows, file=os.path.relpath(path, root) if root else path.name)


def load_costs(paths: list[str | os.PathLike], root: str | os.PathLike | None = None) -> list[TrainCost]:
    """Every train_cost*.json under the given results folders, oldest first."""
    root = Path(root).resolve() if root else None
    found = sorted({f.resolve() for p in map(Path, paths) if p.is_dir() for f in p.rglob("train_cost*.json")})
    return sorted((read_cost(f, root) for f in found), key=lambda c: (c.date, c.file))

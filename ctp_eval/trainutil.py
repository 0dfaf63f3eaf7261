"""Pure pieces of `ctp-train` that make runs exact: the data order, the LR schedule, and the checkpoint file.

Data order: the training corpus is cut into non-overlapping windows once; epoch e visits them in the order
of a permutation seeded by (seed, e), `global_batch` at a time, dropping the epoch's remainder. The batch at
step s is therefore a pure function of (n_windows, global_batch, seed, s): the step counter *is* the data
position, and a resumed run reads exactly the windows an uninterrupted one would.

Checkpoint: one safetensors file holding every tensor of a nested state (prompt or adapter weights, optimizer
moments, RNG states) plus the JSON of everything else in its string metadata, so there is no pickle and a
single `os.replace` makes the write atomic: a reader sees the old checkpoint or the new one, never half.

Also the run's plumbing: the JSON-lines log, the SIGINT/SIGTERM flag, and the data-parallel rank info.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctp_eval.signals import SignalScope

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.safetensors"
CHECKPOINT_FORMAT = "ctp-train-checkpoint-1"


SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "linear") -> float:
    """Multiplier of the peak lr before optimizer step `step` (0-based): linear warmup from 0 to 1 over
    `warmup_steps`, then linear decay to 0 at `total_steps` (the paper's `get_linear_schedule_with_warmup`),
    half-cosine decay to 0, or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps  # +1: the very first update is not wasted at lr 0
    done = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # fraction of the decay phase behind us
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0))))
    return max(0.0, 1.0 - done)


def batches_per_epoch(n_windows: int, global_batch: int) -> int:
    return n_windows // global_batch


def stream_hash(wins: torch.Tensor) -> str:
    """sha256 of the training windows' token ids: identifies the corpus, its tokenization and the window length."""
    return hashlib.sha256(wins.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def batch_indices(n_windows: int, global_batch: int, seed: int, step: int) -> torch.Tensor:
    """Window indices (global_batch,) of training step `step` (0-based)."""
    per_epoch = batches_per_epoch(n_windows, global_batch)
    if per_epoch == 0:
        raise ValueError(f"{n_windows} windows are fewer than one global batch of {global_batch}")
    epoch, pos = divmod(step, per_epoch)
    # A private generator per epoch: never touches (or depends on) the global RNG, which dropout uses.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_windows, generator=gen)
    return order[pos * global_batch : (pos + 1) * global_batch]


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Global RNG states that training consumes (dropout): torch CPU and, if in use, every CUDA device."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- nested state <-> safetensors


def _pack(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        if path in tensors:  # only if a key contains a dot and mirrors a nested path; never silently overwrite
            raise ValueError(f"checkpoint key collision at {path}")
        # clone: safetensors refuses views that share storage (e.g. tied or sliced tensors)
        tensors[path] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _pack(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        # optimizer state is keyed by int parameter ids, which JSON would turn into strings
        return {"__items__": [[k, _pack(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {path}")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _unpack(v, tensors) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def save_checkpoint(directory: str | os.PathLike, state: dict) -> Path:
    """Write `state` (nested dicts/lists of tensors and JSON scalars) atomically to directory/state.safetensors."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(state, tensors, "s")
    meta = {"format": "pt", "ctp_format": CHECKPOINT_FORMAT, "state": json.dumps(skeleton)}
    path = directory / CHECKPOINT_FILE
    tmp = directory / f".{CHECKPOINT_FILE}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:  # data on disk before the rename makes it visible
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: str | os.PathLike) -> dict:
    """Inverse of `save_checkpoint`; raises FileNotFoundError / ValueError with the path in the message."""
    from safetensors import safe_open

    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors has its own error types for truncated files
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if meta.get("ctp_format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} file (ctp_format={meta.get('ctp_format')!r})")
    return _unpack(json.loads(meta["state"]), tensors)


# ---------------------------------------------------------------- run plumbing


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


class StopSignals(SignalScope):
    """Turn SIGINT/SIGTERM into a flag checked between steps (a second signal stops at once)."""

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: checkpointing after the current step", signal.Signals(signum).name)


@dataclass
class Dist:
    device: object
    rank: int = 0
    world: int = 1

    def agree(self, signum: int | None) -> int | None:
        """All ranks stop at the same step if any of them got a signal (else the others would hang)."""
        if self.world == 1:
            return signum
        import torch

        flag = torch.tensor([signum or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (a collective: all ranks must call it)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def distributed(device: str) -> Dist:
    """Rank info. Under `accelerate launch` / torchrun (WORLD_SIZE > 1) join the process group those launchers
    describe in the environment: NCCL with one GPU per LOCAL_RANK, else gloo on CPU. (accelerate's
    PartialState reports a single process for a CPU-only torchrun, so we read torch.distributed directly.)"""
    import torch
    import torch.distributed as tdist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if cuda else "gloo")
        dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return Dist(dev, tdist.get_rank(), tdist.get_world_size())
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Dist(torch.device(device))

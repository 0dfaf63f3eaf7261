"""The learning-rate schedule and the data order of `ctp-train`: pure functions of the step, so runs are exact.

Data order: the training corpus is cut into non-overlapping windows once; epoch e visits them in the order
of a permutation seeded by (seed, e), `global_batch` at a time, dropping the epoch's remainder. The batch at
step s is therefore a pure function of (n_windows, global_batch, seed, s): the step counter *is* the data
position, and a resumed run reads exactly the windows an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math

import torch

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

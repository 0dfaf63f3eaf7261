"""What every bench script prints beside its figures: the machine and its load (figures from a loaded machine
are not settled)."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    """CPU model name, core count and torch version (and its thread count)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:  # Linux: the marketing name is more useful than "x86_64"
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def load() -> str:
    """The 1/5/15-minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())

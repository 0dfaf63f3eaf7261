"""What every bench script prints beside its figures: the machine and its load (figures from a loaded machine
are not settled)."""

from __future__ import annotations

import os


def machine(device: str = "cpu") -> str:
    """The results' hardware line (CPU model name, cores, torch; the GPU's name on cuda) plus torch's threads."""
    import torch

    from ctp_eval.eval.lm import hardware_summary

    return f"{hardware_summary(torch.device(device))}, {torch.get_num_threads()} threads"


def load() -> str:
    """The 1/5/15-minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())

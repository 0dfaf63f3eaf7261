"""The `ctp-train` checkpoint: one safetensors file holding every tensor of a nested state (prompt or adapter
weights, optimizer moments, RNG states) plus the JSON of everything else in its string metadata. No pickle,
and a single `os.replace` makes the write atomic: a reader sees the old checkpoint or the new one, never half.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ctp_eval.files import atomic_path

CHECKPOINT_FILE = "state.safetensors"
CHECKPOINT_FORMAT = "ctp-train-checkpoint-1"


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
    with atomic_path(path, fsync=True) as tmp:  # data on disk before the rename makes it visible
        save_file(tensors, str(tmp), metadata=meta)
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

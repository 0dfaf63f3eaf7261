"""Writing files so that an interruption never leaves half of one, and the one rule for names made from text."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False, replace_folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (file or folder) to write; when the block succeeds, one rename puts it
    in place, so a reader sees the old `path` or the new one, never a half-written one. On failure the temporary
    is removed. `fsync`: flush a file's data to disk before the rename makes it visible (checkpoints). An existing
    folder at `path` is replaced only with `replace_folder` (moved aside, then removed); otherwise the rename
    fails with OSError, which callers racing another process for the same cache entry catch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if replace_folder and path.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`path.write_text(text)`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def slug(text: str) -> str:
    """A file-name-safe form of `text`: runs of anything but letters and digits become "-", lower case
    ("sparsegpt:0.5+gptq:w4" -> "sparsegpt-0-5-gptq-w4"); prompt, run and cache folder names all use it."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()

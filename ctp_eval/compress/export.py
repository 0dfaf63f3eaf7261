"""Optional export of a GPTQ-compressed checkpoint to a packed deployment format (GPTQ 4-bit for vLLM / HF).

Our checkpoints keep dense fake-quantized weights (prompt learning needs them) plus the exact grids in
`ctp_qparams.safetensors`, so packing is a pure re-encoding. Packing and its kernels belong to a maintained
library (GPTQModel); it targets CUDA builds and is not a dependency of ctp-eval. `export_gptq` checks what
can be exported and, where the library is not installed, stops with a clear message instead of failing
half-way.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .io import QPARAMS_FILE, read_compression_info
from .spec import parse_spec

logger = logging.getLogger(__name__)

EXPORT_LIBRARY = "gptqmodel"


class ExportUnavailable(RuntimeError):
    """Packed export cannot run here (library missing, or the checkpoint is not exportable)."""


def export_status() -> tuple[bool, str]:
    """(available, message) for packed export on this machine."""
    if importlib.util.find_spec(EXPORT_LIBRARY) is None:
        return False, (
            f"packed GPTQ export needs the optional library {EXPORT_LIBRARY!r}, which is not installed (it builds "
            "CUDA kernels and is not installable on a CPU-only torch). The compressed checkpoint itself is an "
            "ordinary HF folder and works as is; install the library on a CUDA machine to export."
        )
    return True, f"{EXPORT_LIBRARY} is installed"


def check_exportable(compressed_dir: str | os.PathLike) -> dict:
    """Validate that `compressed_dir` holds a quantized ctp checkpoint with saved grids; return its info."""
    info = read_compression_info(compressed_dir)
    if info is None:
        raise ExportUnavailable(f"{compressed_dir} is not a ctp compressed checkpoint (no ctp_compression.json)")
    spec = parse_spec(info["spec"])
    if spec.quant is None:
        raise ExportUnavailable(f"spec {spec} has no quantization part: nothing to pack (the folder is the export)")
    if spec.quant.bits not in (2, 3, 4, 8):
        raise ExportUnavailable(f"GPTQ packed formats support 2/3/4/8 bits, not {spec.quant.bits}")
    if not (Path(compressed_dir) / QPARAMS_FILE).is_file():
        raise ExportUnavailable(f"{compressed_dir} has no {QPARAMS_FILE}: recompress with this version")
    return info


def export_gptq(compressed_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Pack a quantized ctp checkpoint into GPTQ format under `out_dir`. Raises ExportUnavailable with the
    reason where that cannot be done here."""
    check_exportable(compressed_dir)
    ok, msg = export_status()
    if not ok:
        raise ExportUnavailable(msg)
    # The library is present but its packing entry points change between releases and none could be
    # installed or exercised where this was written; refuse rather than write an unverified format.
    raise ExportUnavailable(
        f"{EXPORT_LIBRARY} is installed, but packing through it is not implemented/verified in this version of "
        "ctp-eval"
    )

"""Deployable export of a compressed checkpoint through `compressed-tensors` (the format vLLM and transformers read).

Our checkpoints keep dense fake-quantized weights (prompt learning back-propagates through them) plus the exact
grids in `ctp_qparams.safetensors`. Export is therefore a re-encoding, never a re-quantization: each weight is
turned back into its integer code with the saved grid, checked to reproduce the weight bit for bit, and handed
to compressed-tensors' own `pack-quantized` compressor (`ModelCompressor.compress_model`). The written folder is
reloaded and compared tensor by tensor before it is moved into place.

Conventions. Our grid is `w = scale * (q - zero)` with unsigned q in [0, 2^b - 1] and an integer zero in the same
range (`-sym`: zero = 2^(b-1)). compressed-tensors stores signed codes in [-2^(b-1), 2^(b-1) - 1] and computes
`w = (q' - z') * scale`; with q' = q - 2^(b-1) and z' = zero - 2^(b-1) the difference q' - z' = q - zero is the
same integer, so the dequantized weights are identical. Symmetric grids have z' = 0 and store no zero point.

What maps to what (compressed-tensors >= 0.18; the reasons are in `spec_export_problem`):
  * `gptq:wN[gG][-sym]`, `rtn:...`: `pack-quantized`, N = 2..8 bits (densely packed int32), strategy `channel`
    (no group) or `group`. compressed-tensors needs groups that divide the layer width, and transformers
    applies one scheme to all layers; our last group may be shorter (576 = 4 x 128 + 64 on SmolLM2). So the
    model is written with one group size that divides every width and every G-group (`stored_group_size`:
    64 for g128 on SmolLM2), each of our grids repeated over its sub-groups: the same grid, more scales.
  * `gptq:wN-act` (per channel): act-order changed only the solve order, so it exports like `gptq:wN`.
  * joint `sparsegpt:...+gptq:...`: the quantized part as above; pruned weights stay exact zeros in the codes.
  * refused: `gptq:wNgG-act`, sparse-only specs and `none`.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ctp_eval.files import atomic_path

from .apply import block_linears, find_blocks
from .io import INFO_FILE, QPARAMS_FILE, read_compression_info
from .spec import CompressSpec, parse_spec

logger = logging.getLogger(__name__)

COMPRESSION_FORMAT = "pack-quantized"
MIN_LIBRARY_VERSION = "0.18"  # dense 1..8-bit packing; earlier releases padded 3-bit codes to 10 per int32
# Bits the compressed-tensors kernels of vLLM (WNA16) run; other widths load in transformers only.
VLLM_KERNEL_BITS = (4, 8)

NO_SPARSE_FORMAT = (
    "compressed-tensors has no sparse storage format: its sparse compressors (sparse-bitmask, "
    "sparse-24-bitmask, marlin-24) were removed in 0.15 and ModelCompressor writes an empty sparsity_config. "
    "A sparse-only checkpoint is already the deployable form (a dense HF folder with exact zeros, which "
    "transformers and vLLM load as is)"
)
NO_GROUP_ACT_ORDER = (
    "act-order with groups puts input column j in group g_idx[j], a non-contiguous grouping; compressed-tensors "
    "dropped activation-ordered groups (actorder='group' and its weight_g_idx tensor are refused since 0.19) and "
    "its formats only hold groups of consecutive columns, so the grid cannot be stored without re-quantizing. "
    "Export gptq:wNgG (no -act) or per-channel gptq:wN-act instead"
)


class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message says exactly why."""


def spec_export_problem(spec: str | CompressSpec) -> str | None:
    """Why `spec` cannot be exported to compressed-tensors, or None if it can. Pure: no torch, no files."""
    spec = parse_spec(spec)
    if spec.is_none:
        return "spec 'none' is the dense model: there is nothing to export"
    if spec.quant is None:
        return f"{spec} is sparse-only: {NO_SPARSE_FORMAT}"
    if spec.quant.act_order and spec.quant.group_size > 0:
        return f"{spec}: {NO_GROUP_ACT_ORDER}"
    return None


def check_exportable(compressed_dir: str | os.PathLike) -> dict:
    """The `ctp_compression.json` of `compressed_dir` if it can be exported; else ExportError saying why."""
    info = read_compression_info(compressed_dir) if Path(compressed_dir).is_dir() else None
    if info is None:
        raise ExportError(f"{compressed_dir} is not a ctp compressed checkpoint (no {INFO_FILE})")
    if "export" in info:
        raise ExportError(f"{compressed_dir} is already a compressed-tensors export; export its source instead")
    problem = spec_export_problem(info.get("spec", "none"))
    if problem:
        raise ExportError(problem)
    if not (Path(compressed_dir) / QPARAMS_FILE).is_file():
        raise ExportError(
            f"{compressed_dir} has no {QPARAMS_FILE} (the exact grids); recompress it with this version of ctp-eval"
        )
    return info


@dataclass
class PackedGrid:
    """One Linear's weight as compressed-tensors stores it, before packing."""

    codes: torch.Tensor  # (out, in) int8, signed codes q - 2^(b-1)
    scale: torch.Tensor  # (out, n_groups) float32
    zero: torch.Tensor | None  # (out, n_groups) int8, signed zero - 2^(b-1); None for symmetric grids
    group_size: int  # 0 = one grid per output channel


def stored_group_size(group_size: int, widths) -> int:
    """The one group size (0 = per channel) that stores the grids of Linears with these input widths.

    compressed-tensors needs group sizes that divide the width, and transformers' dequantizer applies one
    scheme to every dense layer, so the model gets one size: the largest that divides every width and keeps
    every one of our groups whole (a per-channel grid is then one group per row repeated). Pure.
    """
    grouped = [math.gcd(group_size, c) for c in widths if 0 < group_size < c]
    if not grouped:
        return 0
    return math.gcd(*grouped, *(c for c in widths if not 0 < group_size < c))


def to_packed_grid(
    W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, sym: bool,
    g_idx: torch.Tensor | None = None, name: str = "weight", stored_group: int | None = None,
) -> PackedGrid:
    """Re-express the fake-quantized `W` (out, in) on its saved grid (scale, zero), each (out, n_groups), with
    groups of `stored_group` columns (default: `stored_group_size(group_size, [in])`; 0 = per channel).

    Checks that the grid reproduces `W` exactly (in W's dtype) and that its groups are consecutive columns;
    raises ExportError otherwise. Pure.
    """
    rows, cols = W.shape
    width = group_size if 0 < group_size < cols else cols  # columns per grid of ours (the last may be shorter)
    n_groups = math.ceil(cols / width)
    if scale.shape != (rows, n_groups) or zero.shape != (rows, n_groups):
        raise ExportError(
            f"{name}: saved grid has shape {tuple(scale.shape)}, expected {(rows, n_groups)} for group size "
            f"{group_size} on {cols} columns"
        )
    if g_idx is not None and not torch.equal(g_idx.to(torch.long).cpu(), torch.arange(cols) // width):
        raise ExportError(f"{name}: {NO_GROUP_ACT_ORDER}")
    stored = stored_group_size(group_size, [cols]) if stored_group is None else stored_group
    sub = stored or cols
    if cols % sub or (width < cols and math.gcd(width, cols) % sub):
        raise ExportError(f"{name}: group size {stored} cannot hold groups of {width} on {cols} columns")
    ours = torch.arange(0, cols, sub) // width  # our grid of each stored group
    scale, zero = scale.float()[:, ours], zero.float()[:, ours]  # (out, cols / sub)
    col_scale = scale.repeat_interleave(sub, dim=1)  # (out, in)
    col_zero = zero.repeat_interleave(sub, dim=1)
    maxq, mid = 2**bits - 1, 2 ** (bits - 1)
    if sym and not torch.all(zero == mid):
        raise ExportError(f"{name}: a symmetric grid must have zero point {mid} everywhere")
    if not (torch.all(zero == torch.round(zero)) and zero.min() >= 0 and zero.max() <= maxq):
        raise ExportError(f"{name}: zero points must be integers in [0, {maxq}]")
    q = torch.round(W.float() / col_scale) + col_zero
    rebuilt = (col_scale * (q - col_zero)).to(W.dtype)
    if not torch.equal(rebuilt, W) or q.min() < 0 or q.max() > maxq:
        err = (rebuilt.float() - W.float()).abs().max().item()
        raise ExportError(
            f"{name}: the weights are not on the saved {bits}-bit grid (max |W - grid(W)| = {err:.3g}, codes in "
            f"[{q.min().item():.0f}, {q.max().item():.0f}]): {QPARAMS_FILE} does not match the weights"
        )
    return PackedGrid(
        codes=(q - mid).to(torch.int8),
        scale=scale,
        zero=None if sym else (zero - mid).to(torch.int8),
        group_size=stored,
    )


def _load_qparams(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path)).items():
        name, _, field = key.rpartition(".")
        out.setdefault(name, {})[field] = t
    return out


def safetensors_tensor_bytes(folder: str | os.PathLike) -> dict[str, int]:
    """{tensor name: bytes on disk} over the weight files of a model folder (not our qparams), from the headers."""
    sizes: dict[str, int] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        if f.name == QPARAMS_FILE:
            continue
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                sizes[name] = meta["data_offsets"][1] - meta["data_offsets"][0]
    return sizes


def linear_bytes(folder: str | os.PathLike, module_names) -> int:
    """Bytes on disk of the tensors that belong to the given modules (weight, or packed weight + grids)."""
    prefixes = tuple(f"{m}." for m in module_names)
    return sum(b for name, b in safetensors_tensor_bytes(folder).items() if name.startswith(prefixes))


def _quantization_config(bits: int, sym: bool, group_size: int, other_linears: list[str]):
    """One config group for every quantized Linear (`Linear` target, the other Linears ignored)."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    args = QuantizationArgs(
        num_bits=bits, type="int", symmetric=sym,
        strategy="group" if group_size else "channel", group_size=group_size or None,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=COMPRESSION_FORMAT)
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=other_linears, format=COMPRESSION_FORMAT)


def _check_library():
    import compressed_tensors
    from packaging.version import Version

    if Version(compressed_tensors.__version__) < Version(MIN_LIBRARY_VERSION):
        raise ExportError(
            f"compressed-tensors {compressed_tensors.__version__} is too old: export needs >= {MIN_LIBRARY_VERSION} "
            "(its dense packing of 3/5/6/7-bit codes is what current readers expect)"
        )
    return compressed_tensors.__version__


def _pack_model(
    model, qparams: dict, spec: CompressSpec, left_dense=()
) -> tuple[object, dict[str, PackedGrid]]:
    """Attach the grids to `model`'s Linears and compress them in place; returns (ModelCompressor, grids)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import apply_quantization_config
    from torch import nn

    q = spec.quant
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(qparams) - set(linears))
    if missing:
        raise ExportError(f"{QPARAMS_FILE} names layers the model does not have as Linear: {missing[:3]}")
    if not qparams:
        raise ExportError(f"{QPARAMS_FILE} holds no grid: no Linear was quantized")
    prefix, blocks = find_blocks(model)
    expected = {f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in block_linears(b)}
    # Linears the compression left dense (never reached by the calibration data) stay dense in the export.
    gridless = expected - set(qparams) - set(left_dense)
    if gridless:
        raise ExportError(f"{QPARAMS_FILE} has no grid for {sorted(gridless)[:3]}")

    stored = stored_group_size(q.group_size, {linears[n].in_features for n in qparams})
    grids = {}
    for name, p in qparams.items():
        W = linears[name].weight.data
        grids[name] = to_packed_grid(
            W, p["scale"], p["zero"], q.bits, q.group_size, q.sym, p.get("g_idx"), name, stored_group=stored
        )
    config = _quantization_config(q.bits, q.sym, stored, sorted(set(linears) - set(grids)))
    apply_quantization_config(model, config, show_progress=False)
    for name, g in grids.items():
        mod = linears[name]
        # Scales stay float32 (the grid's own precision): with a bf16/fp16 model, compressed-tensors would
        # otherwise cast them to the weight dtype and its re-rounding could land on a neighbouring code.
        mod.weight.data = mod.weight.data.float()
        mod.weight_scale.data = g.scale.clone()
        if g.zero is not None:
            mod.weight_zero_point.data = g.zero.clone()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=COMPRESSION_FORMAT)
    compressor.compress_model(model)
    compressor.remove_decompression_hook(model)  # nothing runs this model; keep it a plain module
    for name, g in grids.items():  # the packed codes must be ours, bit for bit
        mod = linears[name]
        codes = unpack_from_int32(mod.weight_packed.data, q.bits, tuple(g.codes.shape))
        if not torch.equal(codes, g.codes):
            raise ExportError(f"{name}: compressed-tensors packed different codes than the grid's; export aborted")
    return compressor, grids


_QPARAM_KEYS = {"weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"}


def _verify(src_model, out_dir: Path) -> float:
    """Reload `out_dir` as a user would (its config asks for dequantization) and compare every tensor with the
    source; returns the max abs difference."""
    from transformers import AutoModelForCausalLM

    dtype = next(src_model.parameters()).dtype
    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=dtype)
    ref, got = src_model.state_dict(), reloaded.state_dict()
    # Older transformers (seen with 5.17) decompress into fake-quantized Linears that keep their quantization
    # parameters (same weights, same logits); those extra keys are fine, any other difference is not.
    extra = {k for k in set(got) - set(ref)
             if k.rsplit(".", 1)[-1] in _QPARAM_KEYS and k.rsplit(".", 1)[0] + ".weight" in ref}
    if set(ref) != set(got) - extra:
        raise ExportError(f"the exported model has different tensors: {sorted(set(ref) ^ (set(got) - extra))[:4]}")
    worst = 0.0
    for k, v in ref.items():
        if got[k].shape != v.shape or got[k].dtype != v.dtype:
            raise ExportError(f"{k}: exported {got[k].dtype}{tuple(got[k].shape)} vs {v.dtype}{tuple(v.shape)}")
        worst = max(worst, (got[k].float() - v.float()).abs().max().item() if v.numel() else 0.0)
    return worst


def export_compressed(compressed_dir: str | os.PathLike, out_dir: str | os.PathLike, *, verify: bool = True) -> dict:
    """Write the compressed-tensors export of a ctp checkpoint to `out_dir` (a new folder, written atomically).

    Returns the export record (also stored under "export" in the folder's `ctp_compression.json`): format,
    library version, config groups, Linear bytes on disk before/after and, with `verify`, the max abs
    difference of every reloaded tensor against the checkpoint (0.0 expected). Raises ExportError with the
    reason when the checkpoint cannot be exported.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(compressed_dir), Path(out_dir)
    if out.exists():
        raise ExportError(f"{out} exists; choose a new folder")
    info = check_exportable(src)
    version = _check_library()
    spec = parse_spec(info["spec"])
    dtype = getattr(torch, info.get("dtype", "float32"))
    qparams = _load_qparams(src / QPARAMS_FILE)

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    reference = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype).eval() if verify else None
    compressor, grids = _pack_model(model, qparams, spec, info.get("stats", {}).get("unused", ()))

    with atomic_path(out) as tmp:  # the folder appears complete or not at all
        model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        cfg_file = tmp / "config.json"
        cfg = json.loads(cfg_file.read_text())
        # Ask transformers to dequantize on load (CompressedTensorsConfig(dequantize=True), read from here):
        # its compressed-in-memory path cannot load asymmetric pack-quantized weights (its meta pass builds
        # the zero point unpacked, so the packed one is refused as a size mismatch; llm-compressor #1618),
        # and prompt learning needs dense weights anyway. compressed-tensors and vLLM ignore the key.
        cfg["quantization_config"]["dequantize"] = True
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        tokenizer.save_pretrained(tmp)
        before, after = linear_bytes(src, grids), linear_bytes(tmp, grids)
        record = {
            "format": "compressed-tensors",
            "compression_format": COMPRESSION_FORMAT,
            "compressed_tensors_version": version,
            "source": str(src.resolve()),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "num_bits": spec.quant.bits,
            "symmetric": spec.quant.sym,
            # columns per stored grid (0 = per channel); smaller than the spec's G where G does not divide a width
            "group_size": next(iter(grids.values())).group_size,
            "n_linear": len(grids),
            "linear_bytes": {"fake_quant": before, "export": after, "ratio": before / after},
            "vllm_kernels": spec.quant.bits in VLLM_KERNEL_BITS,
        }
        if spec.sparse is not None:
            record["sparsity"] = "exact zeros inside the packed codes (compressed-tensors has no sparse format)"
        if verify:
            record["max_abs_diff"] = _verify(reference, tmp)
            if record["max_abs_diff"] != 0.0:
                import transformers

                raise ExportError(
                    f"reloaded export differs from the checkpoint by {record['max_abs_diff']:.3g} with transformers "
                    f"{transformers.__version__} (exact with 5.24; 5.17 dequantizes bf16 checkpoints with bf16-rounded "
                    "scales). The packed codes matched the grid bit for bit; to keep the files anyway, use "
                    "verify=False (ctp-compress --no-verify)")
        (tmp / INFO_FILE).write_text(json.dumps({**info, "export": record}, indent=1))
    if not record["vllm_kernels"]:
        logger.warning("%d-bit weights: vLLM's compressed-tensors kernels take 4 or 8 bits; this export loads in "
                       "transformers / compressed-tensors", spec.quant.bits)
    logger.info("exported %s -> %s: Linear weights %d -> %d bytes (%.2fx)", src, out, before, after, before / after)
    return record

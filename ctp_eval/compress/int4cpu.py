"""Run a compressed checkpoint on the CPU with its weights kept as 4-bit codes (torch's own int4 matmul).

Our checkpoints hold fake-quantized float weights; `ctp_qparams.safetensors` holds their exact grids. This
module re-encodes each quantized Linear (through `export.to_packed_grid`, which checks that the grid reproduces
the weight bit for bit) into `Int4Linear`: packed 4-bit codes plus one (scale, zero) pair per group, multiplied
by `torch.ops.aten._weight_int4pack_mm_for_cpu` (the kernel under torchao's CPU int4 tensors; it needs no
torchao). Only Linear layers change: embeddings, norms and the LM head stay as they are, so a soft prompt goes
in through `inputs_embeds` exactly as on the fake-quantized model.

Kernel contract (torch 2.13: `torch/_meta_registrations.py` and the checks the CPU kernel raises):
  * weight: int32 codes (N, K) in [0, 15] -> `_convert_weight_to_int4pack_for_cpu(w, 1)` -> uint8 (N, K/2)
    (inner_k_tiles is unused on CPU); N must be a multiple of 16, K even;
  * `scales_and_zeros`: (K/g, N, 2) in the activations' dtype, [..., 0] the scale, [..., 1] a float zero, with
    w = (q - 8) * scale + zero;
  * group size g in {32, 64, 128, 256}, dividing K; activations 2-D float32, bfloat16 or float16; output in
    the activations' dtype.

Grid mapping. Ours is w = scale * (q - z) with unsigned q in [0, 2^b - 1] and an integer zero point z. For
b <= 4 the same q is a valid int4 code, and (q - 8) * scale + scale * (8 - z) = scale * (q - z), so the float
zero is scale * (8 - z) (0 for symmetric 4-bit grids, z = 8). Each of our groups becomes one or more kernel
groups holding the same pair: the kernel group is the largest allowed size dividing the layer width and our
group width (g128 on a 576-wide layer: groups of 64; a per-channel grid: up to 256).

Compute dtype. Activations, scales and zeros share one dtype; bfloat16 is the default because it is the kernel's
fast path: on this project's AVX2 CPU (one thread, 1536 x 576 and 576 x 1536 layers) bf16 took 0.24-0.36x the
time of a dense bf16 matmul from 8 to 1024 rows (0.85-0.97x at one row), while float32 and float16 activations
took 10-44x longer than bf16 (a slow generic path). float32 reproduces the fake-quantized matmul to rounding;
bf16 rounds activations, scales and zeros (bench/README.md, "Low-bit runtime": -0.12 % WikiText-2 PPL on
SmolLM2 gptq:w4g64 with a prompt).

Inference only: the kernel has no backward, so prompts are trained on the fake-quantized model.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .export import ExportError, spec_export_problem, to_packed_grid
from .io import INFO_FILE, QPARAMS_FILE
from .spec import CompressSpec, parse_spec

logger = logging.getLogger(__name__)

KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # largest first: fewer scale/zero pairs for the same grid
KERNEL_N_MULTIPLE = 16  # the CPU packer works on blocks of 16 output rows
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MID = 8  # the kernel's fixed code offset: w = (q - 8) * scale + zero
DEFAULT_COMPUTE_DTYPE = torch.bfloat16  # the kernel's fast path on CPU (module docstring)


class Int4Error(ValueError):
    """A checkpoint or layer the int4 CPU kernel cannot run; the message says why."""


def kernel_available() -> bool:
    """Whether the installed torch has the CPU int4 ops (torch >= 2.5 ships them)."""
    aten = torch.ops.aten
    return hasattr(aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(aten, "_weight_int4pack_mm_for_cpu")


def kernel_group_size(in_features: int, group_size: int) -> int | None:
    """The largest kernel group size that divides `in_features` and keeps every one of our groups (`group_size`
    columns, the last possibly shorter; 0 = per channel) whole, or None if none does. Pure."""
    width = group_size if 0 < group_size < in_features else in_features
    common = math.gcd(width, in_features)
    return next((g for g in KERNEL_GROUP_SIZES if common % g == 0), None)


def int4_problem(in_features: int, out_features: int, bits: int, group_size: int) -> str | None:
    """Why a Linear with this shape and grid cannot run on the kernel (None: it can). Pure."""
    if bits > 4:
        return f"{bits}-bit codes do not fit the 4-bit kernel"
    if out_features % KERNEL_N_MULTIPLE:
        return f"out_features {out_features} is not a multiple of {KERNEL_N_MULTIPLE}"
    if kernel_group_size(in_features, group_size) is None:
        return (f"no kernel group size ({', '.join(map(str, KERNEL_GROUP_SIZES))}) divides in_features "
                f"{in_features} and the grid's groups of {group_size or in_features}")
    return None


class Int4Linear(nn.Module):
    """y = x W^T + b with W held as packed 4-bit codes and per-group (scale, zero) pairs; nothing else.

    Buffers: `weight_int4` uint8 (N, K/2), `scales_and_zeros` (K/g, N, 2) in the compute dtype, `bias` (N,)
    or None. Inputs of any float dtype are cast to the compute dtype and the output back to the input's dtype,
    to which the bias is then added (a bf16 compute dtype would round it).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int,
                 dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE, bias: bool = False):
        super().__init__()
        if dtype not in KERNEL_DTYPES:
            raise Int4Error(f"compute dtype {dtype}: the kernel takes {', '.join(map(str, KERNEL_DTYPES))}")
        if group_size not in KERNEL_GROUP_SIZES or in_features % group_size:
            raise Int4Error(f"group size {group_size} on {in_features} columns: the kernel takes "
                            f"{', '.join(map(str, KERNEL_GROUP_SIZES))}, dividing in_features")
        if out_features % KERNEL_N_MULTIPLE or in_features % 2:
            raise Int4Error(f"({out_features}, {in_features}): the kernel needs out_features a multiple of "
                            f"{KERNEL_N_MULTIPLE} and an even in_features")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_grid(cls, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                  *, bias: torch.Tensor | None = None, g_idx: torch.Tensor | None = None, sym: bool = False,
                  dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE, name: str = "weight") -> Int4Linear:
        """Pack a fake-quantized weight (out, in) on its saved grid (scale, zero: (out, n_groups), our groups of
        `group_size` columns, 0 = per channel). Raises Int4Error if the kernel cannot take the layer, or if the
        weight is not on the grid. `dtype`: compute dtype (activations, scales, zeros, bias)."""
        rows, cols = weight.shape
        problem = int4_problem(cols, rows, bits, group_size)
        if problem:
            raise Int4Error(f"{name}: {problem}")
        g = kernel_group_size(cols, group_size)
        try:  # the one re-encoding of a weight on its grid, checked exact (shared with the export)
            grid = to_packed_grid(weight, scale, zero, bits, group_size, sym, g_idx, name, stored_group=g)
        except ExportError as err:
            raise Int4Error(str(err)) from None
        mid = 2 ** (bits - 1)
        codes = grid.codes.to(torch.int32) + mid  # our unsigned q in [0, 2^b - 1], a valid int4 code for b <= 4
        z = torch.full_like(grid.scale, mid) if grid.zero is None else grid.zero.float() + mid  # (N, K/g)
        s = grid.scale.double()
        float_zero = s * (MID - z.double())  # (q - 8) * s + s * (8 - z) = s * (q - z)
        module = cls(cols, rows, g, dtype, bias=bias is not None)
        module.weight_int4.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1))
        module.scales_and_zeros.copy_(torch.stack([s, float_zero], dim=-1).transpose(0, 1).to(dtype))
        if bias is not None:
            module.bias = bias.detach().clone()  # in its own dtype
        return module

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight as held: packed codes plus scales and zeros (the bias is counted apart)."""
        return sum(t.numel() * t.element_size() for t in (self.weight_int4, self.scales_and_zeros))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("Int4Linear is inference-only (the int4 kernel has no backward); train prompts on "
                               "the fake-quantized model")
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype).contiguous()  # (B*T, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4, self.group_size, self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_features).to(dtype)
        return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"dtype={str(self.scales_and_zeros.dtype).replace('torch.', '')}, bias={self.bias is not None}")


def _check_spec(spec: str | CompressSpec):
    spec = parse_spec(spec)
    problem = spec_export_problem(spec)  # none, sparse-only and grouped act-order have no grid to re-encode
    if problem:
        raise Int4Error(problem)
    if spec.quant.bits > 4:
        raise Int4Error(f"{spec}: {spec.quant.bits}-bit codes do not fit the 4-bit kernel")
    return spec.quant


def _new_stats(dtype) -> dict:
    return {"n_int4": 0, "left_dense": {}, "group_sizes": Counter(), "compute_dtype": str(dtype).replace("torch.", ""),
            "linear_bytes": {"before": 0, "bf16": 0, "int4": 0}}


def _count(stats: dict, module: Int4Linear, before: int) -> None:
    stats["n_int4"] += 1
    stats["group_sizes"][module.group_size] += 1
    b = stats["linear_bytes"]
    b["before"] += before
    b["bf16"] += module.in_features * module.out_features * 2
    b["int4"] += module.weight_bytes


def _finish(stats: dict) -> dict:
    b = stats["linear_bytes"]
    b["ratio_before"] = b["int4"] / b["before"] if b["before"] else float("nan")
    b["ratio_bf16"] = b["int4"] / b["bf16"] if b["bf16"] else float("nan")
    stats["group_sizes"] = dict(sorted(stats["group_sizes"].items()))
    if stats["left_dense"]:
        logger.warning("%d Linear(s) stay dense, e.g. %s: %s", len(stats["left_dense"]),
                       *next(iter(stats["left_dense"].items())))
    return stats


def _grid(qparams: dict, name: str) -> dict:
    return {k: qparams[name][k] for k in ("scale", "zero", "g_idx") if k in qparams[name]}


def convert_model(model: nn.Module, qparams: dict | str | os.PathLike, spec: str | CompressSpec, *,
                  dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> dict:
    """Replace, in place, every Linear of `model` that has a grid in `qparams` by an `Int4Linear`.

    qparams: {"<linear name>": {"scale", "zero"[, "g_idx"]}} (what `compress_model(qparams_out=)` fills) or the
    path of a folder's `ctp_qparams.safetensors`. spec: the compression's spec (its group size and bits cannot
    be read off the grids). dtype: the Int4Linears' compute dtype. A Linear the kernel cannot take
    (shape, group size) stays dense and is named in stats["left_dense"] with the reason; a spec with no usable
    grid (sparse-only, > 4 bits, grouped act-order) raises Int4Error.
    Returns {"n_int4", "left_dense", "group_sizes", "compute_dtype", "linear_bytes": {"before" (the converted
    Linears' weights as they were), "bf16" (the same in bf16), "int4" (as held now), "ratio_before",
    "ratio_bf16"}}.
    """
    q = _check_spec(spec)
    if not isinstance(qparams, dict):
        qparams = _read_qparams(qparams)
    stats = _new_stats(dtype)
    for name in sorted(qparams):
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise Int4Error(f"{name} has a grid but is a {type(linear).__name__}, not a Linear")
        W = linear.weight.detach()
        problem = int4_problem(W.shape[1], W.shape[0], q.bits, q.group_size)
        if problem:
            stats["left_dense"][name] = problem
            continue
        module = Int4Linear.from_grid(W, **_grid(qparams, name), bits=q.bits, group_size=q.group_size, sym=q.sym,
                                      bias=linear.bias, dtype=dtype, name=name).to(W.device)
        _count(stats, module, W.numel() * W.element_size())
        model.set_submodule(name, module)
    return _finish(stats)


def _read_qparams(path: str | os.PathLike) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for key, t in load_file(str(path)).items():
        layer, _, field = key.rpartition(".")
        out.setdefault(layer, {})[field] = t
    return out


def compressed_tensors_grids(folder: str | os.PathLike) -> tuple[dict, str]:
    """(grids, spec) of a compressed-tensors `pack-quantized` weight-only folder of at most 4 bits (a
    `ctp-compress --export`, or llm-compressor's W4A16), in our convention (`convert_model`'s qparams: scale and
    integer zero point per group, w = scale * (q - zero), unsigned q), read from its scale and zero-point tensors
    alone; the spec names bits, stored group (0: per channel) and symmetry. compressed-tensors' signed codes and
    zero points differ from ours by 2^(b-1) (export.py's module docstring), so its zero z' is ours minus that."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    folder = Path(folder)
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized":
        raise Int4Error(f"{folder} is not a compressed-tensors pack-quantized checkpoint")
    schemes = [g for g in (qc.get("config_groups") or {}).values() if g.get("weights")]
    weights = {json.dumps(g["weights"], sort_keys=True) for g in schemes}
    if len(weights) != 1 or any(g.get("input_activations") for g in schemes):
        raise Int4Error(f"{folder}: the int4 kernel runs one weight-only scheme; this checkpoint has {len(weights)} "
                        "weight schemes or quantized activations")
    w = schemes[0]["weights"]
    bits, strategy, sym = int(w["num_bits"]), w.get("strategy"), bool(w.get("symmetric", True))
    if w.get("type", "int") != "int" or bits > 4 or strategy not in ("channel", "group"):
        raise Int4Error(f"{folder}: {w.get('type')} {bits}-bit {strategy} weights do not fit the 4-bit kernel")
    if w.get("actorder") == "group":  # columns in act order need a g_idx the kernel has no way to apply
        raise Int4Error(f"{folder}: grouped act-order weights (g_idx) do not fit the kernel")
    group = int(w["group_size"]) if strategy == "group" else 0
    mid = 2 ** (bits - 1)
    grids: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if not key.endswith(".weight_scale"):
                    continue
                name = key.removesuffix(".weight_scale")
                scale = fh.get_tensor(key).float()
                if sym:
                    zero = torch.full_like(scale, mid)
                else:
                    packed = fh.get_tensor(f"{name}.weight_zero_point")
                    zero = unpack_from_int32(packed, bits, scale.shape, packed_dim=0).float() + mid
                grids[name] = {"scale": scale, "zero": zero}
    if not grids:
        raise Int4Error(f"{folder} holds no packed Linear")
    return grids, f"rtn:w{bits}" + (f"g{group}" if group else "") + ("-sym" if sym else "")


def load_int4_model(folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE):
    """(model, tokenizer, stats): the compressed checkpoint `folder` with its quantized Linears as Int4Linear,
    loaded holding one float Linear weight at a time: the model is built on the meta device, each Linear is
    packed from its stored weight read alone, and the other tensors are assigned as read. dtype: of the other
    weights (embeddings, norms, LM head; default: the checkpoint's); compute_dtype: the Int4Linears'. Inputs and
    outputs of an Int4Linear are cast between the two. stats: as `convert_model`'s.
    """
    from safetensors import safe_open
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    folder = Path(folder)
    info_file = folder / INFO_FILE
    if not info_file.is_file():
        raise Int4Error(f"{folder} is not a ctp compressed checkpoint (no {INFO_FILE})")
    info = json.loads(info_file.read_text())
    q = _check_spec(info.get("spec", "none"))
    if not (folder / QPARAMS_FILE).is_file():
        raise Int4Error(f"{folder} has no {QPARAMS_FILE} (the exact grids); recompress it with this ctp-eval")
    dtype = dtype or getattr(torch, info.get("dtype", "float32"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=dtype)
    qparams = _read_qparams(folder / QPARAMS_FILE)
    stats = _new_stats(compute_dtype)
    rest: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == QPARAMS_FILE:
            continue
        for key in _keys(f):
            with safe_open(str(f), framework="pt") as fh:  # a fresh handle per tensor: read pages do not linger
                t = fh.get_tensor(key)
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and name in qparams:
                problem = int4_problem(t.shape[1], t.shape[0], q.bits, q.group_size)
                if problem is None:
                    module = Int4Linear.from_grid(t, **_grid(qparams, name), bits=q.bits, group_size=q.group_size,
                                                  sym=q.sym, dtype=compute_dtype, name=name)
                    _count(stats, module, t.numel() * t.element_size())
                    model.set_submodule(name, module)
                    continue
                stats["left_dense"][name] = problem
            rest[key] = t.to(dtype) if t.is_floating_point() else t
    for key, t in rest.items():
        owner, _, attr = key.rpartition(".")
        if attr == "bias" and isinstance(model.get_submodule(owner), Int4Linear):
            model.get_submodule(owner).bias = t  # read in whichever order the shards hold weight and bias
        else:
            _assign(model, key, t)
    model.tie_weights()  # the LM head shares the embedding assigned above
    _materialize_buffers(model)
    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model, AutoTokenizer.from_pretrained(str(folder)), _finish(stats)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


def _assign(model: nn.Module, key: str, t: torch.Tensor) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = t
    else:
        raise Int4Error(f"{key}: the checkpoint has a tensor the model does not")


def _materialize_buffers(model: nn.Module) -> None:
    """Compute the buffers no checkpoint stores (rotary inverse frequencies) with transformers' own init, the
    way its loader does after a meta-device build; anything else left on meta is an error."""
    for module in model.modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if meta and not list(module.parameters(recurse=False)):  # its init then touches these buffers only
            for n in meta:
                module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
            model._init_weights(module)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise Int4Error(f"the checkpoint does not hold {left[:3]} and they cannot be computed")

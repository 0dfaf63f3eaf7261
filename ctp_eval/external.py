"""Checkpoints that other tools quantized (llm-compressor, GPTQModel, AutoAWQ, bitsandbytes, torchao, HQQ, ...).

Such a folder carries its own quantization in `config.json` under `quantization_config`, and transformers loads it
through that library. `describe_quantization` turns that dict into a short label plus the full record, so that a
prompt trained on the checkpoint and its lm-eval results name what the model is instead of "none"
(docs/external-checkpoints.md):

    label  := METHOD "/" SCHEME ["+" SCHEME]...
    METHOD := the config's own `quant_method` (compressed-tensors, gptq, awq, bitsandbytes, torchao, hqq, ...)

The "/" is what tells a label from our own specs (`ctp_eval.compress.spec`: "gptq:w4g128-sym", always ":"), so a
GPTQModel checkpoint reads "gptq/w4g128-sym" and never passes for one of ours. SCHEME, per method:

    compressed-tensors  w<bits>a<bits>[g<group> | b<rows>x<cols> | -tensor](-sym | -asym)[-act][-dyn], one per config
                        group ("fp" before a float type's bits: wfp8afp8-dyn), then +sparse-<structure>, +kv<bits>
    gptq, awq, others   w<bits>[g<group>](-sym | -asym)[-act]   (weight-only: no a16)
    bitsandbytes        nf4 | fp4 [-dq] (double quantization) | int8
    torchao             the config class in kebab case, [-g<group>]: int8-weight-only, int4-weight-only-g128

`prepare_for_prompt` then makes a loaded model fit for a prompt and records what it holds in memory: modules
that stay quantized (bitsandbytes, torchao) are kept when the prompt's gradient flows through them (checked with
one tiny backward); compressed-tensors, which unpacks its weights on the first forward anyway, is unpacked at once.
Importing this module loads neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

SEPARATOR = "/"
PACKED_ATTRS = ("qweight", "weight_packed", "W_q")  # what quantized layer classes store instead of a weight
# quant_method -> (pip packages transformers needs to load it, their import names); absent: built into transformers
LOADERS = {
    "compressed-tensors": (("compressed-tensors",), ("compressed_tensors",)),
    "gptq": (("gptqmodel", "optimum"), ("gptqmodel", "optimum")),
    "awq": (("gptqmodel",), ("gptqmodel",)),
    "bitsandbytes": (("bitsandbytes",), ("bitsandbytes",)),
    "torchao": (("torchao",), ("torchao",)),
    "hqq": (("hqq",), ("hqq",)),
    "quanto": (("optimum-quanto",), ("optimum.quanto",)),
    "aqlm": (("aqlm",), ("aqlm",)),
    "vptq": (("vptq",), ("vptq",)),
    "eetq": (("kernels",), ("kernels",)),
    "fbgemm_fp8": (("fbgemm-gpu",), ("fbgemm_gpu",)),
    "auto-round": (("auto-round",), ("auto_round",)),
}


class ExternalCheckpointError(ValueError):
    """A quantized checkpoint that cannot be loaded or prompted here; the one-line message says what is missing."""


@dataclass(frozen=True)
class CheckpointQuantization:
    """A checkpoint's own quantization: the short label results and prompt files carry, and the full record."""

    label: str  # e.g. "compressed-tensors/w4a16g64-sym"
    details: dict = field(default_factory=dict)  # JSON-able: method, library + version, bits, group, format, config


def is_external_label(compression: str | None) -> bool:
    """Whether a recorded compression is a checkpoint's own quantization (a label here), not one of our specs."""
    return bool(compression) and SEPARATOR in compression


# ----- describing (pure: dicts in, strings out) ------------------------------------------------------------------
def _bits_token(prefix: str, args: dict | None) -> str:
    if not args:
        return f"{prefix}16"
    return f"{prefix}{'fp' if args.get('type') == 'float' else ''}{args.get('num_bits', '?')}"


def _ct_scheme(scheme: dict) -> str:
    """One compressed-tensors config group, e.g. w4a16g128-sym, w8a8-sym-dyn, wfp8afp8-dyn."""
    w, a = scheme.get("weights") or None, scheme.get("input_activations") or None
    text = _bits_token("w", w) + _bits_token("a", a)
    if w:
        strategy = w.get("strategy")
        if strategy in ("group", "tensor_group") and w.get("group_size"):
            text += f"g{w['group_size']}"
        elif strategy == "block" and w.get("block_structure"):
            text += "b" + "x".join(str(n) for n in w["block_structure"])
        elif strategy == "tensor":
            text += "-tensor"
        if w.get("type", "int") == "int":
            text += "-sym" if w.get("symmetric", True) else "-asym"
        if w.get("actorder") not in (None, False, "none"):
            text += "-act"
    if a and a.get("dynamic") not in (None, False):
        text += "-dyn"
    return text


def _compressed_tensors(qc: dict) -> tuple[list[str], dict]:
    groups = qc.get("config_groups") or {}
    schemes = {name: g for name, g in groups.items() if isinstance(g, dict)}
    presets = {name.lower() for name, g in groups.items() if isinstance(g, list)}  # {"W4A16": ["Linear"]} shorthand
    parts = sorted({_ct_scheme(g) for g in schemes.values()} | presets) or ["custom"]
    weights = [g.get("weights") or {} for g in schemes.values()]
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        parts.append(f"sparse-{sparsity.get('sparsity_structure') or sparsity.get('global_sparsity')}")
    kv = qc.get("kv_cache_scheme")
    if kv:
        parts.append(_bits_token("kv", kv))
    info = dict(
        bits=_same(w.get("num_bits") for w in weights),
        group_size=_same(w.get("group_size") for w in weights),
        symmetric=_same(w.get("symmetric") for w in weights),
        format=qc.get("format") or _same(g.get("format") for g in schemes.values()),
        schemes=schemes,
        ignore=qc.get("ignore"),
        written_by=f"compressed-tensors {qc['version']}" if qc.get("version") else None,
    )
    return parts, info


def _same(values):
    """The one value all entries share, else None (mixed or absent)."""
    vals = {json.dumps(v, sort_keys=True) for v in values}
    return json.loads(vals.pop()) if len(vals) == 1 else None


def _first(qc: dict, *keys):
    return next((qc[k] for k in keys if qc.get(k) is not None), None)


def _weight_only(qc: dict, sym_default: bool | None = None) -> tuple[list[str], dict]:
    """GPTQ, AWQ and the generic fallback: w<bits>[g<group>](-sym|-asym)[-act]."""
    bits = _first(qc, "bits", "w_bit", "num_bits", "nbits", "weight_bits")
    group = _first(qc, "group_size", "q_group_size")
    sym = _first(qc, "sym", "symmetric")
    if sym is None and qc.get("zero_point") is not None:  # AWQ: a zero point means an asymmetric grid
        sym = not qc["zero_point"]
    sym = sym_default if sym is None else sym
    text = f"w{bits}" if bits is not None else ""
    if group and int(group) > 0:
        text += f"g{group}"
    if qc.get("weight_block_size"):
        text += "b" + "x".join(str(n) for n in qc["weight_block_size"])
    if sym is not None and bits is not None:
        text += "-sym" if sym else "-asym"
    if qc.get("desc_act"):
        text += "-act"
    if qc.get("activation_scheme"):
        text += f"-{qc['activation_scheme']}"
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    written = meta.get("quantizer")
    info = dict(bits=bits, group_size=None if group is None or int(group) <= 0 else group, symmetric=sym,
                format=_first(qc, "checkpoint_format", "format", "version", "backend"),
                written_by=", ".join(written) if isinstance(written, list) else written)
    return [text.lstrip("-") or "custom"], info


def _bitsandbytes(qc: dict) -> tuple[list[str], dict]:
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        kind = qc.get("bnb_4bit_quant_type", "fp4")
        text = kind + ("-dq" if qc.get("bnb_4bit_use_double_quant") else "")
        return [text], dict(bits=4, group_size=None, symmetric=None, format=kind)
    return ["int8"], dict(bits=8, group_size=None, symmetric=True, format="llm.int8")


def _kebab(name: str) -> str:
    name = re.sub(r"Config$", "", name)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower().replace("_", "-")


def _torchao(qc: dict) -> tuple[list[str], dict]:
    qt = qc.get("quant_type")
    if isinstance(qt, str):  # older transformers: a name plus quant_type_kwargs
        entries = [(qt, qc.get("quant_type_kwargs") or {})]
    elif isinstance(qt, dict):  # {"default": {"_type": "Int8WeightOnlyConfig", "_data": {...}}, "<module fqn>": ...}
        entries = [(v.get("_type", "?"), v.get("_data") or {}) for v in qt.values() if isinstance(v, dict)]
    else:
        entries = []
    parts = set()
    for name, data in entries:
        group = data.get("group_size")
        parts.add(_kebab(name) + (f"-g{group}" if group else ""))
    bits = {int(m[1]) for name, _ in entries for m in [re.search(r"(?:int|float|fp)(\d+)", name.lower())] if m}
    groups = {d.get("group_size") for _, d in entries}
    return sorted(parts) or ["custom"], dict(bits=bits.pop() if len(bits) == 1 else None,
                                             group_size=groups.pop() if len(groups) == 1 else None,
                                             symmetric=None, format=_same(n for n, _ in entries))


def _hqq(qc: dict) -> tuple[list[str], dict]:
    found: dict = {}

    def walk(d):
        if isinstance(d, dict):
            for k, v in d.items():
                if k in ("nbits", "group_size") and k not in found and v is not None:
                    found[k] = v
                walk(v)

    walk(qc.get("quant_config") or qc)
    return _weight_only({"bits": found.get("nbits"), "group_size": found.get("group_size")})


def _quanto(qc: dict) -> tuple[list[str], dict]:
    def tok(prefix, value):
        if not value:
            return f"{prefix}16"
        m = re.match(r"(int|float)(\d+)", str(value))
        return f"{prefix}{'fp' if m and m[1] == 'float' else ''}{m[2] if m else value}"

    bits = re.search(r"\d+", str(qc.get("weights", "")))
    return [tok("w", qc.get("weights")) + tok("a", qc.get("activations"))], dict(
        bits=int(bits[0]) if bits else None, group_size=None, symmetric=None, format=qc.get("weights"))


_SCHEMES = {
    "compressed-tensors": _compressed_tensors,
    "gptq": lambda qc: _weight_only(qc, sym_default=True),  # GPTQModel / AutoGPTQ default to symmetric grids
    "awq": _weight_only,
    "bitsandbytes": _bitsandbytes,
    "torchao": _torchao,
    "hqq": _hqq,
    "quanto": _quanto,
}


def library_version(method: str) -> tuple[str, str | None]:
    """(the package that loads `method` here, its installed version or None); transformers itself for the methods
    built into it (fp8, ...)."""
    from importlib import metadata

    packages = LOADERS.get(method, ((), ()))[0]
    package = packages[0] if packages else "transformers"
    try:
        return package, metadata.version(package)
    except metadata.PackageNotFoundError:
        return package, None


def describe_quantization(config: dict) -> CheckpointQuantization | None:
    """The label and full record of a `quantization_config` dict (or a whole config.json dict holding one); None
    when there is none. Pure apart from looking up the installed version of the loading library."""
    qc = config.get("quantization_config", config) if isinstance(config, dict) else None
    if not isinstance(qc, dict) or not qc.get("quant_method"):
        return None
    method = str(qc["quant_method"]).lower()
    parts, info = _SCHEMES.get(method, _weight_only)(qc)
    label = f"{method}{SEPARATOR}{'+'.join(parts)}"
    library, version = library_version(method)
    details = dict(label=label, quant_method=method, library=library, library_version=version, **info, config=qc)
    return CheckpointQuantization(label, {k: v for k, v in details.items() if v is not None or k == "library_version"})


def read_quantization(pretrained: str | os.PathLike | None) -> CheckpointQuantization | None:
    """The quantization a local model folder's config.json declares, or None (dense, not a folder, no config).
    Our own compressed folders (`ctp_compression.json`) are described by that file instead: callers check it first."""
    if not pretrained or not os.path.isdir(str(pretrained)):
        return None
    f = Path(pretrained) / "config.json"
    try:
        return describe_quantization(json.loads(f.read_text())) if f.is_file() else None
    except (ValueError, UnicodeDecodeError):
        return None  # transformers will say what is wrong with the file


def model_quantization(model) -> CheckpointQuantization | None:
    """The quantization of a loaded transformers model, from its config (works for hub ids too)."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return None
    qc = dict(qc if isinstance(qc, dict) else qc.to_dict())
    qc["quant_method"] = getattr(qc.get("quant_method"), "value", qc.get("quant_method"))  # an enum in transformers
    return describe_quantization(json.loads(json.dumps(qc, default=str)))  # JSON, as the folder's file would be


# ----- loading ---------------------------------------------------------------------------------------------------
def check_installed(path, quant: CheckpointQuantization) -> None:
    """Refuse, in one line naming the package, a checkpoint whose loading library is not installed."""
    import importlib.util

    packages, modules = LOADERS.get(quant.details["quant_method"], ((), ()))
    missing = []
    for pkg, mod in zip(packages, modules):
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:  # a dotted name whose parent is missing
            found = False
        if not found:
            missing.append(pkg)
    if missing:
        raise ExternalCheckpointError(
            f"{path} is a {quant.label} checkpoint; loading it needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed here: pip install {' '.join(missing)}")


def load_failure(path, quant: CheckpointQuantization, err: BaseException) -> ExternalCheckpointError:
    """One line for a quantized checkpoint transformers could not load (a kernel missing on this device, ...)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    reason = lines[0] if lines else ""
    library = quant.details.get("library")
    version = quant.details.get("library_version")
    return ExternalCheckpointError(f"{path} is a {quant.label} checkpoint and {library} {version or ''} could not "
                                   f"load it here: {type(err).__name__}: {reason}".replace("  ", " "))


def quantized_linears(model) -> list[str]:
    """Modules whose weight is not a plain floating tensor: still quantized in memory (packed, int8, nf4, ...)."""
    import torch

    out = []
    for name, mod in model.named_modules():
        if any(hasattr(mod, a) for a in PACKED_ATTRS):  # a library's own layer class (GPTQ, HQQ, packed c-t)
            out.append(name)
            continue
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = getattr(mod, "weight", None)
        if w is None or type(w) not in (torch.nn.Parameter, torch.Tensor) or not w.dtype.is_floating_point:
            out.append(name)
    return out


def input_grad_problem(model) -> str | None:
    """None if the prompt's gradient flows through the model's (frozen, quantized) modules; else why not. One
    forward and backward on two positions of inputs_embeds, as the prompt enters in training."""
    import torch

    embed = model.get_input_embeddings()
    x = embed(torch.zeros(1, 2, dtype=torch.long, device=embed.weight.device)).detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            model(inputs_embeds=x, use_cache=False).logits.float().sum().backward()
    except Exception as err:  # a kernel without a backward raises here, of any type
        return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    if x.grad is None:
        return "no gradient reaches inputs_embeds"
    if not bool(torch.isfinite(x.grad).all()) or not bool(x.grad.any()):
        return "the gradient reaching inputs_embeds is zero or not finite"
    return None


def prepare_for_prompt(model, quant: CheckpointQuantization | None = None, *,
                       input_grad: bool = False) -> CheckpointQuantization | None:
    """Make a loaded quantized model fit for a prompt; returns its quantization with `in_memory` recorded
    ("quantized": modules kept packed; "dequantized": dense weights), or None for a dense model.

    compressed-tensors unpacks its weights on the model's first forward (a pre-hook): done here, so the weights
    are fixed from load on and calls into submodules (decoder only, prompt-aware attention) see them. With
    `input_grad` (training) a model that keeps quantized modules is checked to pass a gradient to inputs_embeds;
    if it does not, it is dequantized by transformers (refused in one line where that is not implemented)."""
    quant = quant or model_quantization(model)
    if quant is None:
        return None
    reason = None
    if getattr(model, "ct_decompress_hook", None) is not None:
        model.hf_quantizer.compressor.decompress_model(model)  # also removes the hook
        reason = "compressed-tensors unpacks its weights on the first forward"
        logger.info("%s: weights unpacked on load (%s)", quant.label, reason)
    elif input_grad and quantized_linears(model):
        problem = input_grad_problem(model)
        if problem:
            try:
                model.dequantize()
            except (NotImplementedError, ValueError, AttributeError) as err:
                raise ExternalCheckpointError(
                    f"{quant.label}: its kernels give the prompt no gradient ({problem}) and transformers cannot "
                    f"dequantize it ({err}); load a dense copy instead") from None
            reason = f"its kernels give the prompt no gradient ({problem})"
            logger.warning("%s: dequantized on load, because %s", quant.label, reason)
    kept = quantized_linears(model)
    details = dict(quant.details, in_memory="quantized" if kept else "dequantized")
    if kept:
        details["quantized_modules"] = len(kept)
    if reason:
        details["dequantized_because"] = reason
    return CheckpointQuantization(quant.label, details)

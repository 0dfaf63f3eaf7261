"""The soft prompt: k trainable embeddings prepended to every input, and its file format.

File format (defined here and nowhere else), a single safetensors file:
  tensor  "prompt"   float32, shape (k, hidden_size)
  metadata (safetensors string map):
    "format": "pt", "ctp_format": "ctp-soft-prompt", "ctp_format_version": "1",
    "ctp_metadata": JSON of `PromptMetadata` (base model, hidden size, vocab size, tokenizer fingerprint,
                    compression spec, layout, training data, steps, seed, val PPL before/after, version, ...)

Layout (`PromptMetadata.layout`, the one definition of where a prompt sits; `prefix_embeds` builds it):
  "prompt-first" - [prompt][text]: files without the field, PEFT adapters (virtual tokens first), and every
                   prompt trained with a tokenizer that adds no BOS (SmolLM2).
  "after-bos"    - [BOS][prompt][text]: prompts trained with a tokenizer that adds BOS (Llama, Mistral, Gemma),
                   whose real inputs start with BOS. A text that starts with BOS itself has it absorbed (the
                   prefix already holds it); a text without one (a training window, a truncated request) gets it.

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


LAYOUTS = ("prompt-first", "after-bos")


class PromptError(ValueError):
    """A prompt file is unreadable or does not fit the model it is used with."""


@dataclass
class PromptMetadata:
    base_model: str = ""
    hidden_size: int = 0
    vocab_size: int = 0
    tokenizer_fingerprint: str = ""
    compression: str = "none"  # spec the prompt was trained on (ctp_eval.compress spec syntax)
    layout: str = "prompt-first"  # where the prompt sits (LAYOUTS; module docstring); absent in older files
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

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({TENSOR_KEY: self.embeds.detach().float().cpu().contiguous()}, str(tmp), metadata=self._file_metadata())
        os.replace(tmp, path)
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


def tokenizer_adds_bos(tokenizer, add_bos_token: bool | None = None) -> bool:
    """Whether real inputs start with BOS: `add_bos_token` when given (lm-eval's HFLM arg), else what the
    tokenizer itself does to a plain text."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if add_bos_token is not None:
        return bool(add_bos_token)
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def layout_for(tokenizer, add_bos_token: bool | None = None) -> str:
    """The layout a prompt trained or applied with this tokenizer uses: after BOS where inputs start with one."""
    return "after-bos" if tokenizer_adds_bos(tokenizer, add_bos_token) else "prompt-first"


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise PromptError(f"unknown prompt layout {layout!r} (this ctp-eval knows {LAYOUTS})")
    return layout


def prefix_embeds(model, tokenizer, prompt: torch.Tensor, layout: str) -> torch.Tensor:
    """(P, d) what goes in front of the text: `prompt` (k, d) itself, or [BOS vector; prompt] for "after-bos"
    (P = k + 1). Differentiable in `prompt` (training builds its prefix here too); the BOS row is the model's own
    embedding of the token, as any real token's."""
    if check_layout(layout) == "prompt-first":
        return prompt
    bos = token_vectors(model, torch.tensor([tokenizer.bos_token_id]))  # (1, d)
    return torch.cat([bos.to(device=prompt.device, dtype=prompt.dtype), prompt])


def token_vectors(model, ids: torch.Tensor) -> torch.Tensor:
    """(n, d) float32 prompt vectors of token ids (n,): the model's own input-embedding forward, so any scale it
    applies (Gemma multiplies by sqrt(hidden_size) inside the embedding module) is included. The one way token
    ids become prompt vectors (hard prompts, text and vocabulary init); prompts live in inputs_embeds space."""
    embed = model.get_input_embeddings()
    with torch.no_grad():
        return embed(ids.to(embed.weight.device).unsqueeze(0))[0].detach().float().cpu().clone()


def init_from_vocab(model, k: int, seed: int = 0, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Lester et al. init: the vectors of k tokens sampled without replacement from the vocabulary, or from
    `candidates` (token ids, e.g. the most frequent tokens of the training data)."""
    pool = candidates if candidates is not None else torch.arange(model.get_input_embeddings().weight.shape[0])
    if len(pool) < k:
        raise ValueError(f"cannot sample {k} distinct tokens from {len(pool)} candidates")
    gen = torch.Generator().manual_seed(seed)
    return token_vectors(model, pool[torch.randperm(len(pool), generator=gen)[:k]])


def forward_with_prompt(model, input_ids: torch.Tensor, prompt_embeds: torch.Tensor | None, attention_mask=None,
                        shared_prefix: bool = False):
    """Logits aligned to `input_ids` (B, T, V) with `prompt_embeds` (k, d) in front of every row.

    Default: the reference ("prepend") path, [prompt; text] as inputs_embeds; gradients flow into the prompt; the
    k prompt positions' logits are dropped so callers index logits exactly as without a prompt. Right padding
    only (positions count from 0). `shared_prefix=True`: the prompt's k positions run once for the whole batch
    and every row attends to their keys/values (`ctp_eval.prefix_attention`); same logits and gradients, with
    (B-1)*k fewer decoder positions. It takes no attention_mask (right padding needs none: attention is causal).
    """
    if prompt_embeds is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    if shared_prefix:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("shared_prefix=True takes right-padded rows without an attention mask")
        from ctp_eval import prefix_attention

        prefix = prefix_attention.compute_prefix(model, prompt_embeds)
        return prefix_attention.forward_text(model, input_ids, prefix).logits
    embed = model.get_input_embeddings()
    tok = embed(input_ids)  # (B, T, d)
    bsz, k = input_ids.shape[0], prompt_embeds.shape[0]
    prefix = prompt_embeds.to(device=tok.device, dtype=tok.dtype).unsqueeze(0).expand(bsz, -1, -1)  # (B, k, d)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(bsz, k), attention_mask], dim=1)
    out = model(inputs_embeds=torch.cat([prefix, tok], dim=1), attention_mask=attention_mask)
    return out.logits[:, k:]

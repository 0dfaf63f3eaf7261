"""`TrainConfig`: every setting of `ctp-train`, its default and its validation, in one place.

`ctp-train --help` is derived from it (`ctp_eval.cli.configargs`), so the CLI and the Python API validate alike.
Defaults follow the paper's recipe (Xu et al., ICML 2024, and its released `soft_prompt_learning.py`): k=100
prompt tokens initialised from sampled vocabulary rows, AdamW lr 1e-3, weight decay 1e-5, linear warmup (500
steps) and decay, gradient clipping at 1.0, seqlen 1024, C4 training data, cross-entropy loss, validation
perplexity every 100 steps, best-validation prompt kept. `recipe()` names the knobs that define how a prompt
was learned; they are recorded in every prompt file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ctp_eval.data import TRAIN_SPLITS
from ctp_eval.train.losses import LOSSES
from ctp_eval.train.schedule import SCHEDULES

logger = logging.getLogger(__name__)

METHODS = ("prompt", "lora")
DTYPES = ("float32", "bfloat16")
PAPER_WARMUP = 500
# Flags that may differ between a run and its --resume without changing what is computed. `model` and `teacher`
# are compared by identity, not by path: see train.setup.target_identity / teacher_identity.
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "progress", "save_every", "stop_after", "device", "model", "teacher",
                     "teacher_cache", "data_dir", "recipe_name")
# What defines how a prompt was learned (prompt metadata `extra.recipe`, ctp-bench --recipe).
RECIPE_FIELDS = ("init", "lr", "lr_schedule", "warmup_steps", "loss", "kd_weight", "teacher_topk", "seqlen",
                 "batch_size", "steps", "val_seqlen", "dtype")


class TrainError(ValueError):
    """A configuration, data or output-folder problem, with a message meant for the user."""


class TrainingDiverged(RuntimeError):
    """Loss or gradient became NaN/inf; the last good prompt was written to last.*."""


def _meta(help_text: str, **kw) -> dict:
    return {"help": help_text, **kw}


@dataclass
class TrainConfig:
    out: str = field(metadata=_meta("output folder (prompt.safetensors, last.safetensors, checkpoint/, train_log.jsonl)"))
    model: str | None = field(default=None, metadata=_meta("HF id or local folder; default: embedded SmolLM2-135M"))
    compression: str = field(default="none", metadata=_meta("compression spec, e.g. gptq:w3g128 (ctp_eval.compress)"))
    calib_nsamples: int = field(default=128, metadata=_meta("calibration sequences for --compression"))
    calib_seqlen: int = field(default=2048, metadata=_meta("tokens per calibration sequence for --compression"))
    method: str = field(default="prompt", metadata=_meta("prompt (soft prompt) or lora (PEFT baseline)", choices=METHODS))
    k: int = field(default=100, metadata=_meta("soft prompt length in tokens"))
    init: str = field(default="vocab", metadata=_meta(
        "prompt init: vocab | vocab:N (rows of the N most frequent tokens of the training data) | random | paper | "
        "text:<hard prompt> | file:<prompt file> (warm start)"))
    data: str = field(default="c4", metadata=_meta("training corpus: c4, wikitext2, ptb or a .txt/.jsonl path"))
    data_split: str = field(default="train", metadata=_meta(
        "split of --data to train on: train, or validation where no train split is at hand (offline WikiText-2)",
        choices=TRAIN_SPLITS))
    val_data: str = field(default="c4", metadata=_meta("validation corpus (split validation)"))
    data_dir: str | None = field(default=None, metadata=_meta("data directory (default $CTP_DATA_DIR, else the HF hub)"))
    seqlen: int = field(default=1024, metadata=_meta("tokens per training window (prompt excluded)"))
    val_seqlen: int = field(default=1024, metadata=_meta(
        "tokens per validation window (prompt excluded): the evaluation length, which selects the best checkpoint"))
    batch_size: int = field(default=4, metadata=_meta("windows per step per process"))
    steps: int = field(default=30000, metadata=_meta("optimizer steps"))
    warmup_steps: int | None = field(default=None, metadata=_meta("linear warmup steps (default min(500, steps/10))"))
    lr: float | None = field(default=None, metadata=_meta("peak learning rate (default 1e-3 prompt, 2e-4 lora)"))
    lr_schedule: str = field(default="linear", metadata=_meta("decay after warmup", choices=SCHEDULES))
    weight_decay: float = field(default=1e-5, metadata=_meta("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_meta("gradient clipping norm"))
    loss: str = field(default="ce", metadata=_meta(
        "ce: next-token cross-entropy; kd: KL(teacher || model) over the vocabulary; ce+kd: a mix (--kd-weight)",
        choices=LOSSES))
    kd_weight: float = field(default=0.5, metadata=_meta("weight of the KL term in --loss ce+kd"))
    teacher: str | None = field(default=None, metadata=_meta(
        "teacher for --loss kd / ce+kd: HF id or folder (default: the uncompressed base model)"))
    teacher_topk: int = field(default=0, metadata=_meta(
        "0: full-vocabulary teacher computed on every batch; K: the teacher's top-K log-probs (with --teacher-cache)"))
    teacher_cache: str | None = field(default=None, metadata=_meta(
        "folder of cached top-K teacher log-probs per training window, reused across runs and specs"))
    recipe_name: str = field(default="", metadata=_meta(
        "a name for this recipe, recorded in the prompt (the leaderboard groups learned prompts by it)"))
    eval_every: int = field(default=100, metadata=_meta("validate every N steps (and at step 0 and the end)"))
    save_every: int = field(default=100, metadata=_meta("write checkpoint/ and last.* every N steps"))
    val_windows: int | None = field(default=None, metadata=_meta("validate on the first N windows only (None: all)"))
    val_batch_size: int | None = field(default=None, metadata=_meta("validation batch (default batch_size)"))
    dtype: str = field(default="float32", metadata=_meta("frozen weights' dtype; bfloat16 adds autocast on GPU", choices=DTYPES))
    grad_checkpointing: bool = field(default=False, metadata=_meta("recompute activations in backward (large models)"))
    loss_chunk: int = field(default=256, metadata=_meta("tokens per LM-head chunk in the loss; 0 = full logits"))
    lora_r: int = field(default=32, metadata=_meta("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_meta("LoRA alpha"))
    lora_dropout: float = field(default=0.1, metadata=_meta("LoRA dropout"))
    lora_targets: str = field(default="q_proj,v_proj", metadata=_meta("comma-separated LoRA target modules"))
    seed: int = field(default=0, metadata=_meta("seed for init, data order and dropout"))
    device: str = field(default="auto", metadata=_meta("auto | cpu | cuda | cuda:N (multi-process: cuda:LOCAL_RANK)"))
    resume: bool = field(default=False, metadata=_meta("continue from --out/checkpoint (fresh start if none)"))
    overwrite: bool = field(default=False, metadata=_meta("delete a previous run's outputs in --out first"))
    stop_after: int | None = field(default=None, metadata=_meta("stop with a checkpoint after N steps in this call"))
    progress: bool = field(default=True, metadata=_meta("tqdm progress bar"))

    def __post_init__(self):
        from ctp_eval.data import CORPORA

        if not self.out:
            raise ValueError("--out is required")
        for name in ("k", "seqlen", "val_seqlen", "batch_size", "steps", "eval_every", "save_every", "lora_r",
                     "lora_alpha", "calib_nsamples", "calib_seqlen"):
            low = 2 if name in ("seqlen", "val_seqlen", "calib_seqlen") else 1
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("val_windows", "val_batch_size", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.method not in METHODS or self.dtype not in DTYPES:
            raise ValueError(f"method must be one of {METHODS} and dtype one of {DTYPES}")
        self._check_init()
        if self.lr_schedule not in SCHEDULES or self.loss not in LOSSES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES} and loss one of {LOSSES}")
        if not 0 <= self.kd_weight <= 1:
            raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.teacher_topk < 0 or (self.teacher_cache and self.teacher_topk < 1):
            raise ValueError("--teacher-cache stores the teacher's top-K log-probs: set --teacher-topk K >= 1")
        if self.teacher_topk and not self.teacher_cache:
            raise ValueError("--teacher-topk only applies with --teacher-cache (on the fly the full vocabulary is used)")
        if self.loss == "ce" and (self.teacher or self.teacher_cache):
            raise ValueError("--teacher/--teacher-cache are for --loss kd or ce+kd")
        if self.data_split not in TRAIN_SPLITS:
            raise ValueError(f"--data-split must be one of {TRAIN_SPLITS}, got {self.data_split!r}")
        if self.data_split == "validation" and self.data == self.val_data:
            logger.warning("training on the validation split of %s, which also selects the best checkpoint: "
                           "pick another --val-data for an honest selection", self.data)
        for flag, name in (("--data", self.data), ("--val-data", self.val_data)):
            if name not in CORPORA and not (name.endswith((".txt", ".jsonl")) and os.path.isfile(name)):
                raise ValueError(f"{flag} {name!r}: use one of {', '.join(CORPORA)} or a path to an existing .txt/.jsonl file")
        if self.lr is None:
            self.lr = 1e-3 if self.method == "prompt" else 2e-4
        if self.warmup_steps is None:
            self.warmup_steps = min(PAPER_WARMUP, self.steps // 10)
        if self.lr <= 0 or self.weight_decay < 0 or self.max_grad_norm <= 0 or self.loss_chunk < 0:
            raise ValueError("lr and max_grad_norm must be > 0; weight_decay and loss_chunk >= 0")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps} for {self.steps} steps")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.compression not in ("", "none"):
            from ctp_eval.compress import parse_spec

            self.compression = str(parse_spec(self.compression))  # canonical form; SpecError lists valid forms
        else:
            self.compression = "none"

    def _check_init(self) -> None:
        init = self.init
        if init in ("vocab", "random", "paper") or (init.startswith("text:") and len(init) > 5):
            return
        if init.startswith("vocab:") and init[6:].isdigit() and int(init[6:]) >= self.k:
            return
        if init.startswith("file:"):
            if not os.path.isfile(init[5:]) and not os.path.isdir(init[5:]):
                raise ValueError(f"--init {init}: no such prompt file")
            return
        raise ValueError(f"init must be vocab, vocab:N (N >= k), random, paper, text:<prompt> or file:<path>, got {init!r}")

    @property
    def torch_dtype(self):
        """The frozen weights' torch dtype (model and teacher)."""
        import torch

        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    def recipe(self) -> dict:
        """The settings that define how the prompt was learned (recorded in its metadata)."""
        return {name: getattr(self, name) for name in RECIPE_FIELDS}

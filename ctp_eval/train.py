"""`ctp-train`: learn a soft prompt (or the LoRA baseline) that recovers a compressed model.

Defaults follow the paper's recipe (Xu et al., ICML 2024, and its released `soft_prompt_learning.py`): k=100
prompt tokens initialised from sampled vocabulary rows, AdamW lr 1e-3, weight decay 1e-5, linear warmup
(500 steps) and decay over 30k steps, gradient clipping at 1.0, seqlen 1024, C4 training data, validation
perplexity every 100 steps, best-validation prompt kept. The model's weights are frozen: only the prompt (or
the LoRA matrices) requires grad, so no weight gradient is ever allocated.

Outputs in --out: prompt.safetensors (best validation; `ctp_eval.prompt` format with full metadata),
last.safetensors (latest), checkpoint/ (exact resume: see `ctp_eval.trainutil`), train_log.jsonl, config.json.
With --method lora: adapter/ and last_adapter/ (PEFT folders) instead of the two prompt files.

Multi-GPU: `accelerate launch --multi_gpu --num_processes N -m ctp_eval.train ...` (or `torchrun
--nproc_per_node N -m ctp_eval.train ...`) runs N data-parallel ranks; rank r takes rows r*B..(r+1)*B-1 of
every global batch of N*B windows, the trainable gradients are averaged by all-reduce (no DDP wrapper: the
only trainable tensor is the prompt), and validation windows are split over the ranks. The result equals a
single process with batch N*B (tested with 2 gloo ranks on CPU). Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ctp_eval.data import TRAIN_SPLITS

logger = logging.getLogger(__name__)

METHODS = ("prompt", "lora")
DTYPES = ("float32", "bfloat16")
PAPER_WARMUP = 500
# Flags that may differ between a run and its --resume without changing what is computed.
RESUME_MAY_CHANGE = ("resume", "overwrite", "progress", "save_every", "stop_after", "device")


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
    method: str = field(default="prompt", metadata=_meta("prompt (soft prompt) or lora (PEFT baseline)", choices=METHODS))
    k: int = field(default=100, metadata=_meta("soft prompt length in tokens"))
    init: str = field(default="vocab", metadata=_meta("prompt init: vocab | random | paper | text:<hard prompt>"))
    data: str = field(default="c4", metadata=_meta("training corpus: c4, wikitext2, ptb or a .txt/.jsonl path"))
    data_split: str = field(default="train", metadata=_meta(
        "split of --data to train on: train, or validation where no train split is at hand (offline WikiText-2)",
        choices=TRAIN_SPLITS))
    val_data: str = field(default="c4", metadata=_meta("validation corpus (split validation)"))
    data_dir: str | None = field(default=None, metadata=_meta("data directory (default $CTP_DATA_DIR, else the HF hub)"))
    seqlen: int = field(default=1024, metadata=_meta("tokens per training/validation window (prompt excluded)"))
    batch_size: int = field(default=4, metadata=_meta("windows per step per process"))
    steps: int = field(default=30000, metadata=_meta("optimizer steps"))
    warmup_steps: int | None = field(default=None, metadata=_meta("linear warmup steps (default min(500, steps/10))"))
    lr: float | None = field(default=None, metadata=_meta("learning rate (default 1e-3 prompt, 2e-4 lora)"))
    weight_decay: float = field(default=1e-5, metadata=_meta("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_meta("gradient clipping norm"))
    eval_every: int = field(default=100, metadata=_meta("validate every N steps (and at step 0 and the end)"))
    save_every: int = field(default=100, metadata=_meta("write checkpoint/ and last.* every N steps"))
    val_windows: int | None = field(default=None, metadata=_meta("validate on the first N windows only (None: all)"))
    val_batch_size: int | None = field(default=None, metadata=_meta("validation batch (default batch_size)"))
    dtype: str = field(default="float32", metadata=_meta("frozen weights' dtype; bfloat16 adds autocast on GPU", choices=DTYPES))
    grad_checkpointing: bool = field(default=False, metadata=_meta("recompute activations in backward (large models)"))
    loss_chunk: int = field(default=1024, metadata=_meta("tokens per LM-head chunk in the loss; 0 = full logits"))
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
        for name in ("k", "seqlen", "batch_size", "steps", "eval_every", "save_every", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1 or (name == "seqlen" and self.seqlen < 2):
                raise ValueError(f"{name} must be >= {2 if name == 'seqlen' else 1}, got {getattr(self, name)}")
        for name in ("val_windows", "val_batch_size", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.method not in METHODS or self.dtype not in DTYPES:
            raise ValueError(f"method must be one of {METHODS} and dtype one of {DTYPES}")
        if not (self.init in ("vocab", "random", "paper") or (self.init.startswith("text:") and len(self.init) > 5)):
            raise ValueError(f"init must be vocab, random, paper or text:<prompt>, got {self.init!r}")
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


@dataclass
class TrainResult:
    out: str
    artifact: str  # prompt.safetensors or adapter/ (best validation)
    steps_done: int
    best_step: int
    val_ppl_before: float
    best_val_ppl: float
    trainable_params: int
    tokens_per_s: float
    stopped_by: str | None = None  # None: finished; else "SIGTERM", "SIGINT" or "stop_after"


@dataclass
class _State:
    """Everything of a run that is not a tensor of the tuner/optimizer; stored in the checkpoint."""

    step: int = 0
    best_ppl: float = math.inf
    best_step: int = 0
    ppl_before: float = math.nan
    last_ppl: float | None = None
    train_seconds: float = 0.0
    tokens: int = 0


# ---------------------------------------------------------------- pieces (also used by bench/train_speed.py)


def build_tuner(model, tokenizer, cfg: TrainConfig):
    from ctp_eval import tuners

    if cfg.method == "lora":
        return tuners.LoraTuner(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                [t.strip() for t in cfg.lora_targets.split(",") if t.strip()], cfg.loss_chunk)
    return tuners.PromptTuner(model, tuners.init_prompt(model, tokenizer, cfg.init, cfg.k, cfg.seed), cfg.loss_chunk)


def make_optimizer(tuner, cfg: TrainConfig):
    import functools

    import torch

    from ctp_eval.trainutil import lr_factor

    opt = torch.optim.AdamW(tuner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps))
    return opt, sched


def train_step(tuner, optimizer, scheduler, ids, max_grad_norm: float, autocast=None, world: int = 1):
    """One optimizer step on ids (B, T). Returns (loss, grad_norm); leaves the weights untouched if either
    is not finite, so the caller still holds the last good prompt."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        loss = tuner.loss_backward(ids)
    params = tuner.parameters()
    if world > 1:  # data parallel: average gradients (and the loss, for logging) over ranks
        for p in params:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
        torch.distributed.all_reduce(loss)
        loss /= world
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    loss_v, norm_v = float(loss), float(norm)
    if math.isfinite(loss_v) and math.isfinite(norm_v):
        optimizer.step()
        scheduler.step()
    return loss_v, norm_v


# ---------------------------------------------------------------- run


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring for the outputs."""
    import torch

    from ctp_eval import data, ppl, trainutil

    dist = trainutil.distributed(cfg.device)
    out = Path(cfg.out)
    ckpt = _prepare_out(cfg, out, dist.rank)
    model, tokenizer, base_id, compression = _load_model(cfg, dist.device)
    limit = getattr(model.config, "max_position_embeddings", None)
    need = cfg.seqlen + (cfg.k if cfg.method == "prompt" else 0)
    if limit is not None and need > limit:
        raise TrainError(f"seqlen {cfg.seqlen} + k {cfg.k} = {need} exceeds the model's {limit} positions")
    wins = ppl.windows(data.token_stream(tokenizer, cfg.data, cfg.data_split, cfg.data_dir), cfg.seqlen)  # (N, T)
    global_batch = cfg.batch_size * dist.world
    if len(wins) < global_batch:
        raise TrainError(f"training data {data.corpus_source(cfg.data, cfg.data_split, cfg.data_dir)} holds {len(wins)} "
                         f"windows of {cfg.seqlen} tokens, fewer than one batch of {global_batch}; "
                         "use a smaller --seqlen/--batch-size or more data")
    torch.manual_seed(cfg.seed)  # global RNG: LoRA init and dropout
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuner = build_tuner(model, tokenizer, cfg)
    optimizer, scheduler = make_optimizer(tuner, cfg)
    autocast = (torch.autocast(dist.device.type, dtype=torch.bfloat16)
                if cfg.dtype == "bfloat16" and dist.device.type == "cuda" else None)
    meta = dict(base_model=base_id, compression=compression, init=cfg.init if cfg.method == "prompt" else "",
                train_data=data.corpus_source(cfg.data, cfg.data_split, cfg.data_dir), seed=cfg.seed, seqlen=cfg.seqlen,
                val_data=data.corpus_source(cfg.val_data, "validation", cfg.data_dir))
    extra = dict(method=cfg.method, k=cfg.k if cfg.method == "prompt" else None, lr=cfg.lr, batch_size=global_batch, steps_planned=cfg.steps,
                 val_windows=cfg.val_windows, dtype=cfg.dtype, trainable_params=sum(p.numel() for p in tuner.parameters()))

    def validate() -> float:
        with autocast or contextlib.nullcontext():
            return _val_ppl(tuner, tokenizer, cfg, dist)

    def write(kind: str, state: dict, st: _State) -> None:
        if dist.rank == 0:
            best = kind == "best"
            m = dict(meta, steps=st.best_step if best else st.step, val_ppl_before=st.ppl_before,
                     val_ppl_after=st.best_ppl if best else st.last_ppl, extra=dict(extra, kind=kind, best_step=st.best_step))
            _write_artifact(tuner, model, tokenizer, out, kind, state, m)

    log = trainutil.RunLog(out / "train_log.jsonl", dist.rank == 0)
    if ckpt is not None:
        tuner.load_state(ckpt["tuner"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        best_state = ckpt["best"]
        st = _State(**ckpt["run"])
        trainutil.set_rng_state(ckpt["rng"])
        log.truncate_after(st.step)
        logger.info("resumed at step %d of %d (best val ppl %.4f at step %d)", st.step, cfg.steps, st.best_ppl, st.best_step)
    else:
        st = _State()
        st.ppl_before = st.last_ppl = st.best_ppl = validate()
        best_state = tuner.state()
        log.write(step=0, val_ppl=st.ppl_before, best=True)
        write("best", best_state, st)
        logger.info("step 0: val ppl %.4f on %s", st.ppl_before, meta["val_data"])

    def save() -> None:
        write("last", tuner.state(), st)
        if dist.rank == 0:
            trainutil.save_checkpoint(out / "checkpoint", dict(
                tuner=tuner.state(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                best=best_state, run=dataclasses.asdict(st), rng=trainutil.rng_state(),
                data=dict(n_windows=len(wins), global_batch=global_batch, source=meta["train_data"])))

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=st.step, desc=f"ctp-train {cfg.method}", unit="step",
               disable=not cfg.progress or dist.rank != 0, dynamic_ncols=True)
    stopped_by, first_step = None, st.step
    model.train()  # dropout (LoRA's) on; HF gradient checkpointing only acts in train mode
    with trainutil.StopSignals() as stop, bar:
        while st.step < cfg.steps:
            signum = dist.agree(stop.signum)
            if signum is not None or (cfg.stop_after is not None and st.step - first_step >= cfg.stop_after):
                stopped_by = signal.Signals(signum).name if signum is not None else "stop_after"
                break
            rows = trainutil.batch_indices(len(wins), global_batch, cfg.seed, st.step)
            ids = wins[rows[dist.rank * cfg.batch_size : (dist.rank + 1) * cfg.batch_size]].to(dist.device)
            t0 = time.perf_counter()
            loss, norm = train_step(tuner, optimizer, scheduler, ids, cfg.max_grad_norm, autocast, dist.world)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                write("last", tuner.state(), st)
                raise TrainingDiverged(
                    f"step {st.step + 1}: loss {loss} / gradient norm {norm} is not finite; stopped. The last good "
                    f"state (step {st.step}) is in {out}/last.*, the best-validation one in {out}/"
                    f"{_artifact_name(cfg.method, 'best')}. Try a lower --lr or --dtype float32.")
            st.train_seconds += time.perf_counter() - t0
            st.step += 1
            st.tokens += global_batch * cfg.seqlen
            tok_s = st.tokens / max(st.train_seconds, 1e-9)
            log.write(step=st.step, loss=loss, grad_norm=norm, lr=scheduler.get_last_lr()[0], tok_s=round(tok_s, 2))
            if st.step % cfg.eval_every == 0 or st.step == cfg.steps:
                st.last_ppl = validate()
                # NaN never counts as better; anything finite beats an infinite (overflowed) best
                improved = math.isfinite(st.last_ppl) and not st.last_ppl >= st.best_ppl
                if improved:
                    st.best_ppl, st.best_step, best_state = st.last_ppl, st.step, tuner.state()
                    write("best", best_state, st)
                log.write(step=st.step, val_ppl=st.last_ppl, best=improved)
                model.train()
            if st.step % cfg.save_every == 0 or st.step == cfg.steps:
                save()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", val_ppl=f"{st.last_ppl:.3f}", best=f"{st.best_ppl:.3f}", tok_s=f"{tok_s:.0f}")
        if stopped_by is not None:
            logger.warning("stopping at step %d (%s); checkpoint written, continue with --resume", st.step, stopped_by)
            save()
    model.eval()
    return TrainResult(out=str(out), artifact=str(out / _artifact_name(cfg.method, "best")), steps_done=st.step,
                       best_step=st.best_step, val_ppl_before=st.ppl_before, best_val_ppl=st.best_ppl,
                       trainable_params=extra["trainable_params"],
                       tokens_per_s=st.tokens / st.train_seconds if st.train_seconds else 0.0, stopped_by=stopped_by)


# ---------------------------------------------------------------- helpers


def _artifact_name(method: str, kind: str) -> str:
    if method == "lora":
        return "adapter" if kind == "best" else "last_adapter"
    return "prompt.safetensors" if kind == "best" else "last.safetensors"


def _write_artifact(tuner, model, tokenizer, out: Path, kind: str, state: dict, meta: dict) -> None:
    path = out / _artifact_name(tuner.method, kind)
    if tuner.method == "lora":
        tuner.save_adapter(path, state)
        (path / "ctp_train.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        return
    from ctp_eval.prompt import SoftPrompt

    SoftPrompt.for_model(state["prompt"], model, tokenizer, **meta).save(path)


def _val_ppl(tuner, tokenizer, cfg: TrainConfig, dist) -> float:
    """Validation perplexity by the shared protocol (`ctp_eval.ppl`), split over ranks when data parallel."""
    import torch

    from ctp_eval import data, ppl

    batch = cfg.val_batch_size or cfg.batch_size
    if dist.world == 1:
        return ppl.perplexity(tuner.eval_model, tokenizer, cfg.val_data, "validation", cfg.seqlen, tuner.eval_prompt,
                              batch_size=batch, limit_windows=cfg.val_windows, data_dir=cfg.data_dir).ppl
    wins = ppl.windows(data.token_stream(tokenizer, cfg.val_data, "validation", cfg.data_dir), cfg.seqlen)
    wins = wins[: cfg.val_windows]
    lo, hi = ppl.shard_bounds(len(wins), dist.world, dist.rank)
    tuner.eval_model.eval()
    res = ppl.protocol_nll(ppl.model_logits_fn(tuner.eval_model, tuner.eval_prompt), wins[lo:hi], batch_size=batch)
    total = torch.tensor([res.nll_sum], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(total)
    return math.exp(total.item() / (len(wins) * (cfg.seqlen - 1)))


def _load_model(cfg: TrainConfig, device):
    import torch

    from ctp_eval import models

    path = models.resolve_pretrained(cfg.model)
    compression = cfg.compression
    if compression != "none":
        from ctp_eval.compress import ensure_compressed  # compresses once, then reads the on-disk cache

        path = str(ensure_compressed(path, compression))
    elif os.path.isdir(path):
        from ctp_eval.compress import read_compression_info

        info = read_compression_info(path)  # --model may itself be a compressed checkpoint folder
        compression = info.get("spec", "unknown") if info else "none"
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model, tokenizer = models.load_model_and_tokenizer(path, dtype=dtype, device=str(device))
    return model, tokenizer, models.model_id(cfg.model), compression


def _prepare_out(cfg: TrainConfig, out: Path, rank: int) -> dict | None:
    """Check/clean the output folder; return the checkpoint to resume from, if any."""
    from ctp_eval.trainutil import load_checkpoint

    ckpt_dir = out / "checkpoint"
    config_file = out / "config.json"
    mine = dataclasses.asdict(cfg)
    if cfg.overwrite and rank == 0:
        for name in ("checkpoint", "adapter", "last_adapter"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("prompt.safetensors", "last.safetensors", "train_log.jsonl", "config.json"):
            (out / name).unlink(missing_ok=True)
    if ckpt_dir.exists() and not cfg.resume and not cfg.overwrite:
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    ckpt = None
    if cfg.resume and (ckpt_dir / "state.safetensors").is_file():
        saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
        diff = sorted(k for k in mine if k not in RESUME_MAY_CHANGE and saved.get(k, mine[k]) != mine[k])
        if diff:
            raise TrainError("--resume with settings that differ from the checkpointed run: " +
                             ", ".join(f"{k}={mine[k]!r} (was {saved[k]!r})" for k in diff))
        ckpt = load_checkpoint(ckpt_dir)
    elif cfg.resume:
        logger.info("--resume: no checkpoint in %s yet, starting from scratch", out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        config_file.write_text(json.dumps(mine, indent=1, sort_keys=True))
    return ckpt


# ---------------------------------------------------------------- command line


def build_parser():
    import argparse

    from ctp_eval.configargs import add_dataclass_args

    parser = argparse.ArgumentParser(
        prog="ctp-train", description="Learn a soft prompt (or LoRA baseline) for a (compressed) causal LM.",
        epilog="Multi-GPU: accelerate launch --multi_gpu --num_processes N -m ctp_eval.train --out DIR ... "
               "(--batch-size is per process). Interrupt with Ctrl-C/SIGTERM and continue with --resume.")
    add_dataclass_args(parser, TrainConfig, required=("out",))
    return parser


def main(argv: list[str] | None = None) -> None:
    """CLI entry: parse, train, print a summary. Exits 2 on bad flags/data, 3 on divergence, 128+signal."""
    from ctp_eval.configargs import config_from_args
    from ctp_eval.data import DataUnavailableError
    from ctp_eval.prompt import PromptError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(TrainConfig, args)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = train(cfg)
    except TrainingDiverged as err:
        print(f"ctp-train: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    except (TrainError, DataUnavailableError, PromptError, FileNotFoundError) as err:
        print(f"ctp-train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) != 0:  # data parallel: one summary, from rank 0
        return
    print(f"val ppl {result.val_ppl_before:.4f} -> {result.best_val_ppl:.4f} (best at step {result.best_step}); "
          f"{result.steps_done} steps, {result.tokens_per_s:.1f} tok/s, {result.trainable_params} trainable params")
    print(f"best: {result.artifact}")
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        raise SystemExit(128 + int(signal.Signals[result.stopped_by]))


if __name__ == "__main__":
    main()

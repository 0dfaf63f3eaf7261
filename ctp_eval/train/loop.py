"""`ctp-train`: learn a soft prompt (or the LoRA baseline) that recovers a compressed model.

Settings and their (paper) defaults: `ctp_eval.train.config`. The objective (cross-entropy, distillation from
the uncompressed model, or both): `ctp_eval.train.losses` and `ctp_eval.train.teacher`. The model's weights are frozen:
only the prompt (or the LoRA matrices) requires grad, so no weight gradient is ever allocated. The best
checkpoint is selected on validation windows of `--val-seqlen` tokens (default 1024, the evaluation length),
independently of the training `--seqlen`.

Outputs in --out: prompt.safetensors (best validation; `ctp_eval.prompt` format with full metadata),
last.safetensors (latest), checkpoint/ (exact resume: see `ctp_eval.train.checkpoint`), train_log.jsonl, config.json.
With --method lora: adapter/ and last_adapter/ (PEFT folders) instead of the two prompt files.

Multi-GPU: `accelerate launch --multi_gpu --num_processes N -m ctp_eval.train ...` (or `torchrun
--nproc_per_node N -m ctp_eval.train ...`) runs N data-parallel ranks; rank r takes rows r*B..(r+1)*B-1 of
every global batch of N*B windows, the trainable gradients are averaged by all-reduce (no DDP wrapper: the
only trainable tensor is the prompt), and validation windows are split over the ranks. The result equals a
single process with batch N*B (tested with 2 gloo ranks on CPU). Only rank 0 writes files. Each rank seeds its
own RNG (derived from seed and rank, after the shared init), so LoRA dropout masks differ across ranks; the checkpoint holds
every rank's RNG state. `--resume` refuses a changed data layout (world size, global batch, token stream).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ctp_eval.train.config import RESUME_MAY_CHANGE, TrainConfig, TrainError, TrainingDiverged

logger = logging.getLogger(__name__)

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


def build_tuner(model, tokenizer, cfg: TrainConfig, train_windows=None):
    from ctp_eval.train import tuners

    if cfg.method == "lora":
        return tuners.LoraTuner(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                [t.strip() for t in cfg.lora_targets.split(",") if t.strip()], cfg.loss_chunk)
    from ctp_eval.prompt import init_prompt, layout_for

    init = init_prompt(model, tokenizer, cfg.init, cfg.k, cfg.seed, train_windows=train_windows)
    return tuners.PromptTuner(model, init, cfg.loss_chunk, tokenizer=tokenizer, layout=layout_for(tokenizer))


def make_optimizer(tuner, cfg: TrainConfig):
    import functools

    import torch

    from ctp_eval.train.schedule import lr_factor

    opt = torch.optim.AdamW(tuner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, schedule=cfg.lr_schedule))
    return opt, sched


def train_step(tuner, optimizer, scheduler, ids, max_grad_norm: float, autocast=None, world: int = 1,
               objective=None, teacher=None):
    """One optimizer step on ids (B, T). Returns (loss, grad_norm, {ce, kd}); leaves the weights untouched if
    either is not finite, so the caller still holds the last good prompt. `teacher`: its targets for ids."""
    import torch

    from ctp_eval.train.losses import Objective

    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        parts = tuner.loss_backward(ids, objective or Objective(), teacher)
    params = tuner.parameters()
    terms = torch.stack([parts["loss"], parts["ce"], parts["kd"]])
    if world > 1:  # data parallel: average gradients (and the loss terms, for logging) over ranks
        for p in params:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
        torch.distributed.all_reduce(terms)
        terms /= world
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    loss_v, ce_v, kd_v = terms.tolist()
    norm_v = float(norm)
    if math.isfinite(loss_v) and math.isfinite(norm_v):
        optimizer.step()
        scheduler.step()
    return loss_v, norm_v, {"ce": ce_v, "kd": kd_v}


# ---------------------------------------------------------------- run


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring for the outputs."""
    import torch

    from ctp_eval import data, signals
    from ctp_eval.eval import ppl
    from ctp_eval.train import checkpoint, distributed, runlog, schedule
    from ctp_eval.train import setup as trainsetup
    from ctp_eval.train.losses import Objective

    dist = distributed.distributed(cfg.device)
    out = Path(cfg.out)
    identity = trainsetup.target_identity(cfg)
    ckpt = _prepare_out(cfg, out, dist, identity)
    model, tokenizer, compression = trainsetup.load_model(cfg, dist.device)
    limit = getattr(model.config, "max_position_embeddings", None)
    from ctp_eval.prompt import layout_for

    prefix_len = (cfg.k + (layout_for(tokenizer) == "after-bos")) if cfg.method == "prompt" else 0  # + BOS
    need = max(cfg.seqlen, cfg.val_seqlen) + prefix_len
    if limit is not None and need > limit:
        raise TrainError(f"max(seqlen {cfg.seqlen}, val_seqlen {cfg.val_seqlen}) + prefix {prefix_len} = {need} "
                         f"exceeds the model's {limit} positions")
    wins = ppl.windows(data.token_stream(tokenizer, cfg.data, cfg.data_split, cfg.data_dir), cfg.seqlen)  # (N, T)
    global_batch = cfg.batch_size * dist.world
    if len(wins) < global_batch:
        raise TrainError(f"training data {data.corpus_source(cfg.data, cfg.data_split, cfg.data_dir)} holds {len(wins)} "
                         f"windows of {cfg.seqlen} tokens, fewer than one batch of {global_batch}; "
                         "use a smaller --seqlen/--batch-size or more data")
    layout = dict(world=dist.world, global_batch=global_batch, n_windows=len(wins),
                  source=data.corpus_source(cfg.data, cfg.data_split, cfg.data_dir),
                  stream_sha256=schedule.stream_hash(wins))
    if cfg.method == "prompt":  # where the prompt sits changes the objective: a resume must keep it
        from ctp_eval.prompt import layout_for

        layout["prompt_layout"] = layout_for(tokenizer)
    if ckpt is not None:
        _check_layout(ckpt.get("data", {}), layout)
    torch.manual_seed(cfg.seed)  # global RNG: LoRA init, identical on every rank
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuner = build_tuner(model, tokenizer, cfg, train_windows=wins)
    torch.manual_seed(cfg.seed * 1_000_003 + dist.rank)  # per rank from here on: dropout masks differ across ranks
    optimizer, scheduler = make_optimizer(tuner, cfg)
    objective = Objective(cfg.loss, cfg.kd_weight)
    if ckpt is not None:  # before loading the teacher: refusing costs nothing
        _check_teacher(ckpt, trainsetup.teacher_identity(cfg, identity, tokenizer) if objective.uses_teacher else None)
    teacher = trainsetup.load_teacher(cfg, identity, tokenizer, dist, wins) if objective.uses_teacher else None
    autocast = (torch.autocast(dist.device.type, dtype=torch.bfloat16)
                if cfg.dtype == "bfloat16" and dist.device.type == "cuda" else None)
    meta = dict(base_model=identity["base_model"], compression=compression, calibration=identity["calibration"],
                init=cfg.init if cfg.method == "prompt" else "", train_data=layout["source"], seed=cfg.seed,
                layout=layout.get("prompt_layout", "prompt-first"),
                seqlen=cfg.seqlen, val_seqlen=cfg.val_seqlen, loss=cfg.loss, lr=cfg.lr, lr_schedule=cfg.lr_schedule,
                val_data=data.corpus_source(cfg.val_data, "validation", cfg.data_dir))
    extra = dict(method=cfg.method, k=cfg.k if cfg.method == "prompt" else None, lr=cfg.lr, batch_size=global_batch,
                 steps_planned=cfg.steps, val_windows=cfg.val_windows, dtype=cfg.dtype, recipe=cfg.recipe(),
                 recipe_name=cfg.recipe_name,
                 teacher=teacher.identity if teacher else None, compression_build=identity.get("build", ""),
                 trainable_params=sum(p.numel() for p in tuner.parameters()))
    quantization = trainsetup.external_details(model, compression)  # a checkpoint another tool quantized
    if quantization is not None:
        extra["checkpoint_quantization"] = quantization

    def validate() -> float:
        with autocast or contextlib.nullcontext():
            return _val_ppl(tuner, tokenizer, cfg, dist)

    def write(kind: str, state: dict, st: _State) -> None:
        if dist.rank == 0:
            best = kind == "best"
            m = dict(meta, steps=st.best_step if best else st.step, val_ppl_before=st.ppl_before,
                     val_ppl_after=st.best_ppl if best else st.last_ppl, extra=dict(extra, kind=kind, best_step=st.best_step))
            _write_artifact(tuner, model, tokenizer, out, kind, state, m)

    log = runlog.RunLog(out / "train_log.jsonl", dist.rank == 0)
    if ckpt is not None:
        tuner.load_state(ckpt["tuner"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        best_state = ckpt["best"]
        st = _State(**ckpt["run"])
        rng = ckpt["rng"]  # one state per rank (a list), or a single state from an older checkpoint
        checkpoint.set_rng_state(rng[dist.rank] if isinstance(rng, list) else rng)
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
        rngs = dist.gather_objects(checkpoint.rng_state())  # collective: every rank takes part
        if dist.rank == 0:
            checkpoint.save_checkpoint(out / "checkpoint", dict(
                tuner=tuner.state(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                best=best_state, run=dataclasses.asdict(st), rng=rngs, data=layout, model_identity=identity,
                teacher_identity=teacher.identity if teacher else None))

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=st.step, desc=f"ctp-train {cfg.method}", unit="step",
               disable=not cfg.progress or dist.rank != 0, dynamic_ncols=True)
    stopped_by, first_step = None, st.step
    model.train()  # dropout (LoRA's) on; HF gradient checkpointing only acts in train mode
    with signals.StopSignals() as stop, bar:
        while st.step < cfg.steps:
            signum = dist.agree(stop.signum)
            if signum is not None or (cfg.stop_after is not None and st.step - first_step >= cfg.stop_after):
                stopped_by = signal.Signals(signum).name if signum is not None else "stop_after"
                break
            rows = schedule.batch_indices(len(wins), global_batch, cfg.seed, st.step)
            mine = rows[dist.rank * cfg.batch_size : (dist.rank + 1) * cfg.batch_size]
            ids = wins[mine].to(dist.device)
            t0 = time.perf_counter()
            with autocast or contextlib.nullcontext():
                targets = teacher.targets(ids, mine) if teacher is not None else None
            loss, norm, parts = train_step(tuner, optimizer, scheduler, ids, cfg.max_grad_norm, autocast, dist.world,
                                           objective, targets)
            del targets
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
            log.write(step=st.step, loss=loss, **(parts if teacher is not None else {}), grad_norm=norm,
                      lr=scheduler.get_last_lr()[0], tok_s=round(tok_s, 2))
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
    """Validation perplexity by the shared protocol (`ctp_eval.eval.ppl`) on `val_seqlen`-token windows, split over
    ranks when data parallel."""
    import torch

    from ctp_eval import data
    from ctp_eval.eval import ppl

    batch = cfg.val_batch_size or cfg.batch_size
    if dist.world == 1:
        return ppl.perplexity(tuner.eval_model, tokenizer, cfg.val_data, "validation", cfg.val_seqlen,
                              tuner.eval_prompt, batch_size=batch, limit_windows=cfg.val_windows,
                              data_dir=cfg.data_dir).ppl
    wins = ppl.windows(data.token_stream(tokenizer, cfg.val_data, "validation", cfg.data_dir), cfg.val_seqlen)
    wins = wins[: cfg.val_windows]
    lo, hi = ppl.shard_bounds(len(wins), dist.world, dist.rank)
    tuner.eval_model.eval()
    lead = ppl.window_lead(tokenizer) if tuner.eval_prompt is None else []  # LoRA: no prefix, BOS as in perplexity()
    res = ppl.protocol_nll(ppl.model_logits_fn(tuner.eval_model, tuner.eval_prompt, lead), wins[lo:hi],
                           batch_size=batch)
    total = torch.tensor([res.nll_sum], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(total)
    return math.exp(total.item() / (len(wins) * (cfg.val_seqlen - 1)))


def _check_layout(saved: dict, now: dict) -> None:
    """--resume continues the same data order only with the same world size, global batch and token stream."""
    saved = {"prompt_layout": "prompt-first", **saved} if "prompt_layout" in now else saved  # before layouts
    diff = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    if diff:
        raise TrainError("--resume with a different data layout than the checkpointed run (" + "; ".join(diff) +
                         "): the same step would read other windows. Start a new --out, or restore the settings")


def _check_teacher(ckpt: dict, now: dict | None) -> None:
    """--resume keeps the distillation objective: the same teacher by identity (name, dtype, tokenizer), wherever
    its folder now lives (`teacher` may change in config.json: RESUME_MAY_CHANGE). Checkpoints written before
    teacher identities were stored resume unchecked."""
    was = ckpt.get("teacher_identity", now)
    if was != now:
        raise TrainError(f"--resume with another teacher than the checkpointed run: {now} (was {was}); the "
                         "objective would change mid-run. Pass the original --teacher, or start a new --out")


def _prepare_out(cfg: TrainConfig, out: Path, dist, identity: dict) -> dict | None:
    """Check/clean the output folder; return the checkpoint to resume from, if any. Every rank reads config.json
    before rank 0 rewrites it (atomically), and a barrier keeps the ranks in step. `identity`: what the model is
    (`trainsetup.target_identity`); a resume must be on the same one, wherever its folder now lives."""
    from ctp_eval.train.checkpoint import load_checkpoint

    ckpt_dir = out / "checkpoint"
    config_file = out / "config.json"
    mine = dataclasses.asdict(cfg)
    if cfg.overwrite and dist.rank == 0:
        for name in ("checkpoint", "adapter", "last_adapter"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("prompt.safetensors", "last.safetensors", "train_log.jsonl", "config.json"):
            (out / name).unlink(missing_ok=True)
    dist.barrier()
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
        was = ckpt.get("model_identity", identity)  # model compared by identity, not path (RESUME_MAY_CHANGE)
        if was != identity:
            raise TrainError(f"--resume on another model than the checkpointed run: {identity} (was {was})")
    elif cfg.resume:
        logger.info("--resume: no checkpoint in %s yet, starting from scratch", out)
    dist.barrier()  # everyone has read config.json
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        from ctp_eval import files

        files.write_text(config_file, json.dumps(mine, indent=1, sort_keys=True))
    dist.barrier()
    return ckpt

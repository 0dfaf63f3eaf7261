"""`ctp-bench`: the whole study for one model, end to end and resumable.

For each compression spec: compress (cached) -> evaluate without prompt and with the paper's hard prompt ->
train a soft prompt on C4 (`ctp-train`, resumable) -> evaluate with it; then the leaderboard. Every step is a
subprocess of the project's own commands (`lm_eval --model ctp`, `ctp-train`), so the results JSON files are
exactly what a user would get, and a finished step (its results JSON / finished prompt exists) is skipped on
the next call. Ctrl-C or SIGTERM is passed on to the step in flight and ctp-bench stops after it: ctp-train
checkpoints after its current step (and resumes from there), an interrupted evaluation is redone.
After the spec loop, --transfer-from A,B evaluates the learned prompts of A and B on every other spec (PPL tasks
only: the transfer matrix). --train-data/--train-split train on another corpus (the data-transfer table) and
--k sets the prompt length (the ablation); both go into the run and prompt names (see BenchConfig.prompt_tag).
--checkpoints takes models other tools quantized: each gets the same no-prompt / learned-prompt rows as a spec.

Layout under --out: train/<spec>-<tag>/ (ctp-train output, resumable; --train-dir), prompts/<spec>-<tag>.safetensors
(finished prompts; --prompts-dir), results/<run>-{ppl,mc}/ (lm-eval output, one folder per evaluation; --results-dir),
commands.log (every command run, with exit code and wall time). Compressed models go to the ctp cache.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ctp_eval import files, presets
from ctp_eval.files import slug  # noqa: F401  (part of this module's API: run and prompt names)
from ctp_eval.signals import SignalScope

logger = logging.getLogger(__name__)

PPL_TASKS = ",".join(presets.PPL_TASKS)
MC_TASKS = ",".join(presets.MC_TASKS)
PAPER_SPECS = ",".join(presets.PAPER_SPECS)

def _m(help_text: str) -> dict:
    return {"help": help_text}


@dataclass
class BenchConfig:
    out: str = field(default="runs/bench", metadata=_m("work folder (resumable): prompts/, results/, commands.log"))
    model: str | None = field(default=None, metadata=_m("HF id or folder; default: embedded SmolLM2-135M"))
    specs: str = field(default=PAPER_SPECS, metadata=_m("comma-separated compression specs (dense is always run)"))
    ppl_tasks: str = field(default=PPL_TASKS, metadata=_m("perplexity tasks, evaluated in full unless --ppl-limit"))
    mc_tasks: str = field(default=MC_TASKS, metadata=_m("multiple-choice tasks ('' to skip)"))
    ppl_limit: float | None = field(default=None, metadata=_m("lm-eval --limit for the PPL tasks (shards of 10)"))
    mc_limit: float | None = field(default=200, metadata=_m("lm-eval --limit for MC tasks on non-dense rows"))
    dense_mc_limit: float | None = field(default=None, metadata=_m("lm-eval --limit for MC tasks on the dense row"))
    mc_task_limits: str = field(default="", metadata=_m(
        "per-task --limit overriding the two above, e.g. 'ctp_hellaswag=1000,ctp_piqa=none' (none: every document); "
        "tasks with different limits run as separate lm-eval calls"))
    standard_ppl: bool = field(default=True, metadata=_m(
        "also compute lm-eval's standard word/byte perplexity on the PPL tasks (a second pass over the data: "
        "--no-standard-ppl halves their cost; the leaderboard shows token PPL only)"))
    hard_prompt: bool = field(default=True, metadata=_m("also evaluate the paper's hard prompt"))
    k: int = field(default=100, metadata=_m("soft prompt length (run again with another --k for the length ablation)"))
    train_data: str = field(default="c4", metadata=_m("ctp-train --data (the paper: c4)"))
    train_split: str = field(default="train", metadata=_m(
        "ctp-train --data-split; offline WikiText-2 has no train split: --train-data wikitext2 --train-split validation"))
    checkpoints: str = field(default="", metadata=_m(
        "comma-separated folders (or hub ids) of models other tools quantized (llm-compressor, bitsandbytes, "
        "GPTQModel, torchao; docs/external-checkpoints.md): each is evaluated as it is, gets a prompt trained on it, "
        "and is evaluated with that prompt, beside the specs. Name each folder after its model: results and "
        "prompts are named after it"))
    transfer_from: str = field(default="", metadata=_m(
        "comma-separated specs whose learned prompts (this --k and training data) are also evaluated on every "
        "other spec of --specs, PPL tasks only (the transfer matrix)"))
    steps: int = field(default=200, metadata=_m("ctp-train steps per spec"))
    batch_size: int = field(default=4, metadata=_m("ctp-train batch"))
    seqlen: int = field(default=512, metadata=_m("ctp-train window length"))
    eval_every: int = field(default=50, metadata=_m("ctp-train validation interval"))
    val_windows: int = field(default=8, metadata=_m("ctp-train validation windows"))
    val_seqlen: int = field(default=1024, metadata=_m("ctp-train validation window length (the evaluation length)"))
    recipe: str = field(default="", metadata=_m(
        "name of the training recipe below, required when any of its flags differs from the paper's; it goes into "
        "the prompt and run names and the leaderboard (names starting with 'study-' appear only in its recipe study)"))
    lr: float | None = field(default=None, metadata=_m("ctp-train --lr (default: the paper's 1e-3)"))
    lr_schedule: str = field(default="linear", metadata=_m("ctp-train --lr-schedule"))
    warmup_steps: int | None = field(default=None, metadata=_m("ctp-train --warmup-steps (default min(500, steps/10))"))
    init: str = field(default="vocab", metadata=_m(
        "ctp-train --init (file:PATH warm-starts from a prompt, e.g. to continue a finished run for more steps)"))
    seed: int = field(default=0, metadata=_m(
        "ctp-train --seed (init and data order; a warm-started continuation with another seed reads its epoch of "
        "the training data in another order)"))
    loss: str = field(default="ce", metadata=_m("ctp-train --loss: ce, kd (distill the dense model) or ce+kd"))
    kd_weight: float = field(default=0.5, metadata=_m("ctp-train --kd-weight (ce+kd)"))
    teacher_topk: int = field(default=0, metadata=_m(
        "K > 0: cache the dense teacher's top-K log-probs per training window under OUT/teacher and reuse them "
        "across specs (ctp-train --teacher-cache); 0: full-vocabulary teacher on the fly"))
    train_dtype: str | None = field(default=None, metadata=_m(
        "ctp-train --dtype (default: --dtype); bfloat16 halves the weights in memory (faster on GPUs and AVX512-BF16 CPUs; measured 4-5x slower on this AVX2-only CPU) while evaluation stays in --dtype"))
    calib_nsamples: int = field(default=128, metadata=_m("calibration sequences for compression"))
    calib_seqlen: int = field(default=2048, metadata=_m("calibration sequence length"))
    dtype: str = field(default="float32", metadata=_m(
        "evaluation/training dtype, also the dtype models are compressed and cached in (bfloat16 for a 7B model)"))
    compress_device: str = field(default="auto", metadata=_m(
        "where compression solves each block (auto: cuda if available, else cpu); the model stays on the host"))
    eval_batch_size: int = field(default=4, metadata=_m("lm-eval batch size"))
    mc_dtype: str | None = field(default=None, metadata=_m(
        "dtype of the multiple-choice evaluations (default: --dtype); another one scores the same --dtype "
        "compression builds (lm-eval compress_dtype=), e.g. bfloat16 on a GPU for a large MC pass"))
    mc_batch_size: int | None = field(default=None, metadata=_m("lm-eval batch size of the MC tasks (default: --eval-batch-size)"))
    max_length: int | None = field(default=None, metadata=_m(
        "lm-eval max_length model arg (model window incl. prompt); >= 1024 + k for the PPL tasks. Smaller windows "
        "make lm-eval's standard word/byte perplexity (long rolling windows) much cheaper on CPU"))
    leaderboard: str | None = field(default=None, metadata=_m("markdown file to write (default OUT/leaderboard.md)"))
    notes_file: str | None = field(default=None, metadata=_m("markdown paragraph for the leaderboard header (budget, caveats)"))
    prompts_dir: str | None = field(default=None, metadata=_m("where finished prompts are published (default OUT/prompts)"))
    results_dir: str | None = field(default=None, metadata=_m("where lm-eval results go (default OUT/results)"))
    train_dir: str | None = field(default=None, metadata=_m(
        "where ctp-train runs live (default OUT/train); a k=100 SmolLM2 prompt run is 1.4 MB (prompts, "
        "checkpoint, log), so a committed folder lets a long training resume on another machine"))
    quick: bool = field(default=False, metadata=_m("tiny budget (~14 min on 2 CPU cores): one spec, no hard prompt, 1/10 of WikiText-2, PIQA x20"))
    dry_run: bool = field(default=False, metadata=_m("print the commands without running them"))

    def __post_init__(self):
        if self.quick:
            self.specs, self.ppl_tasks, self.mc_tasks = "gptq:w3g128", "ctp_wikitext2", "ctp_piqa"
            self.ppl_limit, self.mc_limit, self.dense_mc_limit = 1, 20, 20
            # validation only before and after training, and no hard-prompt rows: keeps the demo short (822 s, README)
            self.steps, self.batch_size, self.seqlen, self.eval_every, self.val_windows = 30, 2, 256, 30, 4
            self.hard_prompt = False
            self.calib_nsamples, self.calib_seqlen, self.max_length = 16, 512, 1124
            self.standard_ppl = False
            self.val_seqlen = 1024
            for name, value in presets.QUICK_RECIPE.items():
                setattr(self, name, value)
        from ctp_eval.compress import parse_spec
        from ctp_eval.data import TRAIN_SPLITS

        def spec_list(text: str) -> list[str]:  # comma-separated specs, each in canonical form
            return [str(parse_spec(s.strip())) for s in text.split(",") if s.strip()]

        self.spec_list = spec_list(self.specs)
        self.mc_limit_overrides = {}
        for item in (x.strip() for x in self.mc_task_limits.split(",") if x.strip()):
            task, _, value = item.partition("=")
            if task not in self.mc_tasks.split(",") or not value:
                raise ValueError(f"--mc-task-limits {item!r}: use TASK=LIMIT (or TASK=none) for a task of --mc-tasks")
            self.mc_limit_overrides[task] = None if value.lower() == "none" else float(value)
        self.transfer_list = spec_list(self.transfer_from)
        self.checkpoint_list = [c.strip().rstrip("/") for c in self.checkpoints.split(",") if c.strip()]
        names = [checkpoint_name(c) for c in self.checkpoint_list]
        if len(set(names)) < len(names):
            raise ValueError(f"--checkpoints {self.checkpoints!r}: two checkpoints share a name ({names}); their "
                             "results and prompts would collide: rename a folder")
        if self.train_split not in TRAIN_SPLITS:
            raise ValueError(f"--train-split must be one of {TRAIN_SPLITS}, got {self.train_split!r}")
        changed = [f"--{f.replace('_', '-')}" for f, paper in presets.PAPER_RECIPE.items() if getattr(self, f) != paper]
        if changed and not self.recipe:
            raise ValueError(f"{', '.join(changed)} differ from the paper's recipe: name the recipe with --recipe NAME "
                             "(it keeps its prompts and results apart from the paper-recipe ones)")
        if self.recipe and slug(self.recipe) != self.recipe:
            raise ValueError(f"--recipe {self.recipe!r}: use lowercase letters, digits and dashes")
        self.train_dtype = self.train_dtype or self.dtype
        self.mc_dtype = self.mc_dtype or self.dtype
        self.mc_batch_size = self.mc_batch_size or self.eval_batch_size

    @property
    def prompt_tag(self) -> str:
        """Names a learned prompt's run: k, plus the training data where it is not the paper's C4 train."""
        data = "" if (self.train_data, self.train_split) == ("c4", "train") else f"-{slug(self.train_data)}-{self.train_split}"
        return f"k{self.k}{data}" + (f"-{self.recipe}" if self.recipe else "")


def checkpoint_name(checkpoint: str) -> str:
    """Run and prompt name of another tool's checkpoint: its folder's (or hub id's) last part, slugged."""
    return slug(Path(checkpoint).name or checkpoint)


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


class _ForwardSignals(SignalScope):
    """While a step runs: hand every SIGINT/SIGTERM on to it and remember the first."""

    def __init__(self, proc: subprocess.Popen):
        super().__init__()
        self.proc = proc

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if self.proc.poll() is None:
            self.proc.send_signal(signum)


class Runner:
    def __init__(self, cfg: BenchConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prompts = Path(cfg.prompts_dir or self.out / "prompts")
        self.results = Path(cfg.results_dir or self.out / "results")
        self.train_root = Path(cfg.train_dir or self.out / "train")

    def run(self, cmd: list[str], what: str) -> None:
        line = shlex.join(cmd)
        print(f"[ctp-bench] {what}\n  $ {line}", flush=True)
        if self.cfg.dry_run:
            return
        t0 = time.time()
        # The step runs in its own session and we pass each SIGINT/SIGTERM on to it, so it is stopped the way it
        # expects (ctp-train checkpoints after its current step, a second signal stops it at once). Without this,
        # `kill` on ctp-bench orphaned a still-running child, and Ctrl-C let subprocess.run SIGKILL it 0.25 s later.
        proc = subprocess.Popen(cmd, start_new_session=True)
        with _ForwardSignals(proc) as received:
            rc = proc.wait()
        wall = time.time() - t0
        with open(self.out / "commands.log", "a") as f:
            f.write(json.dumps({"what": what, "cmd": line, "rc": rc, "wall_s": round(wall, 1),
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        if received.signum is not None:
            print(f"ctp-bench: stopped by {signal.Signals(received.signum).name} during {what}; rerun to resume",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + received.signum)
        if rc != 0:
            raise SystemExit(f"ctp-bench: step failed ({what}, exit {rc}); rerun to resume")

    # ----- steps -------------------------------------------------------------------------------------------
    def compressed(self, spec: str) -> str:
        """Compress once into OUT/compressed/<slug> (a normal HF folder); later evals load it directly."""
        from ctp_eval.compress import CalibConfig, ensure_compressed

        cfg = self.cfg
        if spec == "none":
            from ctp_eval.models import resolve_pretrained

            return resolve_pretrained(cfg.model)
        print(f"[ctp-bench] compress {spec} (cached)", flush=True)
        if cfg.dry_run:
            return f"<compressed {spec}>"
        calib = CalibConfig(nsamples=cfg.calib_nsamples, seqlen=cfg.calib_seqlen)
        # The default cache, so that `lm_eval --model ctp --model_args compression=SPEC,calib_...,dtype=D` finds it:
        # the dtype is part of the cache key, the device is not.
        return ensure_compressed(cfg.model, spec, calib=calib, device=cfg.compress_device, dtype=cfg.dtype)

    def run_name(self, spec: str, path: str) -> str:
        """Results folder stem of a spec's runs: the spec and its build, so a rebuilt compressed model gets
        its own no-prompt baseline instead of reusing another build's results."""
        from ctp_eval.compress.io import build_id

        build = build_id(path) if not self.cfg.dry_run and spec != "none" else ""
        return f"{slug(spec)}-{build}" if build else slug(spec)

    def model_args(self, spec: str) -> str:
        """model_args a user can paste anywhere: the spec and calibration, not a machine-local path."""
        cfg = self.cfg
        args = [f"pretrained={cfg.model}"] if cfg.model else []
        if spec != "none":
            args += [f"compression={spec}", f"calib_nsamples={cfg.calib_nsamples}", f"calib_seqlen={cfg.calib_seqlen}"]
        return ",".join(args)

    def evaluate(self, name: str, model_args: str, dense: bool, mc: bool = True) -> None:
        cfg = self.cfg
        groups = [("ppl", cfg.ppl_tasks, cfg.ppl_limit)] + (self.mc_groups(dense) if mc else [])
        for part, tasks, limit in groups:
            if not tasks:
                continue
            dest = self.results / f"{name}-{part}"
            if any(dest.rglob("results_*.json")):
                print(f"[ctp-bench] skip eval {name} {part}: results exist", flush=True)
                continue
            dtype, batch = (cfg.dtype, cfg.eval_batch_size) if part == "ppl" else (cfg.mc_dtype, cfg.mc_batch_size)
            extra = f"dtype={dtype}" + (f",max_length={cfg.max_length}" if cfg.max_length else "")
            if dtype != cfg.dtype and "compression=" in model_args:  # score the build the PPL rows and prompts used
                extra += f",compress_dtype={cfg.dtype}"
            full_args = ",".join(a for a in (model_args, extra) if a)
            cmd = [_bin("lm_eval"), "--model", "ctp", "--model_args", full_args,
                   "--tasks", tasks, "--batch_size", str(batch), "--output_path", str(dest)]
            if limit is not None:
                cmd += ["--limit", f"{limit:g}"]
            if part == "ppl" and not cfg.standard_ppl:
                cmd += ["--metadata", json.dumps({"ppl_standard": False})]
            self.run(cmd, f"evaluate {name} ({part})")

    def mc_groups(self, dense: bool) -> list[tuple[str, str, float | None]]:
        """(results part, tasks, limit) per distinct MC limit; one group named "mc" unless --mc-task-limits splits them."""
        cfg = self.cfg
        default = cfg.dense_mc_limit if dense else cfg.mc_limit
        limits = {t: default for t in cfg.mc_tasks.split(",") if t}
        limits.update(cfg.mc_limit_overrides)
        by_limit: dict = {}
        for task, limit in limits.items():
            by_limit.setdefault(limit, []).append(task)
        if len(by_limit) == 1 and not cfg.mc_limit_overrides:
            return [("mc", ",".join(limits), default)] if limits else []
        return [(f"mc-{'all' if lim is None else f'limit{lim:g}'}", ",".join(tasks), lim) for lim, tasks in by_limit.items()]

    def published(self, spec: str) -> Path:
        return self.prompts / f"{slug(spec)}-{self.cfg.prompt_tag}.safetensors"

    def train(self, spec: str, path: str) -> Path:
        cfg = self.cfg
        out = self.train_root / f"{slug(spec)}-{cfg.prompt_tag}"
        published = self.published(spec)
        if published.exists():
            print(f"[ctp-bench] skip training {spec}: {published} exists", flush=True)
            return published
        cmd = [_bin("ctp-train"), "--out", str(out), "--model", path, "--k", str(cfg.k), "--steps", str(cfg.steps),
               "--batch-size", str(cfg.batch_size), "--seqlen", str(cfg.seqlen), "--eval-every", str(cfg.eval_every),
               "--save-every", str(cfg.eval_every), "--val-windows", str(cfg.val_windows),
               "--val-seqlen", str(cfg.val_seqlen), "--dtype", cfg.train_dtype, "--data", cfg.train_data,
               "--data-split", cfg.train_split, "--init", cfg.init, "--lr-schedule", cfg.lr_schedule, "--loss", cfg.loss,
               "--seed", str(cfg.seed)]
        for flag, value in (("--lr", cfg.lr), ("--warmup-steps", cfg.warmup_steps)):
            if value is not None:
                cmd += [flag, f"{value:g}"]
        if cfg.loss != "ce":
            cmd += ["--kd-weight", f"{cfg.kd_weight:g}"] if cfg.loss == "ce+kd" else []
            if cfg.teacher_topk:
                cache = self.out / "teacher" / f"{slug(cfg.train_data)}-{cfg.train_split}-s{cfg.seqlen}-top{cfg.teacher_topk}"
                cmd += ["--teacher-topk", str(cfg.teacher_topk), "--teacher-cache", str(cache)]
        cmd += ["--recipe-name", cfg.recipe or "paper", "--resume"]
        self.run(cmd, f"train prompt on {spec}")
        if not cfg.dry_run:  # publish the best-validation prompt only once training has finished
            import shutil

            with files.atomic_path(published) as tmp:
                shutil.copyfile(out / "prompt.safetensors", tmp)
        return published

    def all(self) -> Path | None:
        cfg = self.cfg
        self.evaluate("dense", self.model_args("none"), dense=True)
        for spec in cfg.spec_list:
            path = self.compressed(spec)
            args = self.model_args(spec)
            name = self.run_name(spec, path)
            self.evaluate(f"{name}-none", args, dense=False)
            if cfg.hard_prompt:
                self.evaluate(f"{name}-hard", f"{args},hard_prompt=paper", dense=False)
            prompt = self.train(spec, path)
            self.evaluate(f"{name}-learned-{cfg.prompt_tag}", f"{args},prompt={prompt}", dense=False)
        for checkpoint in cfg.checkpoint_list:  # another tool's quantization: no compression step of ours
            name, args = checkpoint_name(checkpoint), f"pretrained={checkpoint}"
            self.evaluate(f"{name}-none", args, dense=False)
            if cfg.hard_prompt:
                self.evaluate(f"{name}-hard", f"{args},hard_prompt=paper", dense=False)
            prompt = self.train(name, checkpoint)
            self.evaluate(f"{name}-learned-{cfg.prompt_tag}", f"{args},prompt={prompt}", dense=False)
        for source in cfg.transfer_list:  # after the loop: every source prompt has been trained by now
            prompt = self.published(source)
            if not prompt.exists() and not cfg.dry_run:
                raise SystemExit(f"ctp-bench: --transfer-from {source}: no learned prompt at {prompt}; "
                                 "add the spec to --specs so that it is trained first")
            for target in (t for t in cfg.spec_list if t != source):
                self.evaluate(f"{self.run_name(target, self.compressed(target))}-prompt-{slug(source)}-{cfg.prompt_tag}",
                              f"{self.model_args(target)},prompt={prompt}", dense=False, mc=False)
        if cfg.dry_run:
            return None
        from ctp_eval.study.leaderboard import write_leaderboard

        md = Path(cfg.leaderboard or self.out / "leaderboard.md")
        return write_leaderboard([self.results], md, notes_file=cfg.notes_file)

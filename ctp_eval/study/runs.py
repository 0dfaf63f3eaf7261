"""The evaluated configurations behind a leaderboard: lm-eval results JSON of `--model ctp` runs, read and merged.

A run's configuration comes from what `ctp` records under `config` (`ctp_compression`, `ctp_prompt_k`,
`ctp_prompt_trained_on`, `ctp_prompt_recipe`, ...), never from file names, so tables and plots
(`ctp_eval.study.leaderboard`, `ctp_eval.study.plots`) depend only on the results files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval.utils import simple_parse_args_string

from ctp_eval.presets import CASE_STUDY_TASK, MC_TASKS, PPL_TASKS  # noqa: F401  (read by the leaderboard through here)

KIND_ORDER = {"dense": 0, "none": 1, "hard": 2, "learned": 3, "lora": 4}
KIND_LABEL = {"dense": "dense", "none": "no prompt", "hard": "hard prompt", "learned": "learned prompt", "lora": "LoRA"}


@dataclass(frozen=True)
class MCScore:
    """A multiple-choice result on one subset of a task's documents."""

    acc_norm: float
    stderr: float | None = None
    docs: int | None = None  # documents scored (lm-eval's n-samples "effective")
    total: int | None = None  # documents in the task ("original")
    dtype: str | None = None  # the evaluation's dtype= model arg (None: not given, the checkpoint's own)


@dataclass
class Run:
    """One evaluated configuration (several results files of the same configuration are merged)."""

    model: str
    compression: str
    kind: str  # dense | none | hard | learned | lora
    k: int = 0
    trained_on: str = ""  # compression the prompt / adapter was trained on
    train_data: str = ""  # corpus name (c4, wikitext2, ...): what the tables group by
    train_source: str = ""  # the exact training data (split and slice), shown in the data-transfer table
    trainable_params: int = 0
    build: str = ""  # fingerprint of the compressed model's build ("" = dense or an earlier, unrecorded build)
    recipe: str = ""  # learned prompts: the training recipe's name ("paper" for the paper's, "study-..." cells)
    recipe_args: dict = field(default_factory=dict)  # its settings (loss, lr, seqlen, batch_size, steps, ...)
    values: dict[str, float] = field(default_factory=dict)  # ppl task -> token PPL
    # MC results by (task, --limit): the same configuration may be scored on 100 documents and on all of them,
    # and the tables must never mix subsets in one column.
    mc: dict[tuple[str, float | None], MCScore] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # ppl task -> data source name
    limits: dict[str, float | None] = field(default_factory=dict)  # ppl task -> --limit used
    files: list[dict] = field(default_factory=list)  # per results file: command, date, hardware, wall time
    answers: dict[str, str] = field(default_factory=dict)  # case-study question -> the greedy answer
    checkpoint: dict = field(default_factory=dict)  # another tool's checkpoint: its quantization record (external.py)

    @property
    def key(self) -> tuple:
        return (self.model, self.compression, self.build, self.kind, self.k, self.trained_on, self.train_data, self.recipe)

    @property
    def in_study(self) -> bool:
        """A cell of the recipe study: shown in that table only, not in the main table, transfers or plots."""
        return self.recipe.startswith("study-")


# ----- reading ---------------------------------------------------------------------------------------------
def find_results(paths: list[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(p.rglob("results_*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no results file or folder at {p}")
    return sorted(set(files))


def _kind(cfg: dict) -> str:
    compression = cfg.get("ctp_compression", "none")
    if cfg.get("ctp_peft"):
        return "lora"
    if cfg.get("ctp_prompt"):
        return "learned"
    if cfg.get("ctp_hard_prompt"):
        return "hard"
    return "dense" if compression == "none" else "none"


def _short_data(name: str) -> str:
    return (name or "").split("-")[0].split("[")[0] or "?"


def read_run(path: Path, root: Path | None = None) -> Run:
    res = json.loads(path.read_text())
    cfg = res.get("config", {})
    if cfg.get("model") not in ("ctp", "ctp-vllm"):
        raise ValueError(f"{path}: not a `--model ctp` result (model={cfg.get('model')!r})")
    kind = _kind(cfg)
    compression = cfg.get("ctp_compression", "none")
    run = Run(
        model=cfg.get("ctp_base_model", res.get("model_name", "?")),
        compression=compression,
        kind=kind,
        k=int(cfg.get("ctp_prompt_k") or 0),
        trained_on=(cfg.get("ctp_prompt_trained_on") or compression) if kind in ("learned", "lora") else "",
        train_data=_short_data(cfg.get("ctp_prompt_train_data", "")) if kind in ("learned", "lora") else "",
        train_source=cfg.get("ctp_prompt_train_data", "") if kind in ("learned", "lora") else "",
        trainable_params=int(cfg.get("ctp_trainable_params") or 0),
        build=cfg.get("ctp_compression_build") or "",
        recipe=(cfg.get("ctp_prompt_recipe") or "paper") if kind in ("learned", "lora") else "",
        recipe_args=cfg.get("ctp_prompt_recipe_args") or {},
        checkpoint=cfg.get("ctp_checkpoint_quantization") or {},
    )
    tasks = sorted(res.get("results", {}))
    limit = cfg.get("limit")
    model_args = cfg.get("model_args", "")
    if isinstance(model_args, dict):  # lm-eval's Python API records the dict it was given
        args, model_args = model_args, ",".join(f"{k}={v}" for k, v in model_args.items())
    else:
        args = simple_parse_args_string(model_args)
    dtype = args.get("dtype")
    for task in tasks:
        r = res["results"][task]
        if task in PPL_TASKS and "token_perplexity,none" in r:
            run.values[task] = float(r["token_perplexity,none"])
            meta = (res.get("configs", {}).get(task, {}) or {}).get("metadata", {}) or {}
            run.sources[task] = str(meta.get("source") or r.get("alias", task))
            run.limits[task] = limit
        elif task == CASE_STUDY_TASK:
            run.answers.update(read_answers(path, task))
        elif task in MC_TASKS and "acc_norm,none" in r:
            se = r.get("acc_norm_stderr,none")
            n = (res.get("n-samples") or {}).get(task) or {}
            run.mc[(task, limit)] = MCScore(float(r["acc_norm,none"]), float(se) if isinstance(se, (int, float)) else None,
                                            n.get("effective"), n.get("original"), dtype)
    command = f"lm_eval --model ctp --model_args {model_args} --tasks {','.join(tasks)}" + (
        f" --limit {limit:g}" if isinstance(limit, (int, float)) else ""
    )
    run.files.append(
        dict(
            file=os.path.relpath(path, root) if root else path.name,
            command=command,
            date=float(res.get("date") or 0),
            hardware=cfg.get("ctp_hardware", "?"),
            wall_s=float(res.get("total_evaluation_time_seconds") or 0),
            versions=f"ctp-eval {cfg.get('ctp_eval_version', '?')}, lm-eval {res.get('lm_eval_version', '?')}",
        )
    )
    return run


def read_answers(results: Path, task: str) -> dict[str, str]:
    """question -> answer of a generation task, from the samples file lm-eval wrote beside `results` (--log_samples)."""
    stamp = results.stem[len("results_"):]
    samples = results.with_name(f"samples_{task}_{stamp}.jsonl")
    if not samples.is_file():
        raise ValueError(f"{results} has {task} results but no {samples.name} beside it: run lm_eval with --log_samples")
    rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda r: r["doc_id"])
    return {r["doc"]["question"]: str(r["filtered_resps"][0]).strip() for r in rows}


def load_runs(paths: list[str | os.PathLike], root: str | os.PathLike | None = None) -> list[Run]:
    """Read and merge results files; a later file (by date) overrides the same task of an earlier one."""
    root = Path(root).resolve() if root else None
    runs = [read_run(p.resolve(), root) for p in find_results(paths)]
    runs.sort(key=lambda r: (r.files[0]["date"], r.files[0]["file"]))
    merged: dict[tuple, Run] = {}
    for run in runs:
        if run.key not in merged:
            merged[run.key] = run
            continue
        m = merged[run.key]
        m.values.update(run.values)
        m.mc.update(run.mc)
        m.sources.update(run.sources)
        m.limits.update(run.limits)
        m.files.extend(run.files)
        m.answers.update(run.answers)
        m.trainable_params = max(m.trainable_params, run.trainable_params)
        m.checkpoint = m.checkpoint or run.checkpoint
    return sorted(merged.values(), key=run_sort_key)


# ----- ordering --------------------------------------------------------------------------------------------
def spec_sort_key(spec: str) -> tuple:
    """none, then quantization (more bits first), then sparsity (less first), then joint specs, then checkpoints
    other tools quantized (their own label, `ctp_eval.external`: "compressed-tensors/w4a16g64-sym"), by label."""
    from ctp_eval.compress.spec import (
        parse_spec,  # the one spec grammar; imports no torch
    )
    from ctp_eval.external import is_external_label  # imports no torch either

    if is_external_label(spec):
        return (4, 0.0, 0.0, True, spec)
    parsed = parse_spec(spec)
    if parsed.is_none:
        return (0, 0.0, 0.0, False, spec)
    bits = float(parsed.quant.bits) if parsed.quant else 16.0
    sparsity = parsed.sparse.sparsity if parsed.sparse else 0.0
    family = 3 if parsed.quant and parsed.sparse else (1 if parsed.quant else 2)
    method = (parsed.sparse or parsed.quant).method
    return (family, -bits, sparsity, method not in ("gptq", "sparsegpt"), spec)


def run_sort_key(run: Run) -> tuple:
    return (run.model, spec_sort_key(run.compression), run.build, KIND_ORDER[run.kind], run.k, run.train_data,
            run.trained_on, run.recipe != "paper", run.recipe)



def main_k(runs: list[Run]) -> int:
    ks = [r.k for r in runs if r.kind == "learned" and not r.in_study]
    if not ks:
        return 0
    return max(set(ks), key=lambda k: (ks.count(k), k == 100, k))


def spec_label(run: Run, show_build: bool = False) -> str:
    """The run's compression; `show_build` names the compressed model's build (where a spec has more than one)."""
    return f"{run.compression} [build {run.build or 'earlier'}]" if show_build else run.compression


def label(run: Run, show_build: bool = False) -> str:
    """Row label; `show_build` names the compressed model's build (where a spec has more than one)."""
    spec = spec_label(run, show_build)
    base = "dense" if run.kind == "dense" else f"{spec}, {KIND_LABEL[run.kind]}"
    if run.kind == "learned":
        recipe = "" if run.recipe == "paper" else f", recipe {run.recipe}"
        base += f" (k={run.k}, {run.train_data}{recipe})"
        if run.trained_on != run.compression:
            base += f" from {run.trained_on}"
    if run.kind == "lora":
        base += f" ({run.train_data}" + ("" if run.recipe in ("", "paper") else f", recipe {run.recipe}") + ")"
    return base


def baseline(runs: list[Run], run: Run) -> Run | None:
    """The no-prompt row of `run`'s own compressed build (same model, spec and build): what its gap is measured
    against. Another build of the same spec (a rebuild on another machine) has its own baseline."""
    return next((r for r in runs if r.kind == "none"
                 and (r.model, r.compression, r.build) == (run.model, run.compression, run.build)), None)


def multi_build_specs(runs: list[Run]) -> set[str]:
    """Specs evaluated on more than one build of their compressed model."""
    return {r.compression for r in runs if len({x.build for x in runs if x.compression == r.compression}) > 1}

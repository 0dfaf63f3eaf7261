"""ctp-bench end to end on a tiny model: every step runs the real commands; a second call skips them all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctp_eval.study.bench import BenchConfig, slug

BIN = Path(sys.executable).parent


def test_quick_config_and_spec_validation():
    cfg = BenchConfig(quick=True)
    assert cfg.spec_list == ["gptq:w3g128"] and cfg.steps == 30 and not cfg.standard_ppl
    assert not cfg.hard_prompt and cfg.loss == "kd" and cfg.val_seqlen == 1024  # the demo's budget and recipe
    assert BenchConfig(specs="gptq:w4, sparsegpt:0.5").spec_list == ["gptq:w4", "sparsegpt:0.5"]
    with pytest.raises(ValueError, match="Invalid compression spec"):
        BenchConfig(specs="gptq:w4,zip:9")
    assert slug("sparsegpt:0.5+gptq:w4") == "sparsegpt-0-5-gptq-w4"


def test_dry_run_plans_data_and_transfer_runs(tmp_path, capsys):
    from ctp_eval.cli.bench import main

    main(["--out", str(tmp_path), "--specs", "gptq:w4,sparsegpt:0.5", "--transfer-from", "gptq:w4", "--k", "25",
          "--train-data", "wikitext2", "--train-split", "validation", "--dry-run"])
    plan = capsys.readouterr().out
    trains = [line for line in plan.splitlines() if "ctp-train" in line]
    assert len(trains) == 2 and all("--data wikitext2 --data-split validation" in t and "--k 25" in t for t in trains)
    learned = tmp_path / "prompts" / "gptq-w4-k25-wikitext2-validation.safetensors"
    evals = [line for line in plan.splitlines() if "lm_eval" in line]
    transfer = [e for e in evals if "sparsegpt-0-5-prompt-gptq-w4-k25-wikitext2-validation-" in e]
    assert len(transfer) == 1 and "ctp_c4,ctp_wikitext2,ctp_ptb" in transfer[0]  # PPL only: no MC for transfer
    assert f"compression=sparsegpt:0.5,calib_nsamples=128,calib_seqlen=2048,prompt={learned}," in transfer[0]
    assert not any("gptq-w4-prompt-" in e for e in evals)  # a prompt is not "transferred" onto its own spec
    with pytest.raises(ValueError, match="train-split"):
        BenchConfig(train_split="test")


def test_dry_run_recipe_and_per_task_mc_limits(tmp_path, capsys):
    from ctp_eval.cli.bench import main

    main(["--out", str(tmp_path), "--specs", "gptq:w4", "--recipe", "kd", "--loss", "kd", "--lr", "0.03",
          "--lr-schedule", "cosine", "--train-dtype", "bfloat16", "--seed", "3", "--mc-tasks", "ctp_openbookqa,ctp_hellaswag,ctp_piqa",
          "--mc-limit", "100", "--mc-task-limits", "ctp_hellaswag=1000,ctp_piqa=none,ctp_openbookqa=none", "--dry-run"])
    plan = capsys.readouterr().out.splitlines()
    train = next(line for line in plan if "ctp-train" in line)
    for flag in ("--loss kd", "--lr 0.03", "--lr-schedule cosine", "--dtype bfloat16", "--recipe-name kd", "--seed 3",
                 "--val-seqlen 1024", "gptq-w4-k100-kd"):
        assert flag in train, flag
    mc = [line for line in plan if "lm_eval" in line and "ctp_hellaswag" in line or "ctp_piqa" in line and "lm_eval" in line]
    hella = [line for line in mc if "--tasks ctp_hellaswag " in line]
    full = [line for line in mc if "--tasks ctp_openbookqa,ctp_piqa " in line]
    assert hella and all("--limit 1000" in line for line in hella)
    assert full and all("--limit" not in line for line in full)
    assert all("dtype=float32" in line for line in plan if "lm_eval" in line)  # evaluation keeps --dtype
    main(["--out", str(tmp_path), "--specs", "gptq:w4", "--mc-tasks", "ctp_piqa", "--mc-dtype", "bfloat16",
          "--mc-batch-size", "32", "--no-hard-prompt", "--dry-run"])
    evals = [line for line in capsys.readouterr().out.splitlines() if "lm_eval" in line]
    mc, ppl = [e for e in evals if "ctp_piqa" in e], [e for e in evals if "ctp_piqa" not in e]
    assert len(mc) == 3 and len(ppl) == 3  # dense, no prompt, learned
    assert all("dtype=bfloat16" in e and "--batch_size 32" in e for e in mc)
    # compressed rows score the float32 build their PPL rows and prompts used; the dense row has no build
    assert ["compress_dtype=float32" in e for e in mc] == [False, True, True]
    assert all("dtype=float32" in e and "compress_dtype" not in e and "--batch_size 4" in e for e in ppl)
    with pytest.raises(ValueError, match="mc-task-limits"):
        BenchConfig(mc_task_limits="ctp_c4=3")
    for changed in (dict(lr=0.01), dict(seed=1)):  # another result, so it must not take the paper-recipe name
        with pytest.raises(ValueError, match="--recipe NAME"):
            BenchConfig(**changed)


def test_dry_run_other_tools_checkpoints(tmp_path, capsys):
    from ctp_eval.cli.bench import main

    folder = tmp_path / "SmolLM2-135M-bnb-nf4"
    main(["--out", str(tmp_path / "out"), "--specs", "gptq:w4", "--checkpoints", f"{folder}/", "--mc-tasks", "ctp_piqa",
          "--mc-dtype", "bfloat16", "--recipe", "r", "--lr", "0.03", "--no-hard-prompt", "--dry-run"])
    plan = capsys.readouterr().out.splitlines()
    trains = [line for line in plan if "ctp-train" in line]
    assert len(trains) == 2 and f"--model {folder} " in trains[1]
    assert "smollm2-135m-bnb-nf4-k100-r" in trains[1] and "--compression" not in trains[1]
    evals = [line for line in plan if "lm_eval" in line and f"pretrained={folder}" in line]
    prompt = tmp_path / "out" / "prompts" / "smollm2-135m-bnb-nf4-k100-r.safetensors"
    assert len(evals) == 4  # (no prompt, learned) x (ppl, mc)
    assert sum(f"prompt={prompt}," in e for e in evals) == 2
    assert not any("compress_dtype" in e or "compression=" in e for e in evals)  # nothing of ours to rebuild
    assert any("/smollm2-135m-bnb-nf4-none-ppl" in e for e in evals)
    with pytest.raises(ValueError, match="share a name"):
        BenchConfig(checkpoints="a/m,b/m")


@pytest.mark.slow
def test_pipeline_end_to_end_and_resumable(tmp_path):
    from conftest import DATA_DIR, build_model, build_tokenizer

    model_dir = tmp_path / "tiny"
    tok = build_tokenizer()
    build_model("llama", vocab_size=len(tok), max_pos=512).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "bench"
    env = {"CTP_DATA_DIR": str(DATA_DIR), "CTP_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "CTP_PPL_SEQLEN": "128", "PATH": str(BIN) + ":/usr/bin:/bin"}
    cmd = [str(BIN / "ctp-bench"), "--out", str(out), "--model", str(model_dir), "--specs", "gptq:w4",
           "--ppl-tasks", "ctp_wikitext2", "--ppl-limit", "1", "--mc-tasks", "ctp_piqa", "--mc-limit", "4",
           "--dense-mc-limit", "4", "--no-hard-prompt", "--no-standard-ppl",
           "--train-dir", str(tmp_path / "kept"), "--k", "4", "--steps", "2", "--batch-size", "2",
           "--seqlen", "64", "--val-seqlen", "64", "--eval-every", "1", "--val-windows", "1", "--calib-nsamples", "4", "--calib-seqlen", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "commands.log").read_text().splitlines()]
    assert len(log) == 7 and all(e["rc"] == 0 for e in log)  # 3 configs x (ppl, mc) + 1 training
    assert (out / "prompts" / "gptq-w4-k4.safetensors").is_file()
    assert (tmp_path / "kept" / "gptq-w4-k4" / "checkpoint").is_dir() and not (out / "train").exists()
    ppl_res = json.loads(next((out / "results" / "dense-ppl").rglob("results_*.json")).read_text())["results"]
    assert "token_perplexity,none" in ppl_res["ctp_wikitext2"]  # --no-standard-ppl: token PPL only
    assert "word_perplexity,none" not in ppl_res["ctp_wikitext2"]
    md = (out / "leaderboard.md").read_text()
    assert "gptq:w4, learned prompt (k=4, c4)" in md and "| dense" in md

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0
    assert len((out / "commands.log").read_text().splitlines()) == 7  # nothing re-run
    assert again.stdout.count("skip") == 7

    # A second spec plus the transfer matrix: gptq:w4's prompt evaluated on gptq:w8 (PPL only), nothing redone.
    more = cmd[:cmd.index("--specs") + 1] + ["gptq:w4,gptq:w8", "--transfer-from", "gptq:w4"] + cmd[cmd.index("--specs") + 2:]
    proc = subprocess.run(more, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len((out / "commands.log").read_text().splitlines()) == 7 + 5 + 1  # w8: 2 configs x 2 + training; transfer
    transfer = [p for p in (out / "results").iterdir() if p.name.endswith("-prompt-gptq-w4-k4-ppl")]
    assert len(transfer) == 1 and transfer[0].name.startswith("gptq-w8-")  # spec, then its build
    res = json.loads(next(transfer[0].rglob("results_*.json")).read_text())
    assert (res["config"]["ctp_compression"], res["config"]["ctp_prompt_trained_on"]) == ("gptq:w8", "gptq:w4")
    assert transfer[0].name == f"gptq-w8-{res['config']['ctp_compression_build']}-prompt-gptq-w4-k4-ppl"
    md = (out / "leaderboard.md").read_text()
    assert "prompt learned on ↓ / applied to →" in md


def test_sigterm_reaches_the_step_in_flight(tmp_path):
    """`kill` on ctp-bench hands SIGTERM to its running step (ctp-train checkpoints on it) and waits for it,
    instead of dying and leaving the step running on its own."""
    import signal
    import time

    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    step = ("import pathlib, signal, sys, time\n"
            f"def stop(*_): time.sleep(0.5); pathlib.Path({str(stopped)!r}).write_text('ok'); sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            f"pathlib.Path({str(ready)!r}).write_text('')\n"
            "time.sleep(60)\n")
    bench = ("from ctp_eval.study.bench import BenchConfig, Runner\n"
             f"Runner(BenchConfig(out={str(tmp_path / 'out')!r})).run([{sys.executable!r}, '-c', {step!r}], 'step')\n")
    parent = subprocess.Popen([sys.executable, "-c", bench], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not ready.exists():
        assert time.time() < deadline and parent.poll() is None, parent.stderr.read() if parent.poll() else "no start"
        time.sleep(0.05)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    assert stopped.read_text() == "ok"  # the step ran its own stop handler to the end before ctp-bench exited
    assert "stopped by SIGTERM during step; rerun to resume" in parent.stderr.read()
    log = (tmp_path / "out" / "commands.log").read_text()
    assert '"rc": 143' in log


def test_eval_batch_sizes_reach_lm_eval(tmp_path, capsys):
    from ctp_eval.cli.bench import main

    main(["--out", str(tmp_path), "--specs", "gptq:w4", "--eval-batch-size", "7", "--mc-batch-size", "3",
          "--mc-tasks", "ctp_piqa", "--dry-run"])
    evals = [line for line in capsys.readouterr().out.splitlines() if "lm_eval" in line]
    ppl = [e for e in evals if "ctp_c4" in e]
    mc = [e for e in evals if "ctp_piqa" in e]
    assert ppl and mc and all("--batch_size 7" in e for e in ppl) and all("--batch_size 3" in e for e in mc)

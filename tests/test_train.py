"""ctp-train on a tiny in-process llama and tiny local text files (CPU, single thread, a few seconds)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file

from ctp_eval import train as T
from ctp_eval.prompt import SoftPrompt
from ctp_eval.train import checkpoint, losses, runlog, schedule, tuners

WORDS = "the quick brown fox jumps over lazy dog soft prompt model capital of France Paris one two three".split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(8)) + "." for _ in range(12)]
    (root / "train.txt").write_text(" ".join(rng.choice(sentences) for _ in range(200)))
    (root / "val.txt").write_text(" ".join(rng.choice(sentences) for _ in range(30)))
    (root / "short.txt").write_text("one two three")
    return root


def cfg(tmp, model_dir, corpus, **kw) -> T.TrainConfig:
    base = dict(out=str(tmp / "out"), model=str(model_dir), data=str(corpus / "train.txt"),
                val_data=str(corpus / "val.txt"), k=4, seqlen=32, batch_size=2, steps=6, eval_every=2,
                save_every=100, val_windows=4, val_seqlen=32, lr=0.1, progress=False)
    return T.TrainConfig(**{**base, **kw})


def prompt_of(path) -> torch.Tensor:
    return SoftPrompt.load(path).embeds


# ---------------------------------------------------------------- loss and gradients


def naive_loss(model, ids, prompt, kind, teacher_model=None, w=0.5):
    """The objective written out on full (B, T, V) logits, independently of ctp_eval.losses."""
    from ctp_eval.prompt import forward_with_prompt

    logp = torch.log_softmax(forward_with_prompt(model, ids, prompt)[:, :-1].float(), -1)  # (B, T-1, V)
    ce = -logp.gather(-1, ids[:, 1:, None]).mean()
    if kind == "ce":
        return ce
    with torch.no_grad():
        t = torch.log_softmax(teacher_model(input_ids=ids).logits[:, :-1].float(), -1)
    kl = (t.exp() * (t - logp)).sum(-1).mean()
    return kl if kind == "kd" else (1 - w) * ce + w * kl


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("kind", ["ce", "kd", "ce+kd"])
def test_chunked_loss_equals_full_logits_and_naive(arch, kind):
    from ctp_eval.train.teacher import Teacher

    model = build_model(arch).requires_grad_(False)
    teacher_model = build_model(arch, seed=1)
    objective = losses.Objective(kind, kd_weight=0.3)
    ids = torch.randint(0, 300, (2, 12))
    prompt = torch.nn.Parameter(torch.randn(3, 64) * 0.05)
    naive = naive_loss(model, ids, prompt, kind, teacher_model, w=0.3)
    naive.backward()
    naive_grad, prompt.grad = prompt.grad.clone(), None
    teacher = Teacher(teacher_model, chunk=5) if objective.uses_teacher else None
    ref = losses.full_loss(model, ids, prompt, objective, teacher.targets(ids) if teacher else None)
    ref["loss"].backward()
    ref_grad, prompt.grad = prompt.grad.clone(), None
    split = losses.split_head(model)
    assert split is not None
    got = losses.chunked_loss_backward(split, ids, prompt, chunk=7, objective=objective,  # 22 targets: 4 chunks
                                       teacher=teacher.targets(ids) if teacher else None)
    torch.testing.assert_close(ref["loss"].detach(), naive.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["loss"], naive.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref_grad, naive_grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(prompt.grad, naive_grad, rtol=1e-4, atol=1e-7)
    assert (got["kd"] > 0) == objective.uses_teacher


def test_only_prompt_gets_gradients_weights_bit_identical(tiny_llama_dir, corpus, tmp_path):
    from ctp_eval.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = cfg(tmp_path, tiny_llama_dir, corpus)
    tuner = T.build_tuner(model, tok, c)
    opt, sched = T.make_optimizer(tuner, c)
    init = tuner.prompt.detach().clone()
    ids = torch.randint(0, len(tok), (2, 32))
    model.train()
    for _ in range(3):
        T.train_step(tuner, opt, sched, ids, 1.0)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert tuner.prompt.grad is not None and not torch.equal(tuner.prompt.detach(), init)


# ---------------------------------------------------------------- full runs


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    return T.train(cfg(tmp, tiny_llama_dir, corpus, steps=24, eval_every=8)), tmp / "out"


def test_loss_decreases_and_outputs_complete(finished, corpus):
    result, out = finished
    rows = runlog.read_run_log(out / "train_log.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 24 and sum(losses[-4:]) < sum(losses[:4])
    assert result.best_val_ppl < result.val_ppl_before
    assert {"prompt.safetensors", "last.safetensors", "checkpoint", "config.json"} <= {p.name for p in out.iterdir()}
    meta = SoftPrompt.load(out / "prompt.safetensors").meta
    assert meta.steps == result.best_step > 0 and meta.seed == 0 and meta.seqlen == 32
    assert meta.train_data == "train.txt" and meta.val_data == "val.txt" and meta.compression == "none"
    assert meta.init == "vocab" and meta.val_ppl_before == pytest.approx(result.val_ppl_before)
    assert meta.val_ppl_after == pytest.approx(result.best_val_ppl) and meta.extra["k"] == 4
    assert meta.base_model and meta.tokenizer_fingerprint
    assert result.trainable_params == 4 * 64 and result.stopped_by is None


def test_best_prompt_is_best_validation(finished, tiny_llama_dir, tmp_path):
    from ctp_eval.eval.ppl import perplexity
    from ctp_eval.models import load_model_and_tokenizer

    result, out = finished
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    c = json.loads((out / "config.json").read_text())
    got = perplexity(model, tok, c["val_data"], "validation", 32, prompt_of(out / "prompt.safetensors"),
                     batch_size=2, limit_windows=4).ppl
    assert got == pytest.approx(result.best_val_ppl, rel=1e-5)
    vals = [r["val_ppl"] for r in runlog.read_run_log(out / "train_log.jsonl") if "val_ppl" in r]
    assert result.best_val_ppl == pytest.approx(min(vals))


def test_resume_equals_uninterrupted(finished, tiny_llama_dir, corpus, tmp_path):
    _, full = finished
    c = cfg(tmp_path, tiny_llama_dir, corpus, steps=24, eval_every=8, save_every=5, stop_after=11)
    first = T.train(c)
    assert first.stopped_by == "stop_after" and first.steps_done == 11
    second = T.train(cfg(tmp_path, tiny_llama_dir, corpus, steps=24, eval_every=8, resume=True))
    assert second.steps_done == 24 and second.stopped_by is None
    for name in ("prompt.safetensors", "last.safetensors"):
        torch.testing.assert_close(prompt_of(tmp_path / "out" / name), prompt_of(full / name), rtol=1e-5, atol=1e-6)
    log = lambda p: runlog.read_run_log(p / "train_log.jsonl")  # noqa: E731
    a, b = log(tmp_path / "out"), log(full)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    value = lambda r: r.get("loss", r.get("val_ppl"))  # noqa: E731
    assert [value(r) for r in a] == pytest.approx([value(r) for r in b], rel=1e-5)


def test_sigterm_leaves_loadable_checkpoint(tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ctp_eval.train", "--out", str(out), "--model", str(tiny_llama_dir),
           "--data", str(corpus / "train.txt"), "--val-data", str(corpus / "val.txt"), "--k", "4",
           "--seqlen", "32", "--val-seqlen", "32", "--batch-size", "2", "--steps", "100000", "--eval-every", "1000",
           "--save-every", "1", "--val-windows", "2", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = out / "checkpoint" / checkpoint.CHECKPOINT_FILE
    deadline = time.time() + 90
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), proc.communicate(timeout=30)[0] if proc.poll() is not None else "no checkpoint in 90 s"
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    state = checkpoint.load_checkpoint(out / "checkpoint")
    step = state["run"]["step"]
    assert step >= 1 and "SIGTERM" in output
    last = SoftPrompt.load(out / "last.safetensors")
    assert torch.equal(last.embeds, state["tuner"]["prompt"]) and last.meta.steps == step
    again = T.train(T.TrainConfig(**{**json.loads((out / "config.json").read_text()), "resume": True,
                                     "stop_after": 1, "progress": False}))
    assert again.steps_done == step + 1


def test_nan_loss_stops_and_keeps_last_good_prompt(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = tuners.PromptTuner.loss_backward

    def flaky(self, ids, *args):
        calls["n"] += 1
        parts = real(self, ids, *args)
        return dict(parts, loss=parts["loss"] * float("nan")) if calls["n"] == 3 else parts

    monkeypatch.setattr(tuners.PromptTuner, "loss_backward", flaky)
    with pytest.raises(T.TrainingDiverged, match="step 3: loss nan"):
        T.train(cfg(tmp_path, tiny_llama_dir, corpus, save_every=2))
    out = tmp_path / "out"
    good = checkpoint.load_checkpoint(out / "checkpoint")  # written after step 2, the last good one
    assert good["run"]["step"] == 2
    assert torch.equal(prompt_of(out / "last.safetensors"), good["tuner"]["prompt"])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("flags, message", [
    (["--k", "0"], "k must be >= 1"),
    (["--data", "nope"], "--data 'nope'"),
    (["--val-data", "missing.txt"], "--val-data"),
    (["--init", "text:"], "init must be"),
    (["--compression", "gptq:w9"], "Invalid compression spec"),
    (["--steps", "10", "--warmup-steps", "10"], "warmup_steps"),
    (["--method", "adapter"], "invalid choice"),
    (["--data-split", "test"], "invalid choice"),
    (["--resume", "--overwrite"], "exclude each other"),
])
def test_bad_flags_exit_with_clear_message(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(["--out", str(tmp_path / "o"), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_data_and_outputs(tiny_llama_dir, corpus, tmp_path):
    with pytest.raises(T.TrainError, match="fewer than one batch"):
        T.train(cfg(tmp_path, tiny_llama_dir, corpus, data=str(corpus / "short.txt")))
    with pytest.raises(T.TrainError, match="exceeds the model's 128 positions"):
        T.train(cfg(tmp_path, tiny_llama_dir, corpus, seqlen=126))
    T.train(cfg(tmp_path, tiny_llama_dir, corpus, steps=2, save_every=1))
    with pytest.raises(T.TrainError, match="--resume"):
        T.train(cfg(tmp_path, tiny_llama_dir, corpus, steps=2))
    with pytest.raises(T.TrainError, match="lr=0.2"):
        T.train(cfg(tmp_path, tiny_llama_dir, corpus, steps=2, lr=0.2, resume=True))


def test_resume_refuses_another_teacher(tiny_llama_dir, tiny_tokenizer, corpus, tmp_path, monkeypatch):
    import shutil

    from ctp_eval.train import setup as trainsetup

    def teacher(folder, seed):
        build_model("llama", vocab_size=len(tiny_tokenizer), seed=seed).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        return str(folder)

    a, b = teacher(tmp_path / "here" / "teacher-a", 1), teacher(tmp_path / "here" / "teacher-b", 2)
    kd = lambda **kw: cfg(tmp_path, tiny_llama_dir, corpus, loss="kd", steps=4, save_every=1, **kw)  # noqa: E731
    assert T.train(kd(teacher=a, stop_after=2)).steps_done == 2
    with monkeypatch.context() as m:  # refused before the teacher's weights are loaded
        m.setattr(trainsetup, "load_teacher", lambda *args: pytest.fail("loaded the teacher of a refused resume"))
        with pytest.raises(T.TrainError, match="another teacher.*teacher-b.*teacher-a"):
            T.train(kd(teacher=b, resume=True))
    # the same teacher in another folder (another machine) resumes
    moved = tmp_path / "there" / "teacher-a"
    shutil.copytree(a, moved)
    assert T.train(kd(teacher=str(moved), resume=True, stop_after=1)).steps_done == 3
    # a checkpoint from before teacher identities were stored resumes unchecked
    ckpt = tmp_path / "out" / "checkpoint"
    state = checkpoint.load_checkpoint(ckpt)
    del state["teacher_identity"]
    checkpoint.save_checkpoint(ckpt, state)
    assert T.train(kd(teacher=b, resume=True)).steps_done == 4


def test_train_on_a_validation_split(tiny_llama_dir, corpus, tmp_path):
    # Offline WikiText-2 has no train split: the data-transfer study trains on validation (the paper's Table 6).
    from conftest import DATA_DIR

    from ctp_eval import data

    res = T.train(cfg(tmp_path, tiny_llama_dir, corpus, data="wikitext2", data_split="validation",
                      data_dir=str(DATA_DIR), steps=1, warmup_steps=0))
    assert SoftPrompt.load(res.artifact).meta.train_data == "wikitext2-validation"
    with pytest.raises(data.DataUnavailableError, match="--data-split validation"):  # no train split offline
        T.train(cfg(tmp_path / "t", tiny_llama_dir, corpus, data="wikitext2", data_dir=str(DATA_DIR), steps=1))


def test_checkpoint_roundtrip_and_schedule(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "rng": checkpoint.rng_state(), "t": (1, "a", None)}
    path = checkpoint.save_checkpoint(tmp_path / "ck", state)
    back = checkpoint.load_checkpoint(path.parent)
    assert back["t"] == (1, "a", None) and torch.equal(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    assert [schedule.lr_factor(s, 2, 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    seen = torch.cat([schedule.batch_indices(10, 3, 0, s) for s in range(3)])
    assert len(set(seen.tolist())) == 9  # one epoch: no window twice


# ---------------------------------------------------------------- LoRA baseline


def test_lora_writes_peft_adapter_with_expected_params(tiny_llama_dir, corpus, tmp_path):
    from peft import PeftModel

    result = T.train(cfg(tmp_path, tiny_llama_dir, corpus, method="lora", steps=2, lora_r=8, lora_alpha=8, lr=1e-3))
    # q_proj 64->64 and v_proj 64->32 (2 kv heads x 16) in each of 2 layers: r * (in + out) each
    assert result.trainable_params == 2 * 8 * ((64 + 64) + (64 + 32))
    adapter = tmp_path / "out" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert sum(t.numel() for t in weights.values()) == result.trainable_params
    peft_model = PeftModel.from_pretrained(build_model("llama"), str(adapter))
    assert peft_model.peft_config["default"].r == 8


def test_lora_adapter_evaluated_through_ctp_records_its_training(tiny_llama_dir, corpus, tmp_path):
    """`ctp` with HFLM's peft= reads the adapter's ctp_train.json: results name the recipe and data like a prompt's."""
    from ctp_eval.eval.lm import CTPLM

    T.train(cfg(tmp_path, tiny_llama_dir, corpus, method="lora", steps=2, lora_r=8, lora_alpha=8, lr=1e-3,
                recipe_name="lora-test"))
    lm = CTPLM(pretrained=str(tiny_llama_dir), peft=str(tmp_path / "out" / "adapter"), device="cpu", dtype="float32")
    info = lm.get_model_info()
    assert info["ctp_prompt_recipe"] == "lora-test" and info["ctp_prompt_steps"] >= 0
    written = json.loads((tmp_path / "out" / "adapter" / "ctp_train.json").read_text())
    assert info["ctp_prompt_train_data"] == written["train_data"] != ""
    assert info["ctp_trainable_params"] == 2 * 8 * ((64 + 64) + (64 + 32))


@pytest.mark.slow  # two torchrun worker processes: ~20 s on a loaded 2-core machine
def test_data_parallel_equals_single_process(tiny_llama_dir, corpus, tmp_path):
    flags = ["--model", str(tiny_llama_dir), "--data", str(corpus / "train.txt"), "--val-data", str(corpus / "val.txt"),
             "--k", "4", "--seqlen", "32", "--val-seqlen", "32", "--steps", "4", "--eval-every", "2", "--val-windows", "5", "--lr", "0.01",
             "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ctp_eval.train",
                    "--out", str(tmp_path / "ddp"), "--batch-size", "1", *flags], env=env, check=True, capture_output=True)
    T.main(["--out", str(tmp_path / "one"), "--batch-size", "2", *flags])
    for name in ("prompt.safetensors", "last.safetensors"):
        a, b = SoftPrompt.load(tmp_path / "ddp" / name), SoftPrompt.load(tmp_path / "one" / name)
        torch.testing.assert_close(a.embeds, b.embeds, rtol=1e-5, atol=1e-6)
        assert a.meta.val_ppl_after == pytest.approx(b.meta.val_ppl_after, rel=1e-6)

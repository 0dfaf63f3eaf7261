"""ctp-train's recipe knobs: validation length, schedules, distillation (on the fly and cached), warm start,
frequency-restricted vocabulary init, prompt metadata, and the resume guards (data layout, model identity)."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from ctp_eval import train as T
from ctp_eval.prompt import SoftPrompt, init_prompt
from ctp_eval.train import runlog, schedule
from ctp_eval.train import setup as trainsetup

WORDS = "alpha beta gamma delta soft prompt model recovers compressed weights one two three four".split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-data")
    rng = random.Random(1)
    (root / "train.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(1500)))
    (root / "val.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)))
    return root


def cfg(tmp, model_dir, corpus, **kw) -> T.TrainConfig:
    base = dict(out=str(tmp / "out"), model=str(model_dir), data=str(corpus / "train.txt"),
                val_data=str(corpus / "val.txt"), k=4, seqlen=16, val_seqlen=32, batch_size=2, steps=6, eval_every=3,
                save_every=100, val_windows=3, lr=0.1, progress=False)
    return T.TrainConfig(**{**base, **kw})


def log_rows(out):
    return runlog.read_run_log(out / "train_log.jsonl")


def test_validation_runs_at_val_seqlen_not_train_seqlen(tiny_llama_dir, corpus, tmp_path):
    from ctp_eval.eval.ppl import perplexity
    from ctp_eval.models import load_model_and_tokenizer

    res = T.train(cfg(tmp_path, tiny_llama_dir, corpus, steps=1, warmup_steps=0))
    meta = SoftPrompt.load(res.artifact).meta
    assert meta.seqlen == 16 and meta.val_seqlen == 32
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    init = init_prompt(model, tok, "vocab", 4, 0)
    at = {n: perplexity(model, tok, str(corpus / "val.txt"), "validation", n, init, batch_size=2, limit_windows=3).ppl
          for n in (16, 32)}
    assert res.val_ppl_before == pytest.approx(at[32], rel=1e-6)
    assert at[16] != pytest.approx(at[32], rel=1e-3)  # the two lengths are distinguishable


def test_schedules():
    f = schedule.lr_factor
    assert [f(s, 0, 4, "constant") for s in range(4)] == [1.0] * 4
    assert f(0, 0, 4, "cosine") == 1.0 and f(2, 0, 4, "cosine") == pytest.approx(0.5)
    assert f(3, 0, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert f(0, 2, 10, "cosine") == 0.5  # warmup is shared by every schedule
    with pytest.raises(ValueError, match="schedule"):
        f(0, 0, 4, "step")


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory, tiny_tokenizer):
    from conftest import build_model

    path = tmp_path_factory.mktemp("other-llama")
    build_model("llama", vocab_size=len(tiny_tokenizer), seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_kd_training_lowers_the_kl_and_records_the_recipe(tiny_llama_dir, other_llama_dir, corpus, tmp_path):
    res = T.train(cfg(tmp_path, tiny_llama_dir, corpus, loss="kd", teacher=str(other_llama_dir), lr_schedule="cosine",
                      steps=12, eval_every=12))
    rows = [r for r in log_rows(tmp_path / "out") if "loss" in r]
    assert all(r["ce"] > 0 and r["kd"] == pytest.approx(r["loss"]) for r in rows)
    assert sum(r["kd"] for r in rows[-3:]) < sum(r["kd"] for r in rows[:3])
    meta = SoftPrompt.load(res.artifact).meta
    assert (meta.loss, meta.lr, meta.lr_schedule, meta.val_seqlen) == ("kd", 0.1, "cosine", 32)
    assert meta.calibration is None and meta.extra["recipe"]["loss"] == "kd"
    assert meta.extra["teacher"]["teacher"] == other_llama_dir.name


def test_default_teacher_is_the_uncompressed_base(tiny_llama_dir, corpus, tmp_path):
    calib = {"dataset": "c4", "nsamples": 4, "seqlen": 32, "seed": 0}
    folder = _fake_compressed(tiny_llama_dir, tmp_path / "m", calib, base_path=str(tiny_llama_dir))
    assert trainsetup.teacher_path(cfg(tmp_path, folder, corpus, loss="kd")) == str(tiny_llama_dir)
    gone = _fake_compressed(tiny_llama_dir, tmp_path / "g", calib, base_path="/nonexistent/base")
    with pytest.raises(T.TrainError, match="--teacher"):
        trainsetup.teacher_path(cfg(tmp_path, gone, corpus, loss="kd"))


def test_teacher_cache_matches_full_teacher_and_is_reused(tiny_llama_dir, tiny_tokenizer, corpus, tmp_path):
    vocab = len(tiny_tokenizer)  # top-K with K = V: the cache holds the whole distribution (in fp16)
    full = T.train(cfg(tmp_path / "a", tiny_llama_dir, corpus, loss="ce+kd", kd_weight=0.7))
    cache = tmp_path / "teacher"
    first = T.train(cfg(tmp_path / "b", tiny_llama_dir, corpus, loss="ce+kd", kd_weight=0.7,
                        teacher_cache=str(cache), teacher_topk=vocab))
    files = sorted(cache.glob("w*.safetensors"))
    assert 0 < len(files) <= 6 * 2 and (cache / "cache.json").is_file()
    stamps = {f: f.stat().st_mtime_ns for f in files}
    a, b = log_rows(tmp_path / "a" / "out"), log_rows(tmp_path / "b" / "out")
    value = lambda r: r.get("loss", r.get("val_ppl"))  # noqa: E731
    assert [value(r) for r in b] == pytest.approx([value(r) for r in a], rel=2e-3)
    assert first.best_val_ppl == pytest.approx(full.best_val_ppl, rel=1e-3)
    T.train(cfg(tmp_path / "c", tiny_llama_dir, corpus, loss="kd", seed=0, teacher_cache=str(cache), teacher_topk=vocab))
    assert {f: f.stat().st_mtime_ns for f in cache.glob("w*.safetensors")} == stamps  # all hits, nothing rewritten
    with pytest.raises(T.TrainError, match="made for other settings"):
        T.train(cfg(tmp_path / "d", tiny_llama_dir, corpus, loss="kd", seqlen=24, teacher_cache=str(cache),
                    teacher_topk=vocab))


def test_warm_start_from_a_prompt_file(tiny_llama_dir, corpus, tmp_path):
    first = T.train(cfg(tmp_path / "a", tiny_llama_dir, corpus))
    second = T.train(cfg(tmp_path / "b", tiny_llama_dir, corpus, init=f"file:{first.artifact}", steps=1,
                         warmup_steps=0))
    assert second.val_ppl_before == pytest.approx(first.best_val_ppl, rel=1e-6)
    with pytest.raises(ValueError, match="has 4 rows"):
        T.train(cfg(tmp_path / "c", tiny_llama_dir, corpus, init=f"file:{first.artifact}", k=5))
    with pytest.raises(ValueError, match="no such prompt file"):
        cfg(tmp_path, tiny_llama_dir, corpus, init="file:/nonexistent.safetensors")


def test_vocab_init_restricted_to_frequent_tokens(tiny_llama_dir, corpus):
    from ctp_eval import data
    from ctp_eval.eval import ppl
    from ctp_eval.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    wins = ppl.windows(data.token_stream(tok, str(corpus / "train.txt"), "train"), 16)
    counts = torch.bincount(wins.reshape(-1), minlength=len(tok))
    top = set(torch.topk(counts, 6).indices.tolist())  # the corpus has few distinct tokens: 6 clear winners
    got = init_prompt(model, tok, "vocab:6", 4, seed=3, train_windows=wins)
    table = model.get_input_embeddings().weight
    rows = [int((table - r).abs().sum(1).argmin()) for r in got]
    assert len(set(rows)) == 4 and set(rows) <= top
    with pytest.raises(ValueError, match="vocab:N"):
        cfg(__import__("pathlib").Path("/tmp"), tiny_llama_dir, corpus, init="vocab:3")  # N < k


def test_resume_refuses_another_token_stream(tiny_llama_dir, corpus, tmp_path):
    data = tmp_path / "train.txt"
    shutil.copy(corpus / "train.txt", data)
    T.train(cfg(tmp_path, tiny_llama_dir, corpus, data=str(data), save_every=1, stop_after=2))
    words = data.read_text().split()
    data.write_text(" ".join(reversed(words)))  # same file, same size, other windows
    with pytest.raises(T.TrainError, match="data layout.*stream_sha256"):
        T.train(cfg(tmp_path, tiny_llama_dir, corpus, data=str(data), resume=True))


def _fake_compressed(src, dst, calibration, base_path=None):
    shutil.copytree(src, dst)
    info = {"spec": "rtn:w4", "base_model": "tiny-base", "calibration": calibration}
    if base_path:
        info.update(base_model="/nonexistent/tiny-base", base_model_path=base_path)
    (dst / "ctp_compression.json").write_text(json.dumps(info))
    return dst


def test_resume_follows_model_identity_not_path(tiny_llama_dir, corpus, tmp_path):
    calib = {"dataset": "c4", "nsamples": 4, "seqlen": 32, "seed": 0}
    here = _fake_compressed(tiny_llama_dir, tmp_path / "cache-a" / "m", calib)
    T.train(cfg(tmp_path, here, corpus, save_every=1, stop_after=2))
    moved = _fake_compressed(tiny_llama_dir, tmp_path / "cache-b" / "other-name", calib)
    done = T.train(cfg(tmp_path, moved, corpus, resume=True))
    assert done.steps_done == 6
    meta = SoftPrompt.load(done.artifact).meta
    assert meta.calibration == calib and meta.compression == "rtn:w4" and meta.base_model == "tiny-base"
    T.train(cfg(tmp_path / "x", here, corpus, save_every=1, stop_after=2))
    other = _fake_compressed(tiny_llama_dir, tmp_path / "cache-c" / "m", dict(calib, nsamples=8))
    with pytest.raises(T.TrainError, match="another model"):
        T.train(cfg(tmp_path / "x", other, corpus, resume=True))


def test_val_batch_size_batches_validation(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    """--val-batch-size sets how many validation windows run per forward (default: --batch-size)."""
    from ctp_eval.eval import ppl

    seen = []
    real = ppl.window_nlls

    def spy(logits_fn, windows, batch_size=1, progress=False):
        seen.append(batch_size)
        return real(logits_fn, windows, batch_size, progress)

    monkeypatch.setattr(ppl, "window_nlls", spy)
    T.train(cfg(tmp_path / "a", tiny_llama_dir, corpus, steps=1, warmup_steps=0, val_batch_size=3))
    assert seen and set(seen) == {3}
    seen.clear()
    T.train(cfg(tmp_path / "b", tiny_llama_dir, corpus, steps=1, warmup_steps=0))
    assert seen and set(seen) == {2}  # cfg's batch_size

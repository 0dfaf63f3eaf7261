"""The ctp_* lm-eval tasks: local data, doc counts, gold labels, prompts identical to lm-eval's built-ins,
the perplexity tasks' docs and results, and one real `lm_eval --model ctp` run end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_DIR, build_model

REPO = Path(__file__).resolve().parents[1]
LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"

# task -> (built-in YAML it mirrors, split we evaluate, docs, {doc index: gold index} read off the raw files)
MC = {
    "ctp_openbookqa": ("openbookqa/openbookqa.yaml", "test", 500, {0: 1, 499: 2}),  # answerKey B, C
    "ctp_hellaswag": ("hellaswag/hellaswag.yaml", "validation", 10042, {0: 3, 10041: 2}),
    "ctp_piqa": ("piqa/piqa.yaml", "validation", 1838, {0: 0, 1837: 0}),
    "ctp_mmlu_hs_european_history": (
        "mmlu/default/mmlu_high_school_european_history.yaml", "test", 165, {0: 2, 164: 2},  # C, C
    ),
}


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(metadata={"data_dir": str(DATA_DIR)})  # the task-argument way of naming the data


def load_task(tm, name):
    return next(iter(tm.load([name])["tasks"].values()))


@pytest.mark.parametrize("name", list(MC))
def test_mc_task_counts_and_gold(task_manager, name):
    _, split, n_docs, gold = MC[name]
    task = load_task(task_manager, name)
    docs = list(task.eval_docs)
    assert len(docs) == n_docs
    assert (task.config.test_split or task.config.validation_split) == split
    for i, label in gold.items():
        assert task.doc_to_target(docs[i]) == label
        assert len(task.doc_to_choice(docs[i])) == (2 if name == "ctp_piqa" else 4)
    assert set(task.aggregation()) == {"acc", "acc_norm"}


@pytest.mark.parametrize("name", list(MC))
def test_mc_prompts_equal_builtin(task_manager, name):
    """Build lm-eval's own task from its YAML, fed our local data, and compare the first requests verbatim."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_task(task_manager, name)
    cfg = load_yaml(LM_EVAL_TASKS / MC[name][0])
    for key in ("tag", "group", "training_split"):  # no train split offline; irrelevant zero-shot
        cfg.pop(key, None)
    cfg["custom_dataset"] = ours.config.custom_dataset
    cfg["metadata"] = {**(cfg.get("metadata") or {}), **(ours.config.metadata or {})}
    builtin = ConfigurableTask(config=cfg)
    assert ours.config.description == builtin.config.description
    for a, b in zip(list(ours.eval_docs)[:25], list(builtin.eval_docs)[:25]):
        assert ours.doc_to_text(a) == builtin.doc_to_text(b)
        assert ours.doc_to_choice(a) == builtin.doc_to_choice(b)
        assert ours.doc_to_target(a) == builtin.doc_to_target(b)


def test_ctp_paper_group(task_manager):
    loaded = task_manager.load(["ctp_paper"])
    names = {getattr(t, "task_name", None) or t.config.task for t in loaded["tasks"].values()}
    assert names == {
        "ctp_c4", "ctp_wikitext2", "ctp_ptb", "ctp_openbookqa", "ctp_hellaswag", "ctp_piqa",
        "ctp_mmlu_hs_european_history",
    }


def test_include_path_also_works():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(REPO / "tasks"))
    assert "ctp_piqa" in tm.all_tasks and "ctp_paper" in tm.all_tasks


def test_ppl_task_docs_and_source(task_manager):
    task = load_task(task_manager, "ctp_c4")
    docs = list(task.eval_docs)
    assert len(docs) == 10 and [d["ctp_ppl"]["shard"] for d in docs] == list(range(10))
    assert "c4-train1000[900:]" in task.config.task_alias and task.config.metadata["source"] == "c4-train1000[900:]"
    assert {d["ctp_ppl"]["seqlen"] for d in docs} == {1024}
    reqs = task.construct_requests(docs[0], "", metadata=("ctp_c4", 0, 1))
    assert "ctp_ppl" in reqs[0].doc and "ctp_ppl" not in reqs[1].doc
    assert reqs[1].args == (docs[0]["text"],) and len(reqs[0].args[0]) < 200


def test_ppl_shards_cover_the_corpus(monkeypatch):
    sys.path.insert(0, str(REPO / "tasks"))
    try:
        import ppl_tasks
    finally:
        sys.path.pop(0)
    from ctp_eval import data

    monkeypatch.setenv("CTP_DATA_DIR", str(DATA_DIR))
    docs = ppl_tasks.build_docs("ptb", "test", n_shards=7)
    assert " ".join(d["text"] for d in docs) == data.corpus_text("ptb", "test")
    with pytest.raises(RuntimeError, match="--model ctp"):
        ppl_tasks.process_results(docs[0], [-12.5, -12.5])  # what HFLM (--model hf) returns
    metrics = ppl_tasks.process_results(docs[0], [(-20.0, 10), -30.0])
    assert metrics["token_perplexity"] == (-20.0, 10) and metrics["scored_tokens"] == 10
    from lm_eval.api.task import Task

    assert metrics["word_perplexity"] == (-30.0, Task.count_words(docs[0]["text"]))  # lm-eval's own word count
    assert metrics["byte_perplexity"] == (-30.0, len(docs[0]["text"].encode("utf-8")))
    assert set(ppl_tasks.process_results(docs[0], [(-20.0, 10)])) == {"token_perplexity", "scored_tokens"}
    assert ppl_tasks.standard_requested({}) and ppl_tasks.standard_requested({"ppl_standard": "yes"})
    assert not ppl_tasks.standard_requested({"ppl_standard": False})
    assert not ppl_tasks.standard_requested({"ppl_standard": "false"})


@pytest.mark.parametrize("standard", [True, False])
def test_lm_eval_cli_end_to_end(tmp_path, tiny_tokenizer, monkeypatch, standard):
    """`lm_eval --model ctp --tasks ctp_wikitext2 --limit 1`: token_perplexity equals ppl.py computed directly,
    with and without the standard rolling request (ppl_standard)."""
    from ctp_eval import data
    from ctp_eval.eval import ppl

    model_dir = tmp_path / "tiny"
    model = build_model("llama", vocab_size=len(tiny_tokenizer))
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    seqlen, shards = 128, 50  # 50 shards: --limit 1 scores 2% of WikiText-2, keeping the test quick
    monkeypatch.setenv("CTP_DATA_DIR", str(DATA_DIR))  # the environment way, for the subprocess and us
    cmd = [
        str(Path(sys.executable).parent / "lm_eval"), "--model", "ctp",
        "--model_args", f"pretrained={model_dir},dtype=float32", "--device", "cpu",
        "--tasks", "ctp_wikitext2", "--limit", "1",
        "--metadata", json.dumps({"ppl_seqlen": seqlen, "ppl_shards": shards, "ppl_standard": standard}),
        "--output_path", str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    res = result["results"]["ctp_wikitext2"]
    assert "wikitext2-test" in res["alias"]

    # Direct: the whole corpus tokenized once, windows of seqlen, shard 0 (what --limit 1 scores).
    wins = ppl.windows(data.token_stream(tiny_tokenizer, "wikitext2", "test"), seqlen)
    lo, hi = ppl.shard_bounds(len(wins), shards, 0)
    direct = ppl.protocol_nll(lambda x: model(input_ids=x).logits, wins[lo:hi], batch_size=8)
    assert res["scored_tokens,none"] == direct.n_tokens
    assert res["token_perplexity,none"] == pytest.approx(direct.ppl, rel=1e-5)
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        if standard:
            assert math.isfinite(res[key])
        else:
            assert key not in res


@pytest.mark.slow
def test_ctp_paper_smollm2_offline(tmp_path, monkeypatch):
    """CI smoke run: all seven tasks, offline, on the embedded SmolLM2-135M (--limit 2; 500 ppl shards)."""
    monkeypatch.setenv("CTP_DATA_DIR", str(DATA_DIR))
    cmd = [
        str(Path(sys.executable).parent / "lm_eval"), "--model", "ctp", "--model_args", "dtype=float32",
        "--device", "cpu", "--batch_size", "4", "--tasks", "ctp_paper", "--limit", "2",
        "--metadata", json.dumps({"ppl_shards": 500}), "--output_path", str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    for name in ("ctp_c4", "ctp_wikitext2", "ctp_ptb"):
        assert res[name]["scored_tokens,none"] > 0 and math.isfinite(res[name]["token_perplexity,none"])
    for name in MC:
        assert 0.0 <= res[name]["acc,none"] <= 1.0 and "acc_norm_stderr,none" in res[name]


def test_paper_group_lists_the_preset_tasks():
    import yaml

    from ctp_eval import presets

    group = yaml.safe_load((Path(__file__).resolve().parents[1] / "tasks" / "ctp_paper.yaml").read_text())
    assert group["group"] == presets.PAPER_TASK_GROUP
    assert tuple(group["task"]) == presets.PAPER_TASKS

"""ctp-leaderboard on results files shaped like lm-eval's (synthetic numbers, real file layout)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctp_eval.study.leaderboard import (
    gap_recovered,
    load_runs,
    main_table,
    spec_sort_key,
    write_leaderboard,
)

REPO = Path(__file__).resolve().parents[1]


def write_result(d: Path, name: str, *, compression="none", prompt=None, trained_on=None, k=0, data="c4-train1000[:800]",
                 hard=None, ppl=None, mc=None, limit=None, date=1_790_000_000.0, recipe=None, recipe_args=None,
                 build=None, model="tiny", checkpoint=None, peft=None, trainable=None):
    results, configs = {}, {}
    for task, v in (ppl or {}).items():
        results[task] = {"alias": task, "token_perplexity,none": v, "token_perplexity_stderr,none": "N/A"}
        configs[task] = {"metadata": {"source": f"src-{task}"}}
    for task, (acc, se) in (mc or {}).items():
        results[task] = {"alias": task, "acc_norm,none": acc, "acc_norm_stderr,none": se, "acc,none": acc}
    cfg = {
        "model": "ctp", "model_args": f"compression={compression}", "limit": limit,
        "ctp_base_model": model, "ctp_compression": compression, "ctp_prompt": prompt, "ctp_hard_prompt": hard,
        "ctp_peft": peft, "ctp_prompt_k": k,
        "ctp_trainable_params": trainable if trainable is not None else k * 64 if prompt else 0,
        "ctp_hardware": "test cpu", "ctp_eval_version": "0.1.0",
    }
    if build:
        cfg["ctp_compression_build"] = build
    if checkpoint:
        cfg["ctp_checkpoint_quantization"] = checkpoint
    if prompt or peft:
        cfg.update(ctp_prompt_trained_on=trained_on or compression, ctp_prompt_train_data=data, ctp_prompt_steps=10)
        if recipe:
            cfg.update(ctp_prompt_recipe=recipe, ctp_prompt_recipe_args=recipe_args or {})
    path = d / name / f"results_{name}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"results": results, "configs": configs, "config": cfg, "date": date, "lm_eval_version": "0.4.13",
                                "total_evaluation_time_seconds": "60.0"}))
    return path


@pytest.fixture()
def results_dir(tmp_path):
    d = tmp_path / "results"
    write_result(d, "dense", ppl={"ctp_c4": 20.0, "ctp_wikitext2": 10.0}, mc={"ctp_piqa": (0.6, 0.01)})
    write_result(d, "w3", compression="gptq:w3g128", ppl={"ctp_c4": 40.0, "ctp_wikitext2": 30.0}, mc={"ctp_piqa": (0.5, 0.01)}, limit=100)
    write_result(d, "w3-hard", compression="gptq:w3g128", hard="paper", ppl={"ctp_c4": 39.0, "ctp_wikitext2": 29.0})
    write_result(d, "w3-prompt", compression="gptq:w3g128", prompt="p.safetensors", k=100,
                 ppl={"ctp_c4": 30.0, "ctp_wikitext2": 25.0}, mc={"ctp_piqa": (0.55, 0.01)})
    write_result(d, "s50", compression="sparsegpt:0.5", ppl={"ctp_c4": 50.0, "ctp_wikitext2": 35.0})
    # the w3 prompt applied to sparsegpt:0.5 (transfer), a k=25 prompt (ablation), a wikitext-trained prompt
    write_result(d, "s50-from-w3", compression="sparsegpt:0.5", prompt="p.safetensors", trained_on="gptq:w3g128", k=100,
                 ppl={"ctp_c4": 45.0, "ctp_wikitext2": 33.0})
    write_result(d, "w3-k25", compression="gptq:w3g128", prompt="p25.safetensors", k=25, ppl={"ctp_c4": 33.0})
    write_result(d, "w3-wiki", compression="gptq:w3g128", prompt="pw.safetensors", k=100, data="wikitext2-validation",
                 ppl={"ctp_c4": 36.0, "ctp_wikitext2": 20.0})
    return d


def test_gap_recovered_formula():
    assert gap_recovered(40.0, 30.0, 20.0) == pytest.approx(50.0)
    assert gap_recovered(40.0, 40.0, 20.0) == pytest.approx(0.0)
    assert gap_recovered(40.0, None, 20.0) is None


def test_spec_order():
    specs = ["sparsegpt:0.5+gptq:w4", "sparsegpt:0.75", "gptq:w2g64", "none", "gptq:w4", "sparsegpt:0.5", "gptq:w3g128"]
    assert sorted(specs, key=spec_sort_key) == [
        "none", "gptq:w4", "gptq:w3g128", "gptq:w2g64", "sparsegpt:0.5", "sparsegpt:0.75", "sparsegpt:0.5+gptq:w4"]


def test_main_table_rows_and_gap(results_dir):
    runs = load_runs([results_dir])
    headers, rows = main_table(runs)
    labels = [r[0] for r in rows]
    assert labels == ["dense", "gptq:w3g128, no prompt", "gptq:w3g128, hard prompt",
                      "gptq:w3g128, learned prompt (k=100, c4)", "sparsegpt:0.5, no prompt"]
    learned = rows[3]
    # C4: (40-30)/(40-20) = 50 %, WikiText-2: (30-25)/(30-10) = 25 %
    assert learned[-1] == "50 / 25"
    assert learned[headers.index("trainable params")] == "6,400"
    assert "55.0 ± 1.0" in learned
    assert any("src-ctp_c4" in h for h in headers)  # data source named in the header


def test_dense_only_page_has_no_recovery_columns(tmp_path):
    d = tmp_path / "results"
    write_result(d, "dense-ppl", ppl={"ctp_c4": 20.0})
    write_result(d, "dense-mc", mc={"ctp_piqa": (0.6, 0.01)})
    headers, rows = main_table(load_runs([d]))
    assert rows == [["dense", "20.00", "60.0 ± 1.0"]]  # the two files merge into one row
    assert len(headers) == 3
    text = write_leaderboard([d], tmp_path / "lb.md", title="T", plots=False).read_text()
    assert "gap recovered" not in text.lower()


def test_markdown_has_all_tables_and_is_reproducible(results_dir, tmp_path):
    a = write_leaderboard([results_dir], tmp_path / "a" / "lb.md", title="T", plots=False)
    b = write_leaderboard([results_dir], tmp_path / "b" / "lb.md", title="T", plots=False)
    text = a.read_text()
    assert text == b.read_text()
    for section in ("## Main table", "## Transfer across compression levels", "## Transfer across training data",
                    "## Prompt length", "## Runs"):
        assert section in text, section
    # PIQA: two rows scored every document, the compressed model 100 of them: separate columns, never one
    other = text.split("## Multiple choice on other subsets")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in other.splitlines() if line.startswith("| ")]
    assert rows == [["configuration", "PIQA (--limit 100) acc_norm %"], ["gptq:w3g128, no prompt", "50.0 ± 1.0"]]
    assert "45.00" in text  # the transfer cell
    data_table = text.split("## Transfer across training data")[1].split("##")[0]
    assert "`wikitext2-validation`" in data_table and "`c4-train1000[:800]`" in data_table  # the exact training data


def test_plots_written_and_linked(results_dir, tmp_path):
    out = write_leaderboard([results_dir], tmp_path / "lb.md", title="T")
    text = out.read_text()
    pngs = sorted(tmp_path.glob("lb-ppl-vs-*.png"))
    assert [p.name for p in pngs] == ["lb-ppl-vs-quantization.png", "lb-ppl-vs-sparsity.png"]
    for p in pngs:
        assert f"]({p.name})" in text and p.stat().st_size > 1000


LEADERBOARD = [str(Path(sys.executable).parent / "ctp-leaderboard")]


def test_cli_errors_clearly_on_non_ctp_results(tmp_path):
    bad = tmp_path / "results_x.json"
    bad.write_text(json.dumps({"results": {}, "config": {"model": "hf"}}))
    proc = subprocess.run(LEADERBOARD + [str(bad), "--out", str(tmp_path / "x.md")], capture_output=True, text=True)
    assert proc.returncode != 0 and "not a `--model ctp` result" in proc.stderr


def test_committed_leaderboards_regenerate_byte_for_byte(tmp_path):
    """Each leaderboards/<name>.md is rebuilt from leaderboards/<name>/results by the command the page states.

    The results (and notes) are copied to the same relative place under tmp_path, and the page's own
    regeneration command runs there, so links and file names in the regenerated page are the same.
    """
    import re
    import shlex
    import shutil

    boards = sorted((REPO / "leaderboards").glob("*.md"))
    assert boards
    for md in boards:
        src = md.with_suffix("")
        assert (src / "results").is_dir(), f"{md.name} has no committed results folder {src / 'results'}"
        shutil.copytree(src, tmp_path / src.name)
        stated = re.search(r"From this page's folder: `([^`]+)`", md.read_text())
        assert stated, f"{md.name} does not state its regeneration command"
        args = shlex.split(stated.group(1))
        assert args[0] == "ctp-leaderboard"
        proc = subprocess.run(LEADERBOARD + args[1:], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / md.name).read_bytes() == md.read_bytes(), f"{md.name} differs from its regeneration"


def test_recipes_get_their_own_rows_and_study_table(results_dir, tmp_path):
    args = dict(loss="kd", lr=0.01, lr_schedule="linear", batch_size=4, seqlen=256, steps=48, val_seqlen=1024)
    write_result(results_dir, "w3-kd", compression="gptq:w3g128", prompt="kd.safetensors", k=100, recipe="kd",
                 recipe_args=args, ppl={"ctp_c4": 24.0, "ctp_wikitext2": 15.0})
    write_result(results_dir, "w3-study", compression="gptq:w3g128", prompt="s.safetensors", k=100,
                 recipe="study-ce-lr3e-2-s1024", recipe_args=dict(args, loss="ce", lr=0.03, batch_size=1, seqlen=1024),
                 ppl={"ctp_c4": 28.0, "ctp_wikitext2": 22.0})
    write_result(results_dir, "w3-study-top", compression="gptq:w3g128", prompt="t.safetensors", k=100,
                 recipe="study-kd-top64-lr3e-2-s256", recipe_args=dict(args, lr=0.03, teacher_topk=64),
                 ppl={"ctp_c4": 30.0, "ctp_wikitext2": 20.0})
    write_result(results_dir, "w3-study-lora", compression="gptq:w3g128", peft="a", recipe="study-lora-lr1e-3-s256",
                 recipe_args=dict(args, loss="ce", lr=0.001), trainable=9_000, ppl={"ctp_c4": 36.0, "ctp_wikitext2": 26.0})
    runs = load_runs([results_dir])
    labels = [r[0] for r in main_table(runs)[1]]
    assert "gptq:w3g128, learned prompt (k=100, c4)" in labels  # the paper-recipe row stays
    assert "gptq:w3g128, learned prompt (k=100, c4, recipe kd)" in labels
    assert not any("study" in x for x in labels)
    kd_row = next(r for r in main_table(runs)[1] if r[0].endswith("recipe kd)"))
    assert kd_row[-1] == "80 / 75"  # (40-24)/(40-20), (30-15)/(30-10)
    text = write_leaderboard([results_dir], tmp_path / "lb.md", title="T", plots=False).read_text()
    study = text.split("## Recipe study")[1].split("\n## ")[0]
    row = [c.strip() for c in next(line for line in study.splitlines() if "1 x 1024" in line).split("|")[1:-1]]
    assert row[:8] == ["gptq:w3g128", "prompt (k=100)", "ce", "0.03", "linear", "1 x 1024", "49,152", "1024"]
    assert row[-1] == "60 / 40"  # (40-28)/20, (30-22)/20
    top = [c.strip() for c in next(line for line in study.splitlines() if "top-64" in line).split("|")[1:-1]]
    assert top[2:4] == ["kd (top-64 cached)", "0.03"] and top[-1] == "50 / 50"  # (40-30)/20, (30-20)/20
    lora = [c.strip() for c in next(line for line in study.splitlines() if "| LoRA" in line).split("|")[1:-1]]
    assert lora[1:4] == ["LoRA", "ce", "0.001"] and lora[-1] == "20 / 20"  # (40-36)/20, (30-26)/20
    assert "## Soft prompt vs LoRA" not in text  # a sweep cell is not a LoRA row
    assert not any("cached" in line for line in study.splitlines() if "1 x 1024" in line)
    assert "kd.safetensors" not in study


def test_each_build_of_a_spec_has_its_own_baseline(results_dir):
    # a rebuilt gptq:w3g128 (other weights): its prompt's gap is measured against its own no-prompt row
    write_result(results_dir, "w3-b2", compression="gptq:w3g128", build="ab12cd34", ppl={"ctp_c4": 60.0, "ctp_wikitext2": 50.0})
    write_result(results_dir, "w3-b2-kd", compression="gptq:w3g128", build="ab12cd34", prompt="kd.safetensors", k=100,
                 recipe="kd", ppl={"ctp_c4": 40.0, "ctp_wikitext2": 30.0})
    rows = {r[0]: r for r in main_table(load_runs([results_dir]))[1]}
    assert rows["gptq:w3g128 [build earlier], learned prompt (k=100, c4)"][-1] == "50 / 25"  # vs the earlier build
    assert rows["gptq:w3g128 [build ab12cd34], learned prompt (k=100, c4, recipe kd)"][-1] == "50 / 50"  # (60-40)/40
    assert "gptq:w3g128 [build ab12cd34], no prompt" in rows and "sparsegpt:0.5, no prompt" in rows



def test_mc_subsets_never_share_a_column(tmp_path):
    # dense and gptq:w3g128 scored on 100 PIQA documents (the main table) and on all 1,838; only the
    # compressed model on 1,000 HellaSwag documents
    d = tmp_path / "results"

    def mc_result(name, compression, acc, limit, docs, total, date):
        path = write_result(d, name, compression=compression, mc={"ctp_piqa": (acc, 0.05 if limit else 0.01)},
                            limit=limit, date=date)
        res = json.loads(path.read_text())
        res["n-samples"] = {"ctp_piqa": {"original": total, "effective": docs}}
        path.write_text(json.dumps(res))

    mc_result("dense-100", "none", 0.70, 100, 100, 1838, 1_790_000_000.0)
    mc_result("dense-all", "none", 0.64, None, 1838, 1838, 1_790_000_100.0)  # later file: must not replace the 100-doc cell
    mc_result("w3-100", "gptq:w3g128", 0.60, 100, 100, 1838, 1_790_000_000.0)
    mc_result("w3-all", "gptq:w3g128", 0.58, None, 1838, 1838, 1_790_000_100.0)
    mc_result("s50-100", "sparsegpt:0.5", 0.55, 100, 100, 1838, 1_790_000_000.0)
    for name in ("dense-all", "w3-all"):  # the full-subset runs were bf16 evaluations: their header says so
        path = d / name / f"results_{name}.json"
        res = json.loads(path.read_text())
        res["config"]["model_args"] += ",compress_dtype=float32,dtype=bfloat16"
        path.write_text(json.dumps(res))
    runs = load_runs([d])
    headers, rows = main_table(runs)
    assert [r[:2] for r in rows] == [["dense", "70.0 ± 5.0"], ["gptq:w3g128, no prompt", "60.0 ± 5.0"],
                                     ["sparsegpt:0.5, no prompt", "55.0 ± 5.0"]]
    text = write_leaderboard([d], tmp_path / "lb.md", title="T", plots=False).read_text()
    assert "PIQA --limit 100" in text
    other = text.split("## Multiple choice on other subsets")[1].split("\n## ")[0]
    assert "PIQA (all 1,838; bfloat16) acc_norm %" in other
    lines = [[c.strip() for c in line.split("|")[1:-1]] for line in other.splitlines() if line.startswith("| ")]
    assert lines[1:] == [["dense", "64.0 ± 1.0"], ["gptq:w3g128, no prompt", "58.0 ± 1.0"]]  # no sparsegpt row


def test_transfer_cell_scored_on_two_builds_shows_both_tagged(tmp_path):
    # a spec rebuilt elsewhere: its own prompt scored on both builds, each beside its build's no-prompt row
    d = tmp_path / "results"
    write_result(d, "dense", ppl={"ctp_c4": 20.0})
    for b, none, own in (("aaaa1111", 40.0, 30.0), ("bbbb2222", 41.0, 31.5)):
        write_result(d, f"w3-{b}", compression="gptq:w3g128", build=b, ppl={"ctp_c4": none})
        write_result(d, f"w3-{b}-p", compression="gptq:w3g128", build=b, prompt="p.safetensors", k=100,
                     recipe="r1", ppl={"ctp_c4": own})
    write_result(d, "s50", compression="sparsegpt:0.5", build="cccc3333", ppl={"ctp_c4": 50.0})
    write_result(d, "s50-from-w3", compression="sparsegpt:0.5", build="cccc3333", prompt="p.safetensors",
                 trained_on="gptq:w3g128", k=100, recipe="r1", ppl={"ctp_c4": 45.0})
    text = write_leaderboard([d], tmp_path / "lb.md", title="T", plots=False).read_text()
    table = text.split("## Transfer across compression levels")[1].split("\n## ")[0]
    rows = {r[0]: r[1:] for r in ([c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
                                  if line.startswith("| "))}
    assert rows["gptq:w3g128 (recipe r1)"] == ["30.00 [aaaa1111] / 31.50 [bbbb2222]", "45.00"]


def test_model_args_recorded_as_a_dict_give_dtype_and_command(tmp_path):
    # lm-eval's Python API stores model_args as the dict it was given, the CLI as a string: both must read the same
    d = tmp_path / "results"
    path = write_result(d, "w3-bf16", compression="gptq:w3g128", mc={"ctp_piqa": (0.5, 0.01)})
    res = json.loads(path.read_text())
    res["config"]["model_args"] = {"compression": "gptq:w3g128", "dtype": "bfloat16"}
    path.write_text(json.dumps(res))
    (run,) = load_runs([d])
    assert run.mc[("ctp_piqa", None)].dtype == "bfloat16"
    assert "--model_args compression=gptq:w3g128,dtype=bfloat16 --tasks ctp_piqa" in run.files[0]["command"]


def test_case_study_answers_need_the_samples_file(tmp_path):
    """Generation results are rendered from lm-eval's samples file; without it the error says to log samples."""
    import json

    from ctp_eval.study.runs import read_answers

    results = tmp_path / "results_2026-01-01T00-00-00.000000.json"
    results.write_text("{}")
    with pytest.raises(ValueError, match="--log_samples"):
        read_answers(results, "ctp_case_study")
    rows = [{"doc_id": 1, "doc": {"question": "B?"}, "filtered_resps": [" two "]},
            {"doc_id": 0, "doc": {"question": "A?"}, "filtered_resps": ["one"]}]
    (tmp_path / "samples_ctp_case_study_2026-01-01T00-00-00.000000.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    assert list(read_answers(results, "ctp_case_study").items()) == [("A?", "one"), ("B?", "two")]


def test_other_tools_checkpoints_get_their_own_table(tmp_path):
    from ctp_eval.study.leaderboard import external_table, render_markdown

    d = tmp_path / "results"
    write_result(d, "dense", ppl={"ctp_c4": 20.0})
    write_result(d, "w4", compression="gptq:w4", build="b1", ppl={"ctp_c4": 30.0})
    write_result(d, "w4-r", compression="gptq:w4", build="b1", prompt="p.safetensors", k=100, recipe="r", ppl={"ctp_c4": 25.0})
    write_result(d, "w4-paper", compression="gptq:w4", build="b1", prompt="q.safetensors", k=100, ppl={"ctp_c4": 27.0})
    write_result(d, "w3", compression="gptq:w3g128", ppl={"ctp_c4": 40.0})
    nf4 = {"label": "bitsandbytes/nf4", "library": "bitsandbytes", "library_version": "9.9", "in_memory": "quantized"}
    for name, compression, ppl_c4, prompt in (("nf4", "bitsandbytes/nf4", 28.0, None), ("nf4-r", "bitsandbytes/nf4", 24.0, "n.safetensors"),
                                              ("ct", "compressed-tensors/w4a16-sym", 36.0, None)):
        write_result(d, name, compression=compression, model=f"m-{name.split('-')[0]}", prompt=prompt, k=100 if prompt else 0,
                     recipe="r" if prompt else None, ppl={"ctp_c4": ppl_c4}, checkpoint=nf4 if "nf4" in name else
                     {"library": "compressed-tensors", "library_version": "1.0", "in_memory": "dequantized"})
    runs = load_runs([d])
    _, rows = external_table(runs)
    cells = {row[0]: row for row in rows}
    assert list(cells) == ["gptq:w4, no prompt", "gptq:w4, learned prompt (k=100, c4, recipe r)",
                           "bitsandbytes/nf4, no prompt", "bitsandbytes/nf4, learned prompt (k=100, c4, recipe r)",
                           "compressed-tensors/w4a16-sym, no prompt"]  # ours first, same recipe only; then by label
    learned = cells["bitsandbytes/nf4, learned prompt (k=100, c4, recipe r)"]
    assert learned[1:4] == ["m-nf4", "bitsandbytes 9.9", "quantized"]
    assert learned[-1] == "50"  # (28 - 24) / (28 - 20): against its own no-prompt row, not gptq:w4's
    assert cells["gptq:w4, learned prompt (k=100, c4, recipe r)"][-1] == "50"  # (30 - 25) / (30 - 20)
    assert cells["compressed-tensors/w4a16-sym, no prompt"][-1] == ""
    main = [row[0] for row in main_table(runs)[1]]
    assert not any("/" in label for label in main) and "gptq:w3g128, no prompt" in main
    page = render_markdown(runs, "t")
    section = page.split("## Prompts on other tools' compressions")[1].split("\n## ")[0]
    assert "bitsandbytes 9.9" in section and "gptq:w3g128" not in section


def test_direct_vs_transferred_table(results_dir):
    from ctp_eval.study.leaderboard import direct_vs_transferred_table

    headers, rows = direct_vs_transferred_table(load_runs([results_dir]))
    assert headers[-3:] == ["no prompt", "direct prompt", "transferred C4 prompt"]
    # gptq:w3g128 on WikiText-2: no prompt 30, the wikitext2-trained prompt 20, the C4-trained one 25
    assert rows == [["gptq:w3g128", "WikiText-2", "paper", "`wikitext2-validation`", "30.00", "20.00", "25.00"]]


def test_prompt_vs_lora_table_prices_each_method_from_the_bench(tmp_path):
    from ctp_eval.study.costs import StepCost, TrainCost, save_cost
    from ctp_eval.study.leaderboard import prompt_vs_lora_table, render_markdown

    d = tmp_path / "results"
    args = {"steps": 400, "dtype": "float32"}
    write_result(d, "dense", ppl={"ctp_c4": 20.0}, mc={"ctp_piqa": (0.6, 0.01)})
    write_result(d, "w3", compression="gptq:w3g128", ppl={"ctp_c4": 40.0}, mc={"ctp_piqa": (0.5, 0.01)})
    write_result(d, "w3-prompt", compression="gptq:w3g128", prompt="p.safetensors", k=100, recipe="r", recipe_args=args,
                 ppl={"ctp_c4": 30.0}, mc={"ctp_piqa": (0.55, 0.01)})
    write_result(d, "w3-lora", compression="gptq:w3g128", peft="a", recipe="lora-paper", recipe_args=args,
                 trainable=9_000, ppl={"ctp_c4": 35.0})
    write_result(d, "w3-lora-mc", compression="gptq:w3g128", peft="a", recipe="lora-paper", recipe_args=args,
                 trainable=9_000, mc={"ctp_hellaswag": (0.4, 0.01)}, limit=1000)  # a subset no other row has
    write_result(d, "w3-lora-hi", compression="gptq:w3g128", peft="b", recipe="lora-lr1e-3", recipe_args=args,
                 trainable=9_000, ppl={"ctp_c4": 25.0})
    write_result(d, "s50", compression="sparsegpt:0.5", ppl={"ctp_c4": 50.0})  # no LoRA row: not in the table
    write_result(d, "s50-prompt", compression="sparsegpt:0.5", prompt="q.safetensors", k=100, ppl={"ctp_c4": 45.0})
    cost = TrainCost(command="python bench/train_speed.py --json x", machine="test cpu", date=1_790_000_000.0,
                     model="tiny", batch_size=4, seqlen=256, k=100, steps=5, repeats=3, memory="peak RSS",
                     load_before="0.1", load_after="0.2",
                     rows=[StepCost("ctp", "bfloat16", 6_400, 1.0, 9.0, 900.0), StepCost("ctp", "float32", 6_400, 1.0, 6.0, 500.0),
                           StepCost("lora", "float32", 9_000, 1.0, 3.0, 700.0)])
    save_cost(d / "train-cost" / "train_cost.json", cost)
    out = write_leaderboard([d], tmp_path / "page.md", plots=False)
    runs = load_runs([d])
    from ctp_eval.study.costs import load_costs

    headers, rows = prompt_vs_lora_table(runs, load_costs([d]))
    assert headers[-3:] == ["s / step", "peak MiB / step", "train min (steps x s/step)"]
    piqa = headers.index("PIQA (all) acc_norm %")
    hellaswag = headers.index("HellaSwag (--limit 1000) acc_norm %")
    cells = {row[0]: row for row in rows}
    assert list(cells) == ["gptq:w3g128, no prompt", "gptq:w3g128, learned prompt (k=100, c4, recipe r)",
                           "gptq:w3g128, LoRA (c4, recipe lora-lr1e-3)", "gptq:w3g128, LoRA (c4, recipe lora-paper)"]
    prompt, lora_hi, lora = (cells[x] for x in list(cells)[1:])
    assert prompt[1] == "6,400" and lora[1] == "9,000"
    assert prompt[-4:] == ["50", "6.00", "500", "40"]  # (40 - 30) / (40 - 20); float32 row; 400 x 6 s = 40 min
    assert lora[-4:] == ["25", "3.00", "700", "20"]
    assert lora_hi[-4] == "75"
    assert (prompt[piqa], prompt[hellaswag], lora[piqa], lora[hellaswag]) == ("55.0 ± 1.0", "–", "–", "40.0 ± 1.0")
    assert cells["gptq:w3g128, no prompt"][-4:] == ["", "", "", ""]
    page = out.read_text()
    section = page.split("## Soft prompt vs LoRA")[1].split("\n## ")[0]
    assert "python bench/train_speed.py --json x" in section and "train-cost/train_cost.json" in section
    assert "sparsegpt:0.5" not in section
    assert "## Soft prompt vs LoRA" not in render_markdown([r for r in runs if r.kind != "lora"], "t")


def test_train_cost_files_must_say_their_format(tmp_path):
    from ctp_eval.study.costs import load_costs

    (tmp_path / "train_cost.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="bench/train_speed.py --json"):
        load_costs([tmp_path])


def test_other_tools_checkpoints_sit_beside_our_rows_of_their_bit_width(tmp_path):
    from ctp_eval.study.leaderboard import external_table

    d = tmp_path / "results"
    write_result(d, "dense", ppl={"ctp_c4": 20.0})
    for spec, slug in (("gptq:w4", "w4"), ("gptq:w3g128", "w3"), ("gptq:w2g64", "w2")):
        write_result(d, slug, compression=spec, ppl={"ctp_c4": 40.0})
        write_result(d, f"{slug}-r", compression=spec, prompt="p.safetensors", k=100, recipe="r", ppl={"ctp_c4": 30.0})
    ct3 = {"library": "compressed-tensors", "library_version": "1.0", "in_memory": "dequantized", "bits": 3}
    write_result(d, "ct3", compression="compressed-tensors/w3a16g128-sym", model="m-ct3", ppl={"ctp_c4": 45.0}, checkpoint=ct3)
    write_result(d, "ct3-r", compression="compressed-tensors/w3a16g128-sym", model="m-ct3", prompt="c.safetensors", k=100,
                 recipe="r", ppl={"ctp_c4": 35.0}, checkpoint=ct3)
    _, rows = external_table(load_runs([d]))
    assert [row[0] for row in rows] == [
        "gptq:w3g128, no prompt", "gptq:w3g128, learned prompt (k=100, c4, recipe r)",
        "compressed-tensors/w3a16g128-sym, no prompt", "compressed-tensors/w3a16g128-sym, learned prompt (k=100, c4, recipe r)"]
    assert rows[-1][-1] == "40"  # (45 - 35) / (45 - 20)


def test_training_data_tables_keep_each_build_under_its_own_baseline(tmp_path):
    """A spec rebuilt on another machine: each prompt is read against the no-prompt row of the build it was scored
    on, and both data tables say which build a row belongs to."""
    from ctp_eval.study.leaderboard import dataset_transfer_table, direct_vs_transferred_table

    d = tmp_path / "results"
    write_result(d, "dense", ppl={"ctp_c4": 20.0, "ctp_ptb": 10.0})
    for build, base in (("aaaa", 50.0), ("bbbb", 60.0)):
        write_result(d, f"none-{build}", compression="sparsegpt:0.5", build=build, ppl={"ctp_c4": base, "ctp_ptb": base})
        write_result(d, f"c4-{build}", compression="sparsegpt:0.5", build=build, prompt="c.safetensors", k=100,
                     ppl={"ctp_c4": base - 10, "ctp_ptb": base - 5})
    write_result(d, "ptb-bbbb", compression="sparsegpt:0.5", build="bbbb", prompt="p.safetensors", k=100,
                 data="ptb-train", ppl={"ctp_c4": 57.0, "ctp_ptb": 40.0})
    runs = load_runs([d])
    _, rows = dataset_transfer_table(runs)
    assert [r[:2] for r in rows] == [
        ["sparsegpt:0.5 [build aaaa]", "(no prompt)"], ["sparsegpt:0.5 [build aaaa]", "`c4-train1000[:800]`"],
        ["sparsegpt:0.5 [build bbbb]", "(no prompt)"], ["sparsegpt:0.5 [build bbbb]", "`c4-train1000[:800]`"],
        ["sparsegpt:0.5 [build bbbb]", "`ptb-train`"]]
    assert rows[2][2:] == ["60.00", "60.00"] and rows[4][2:] == ["57.00", "40.00"]
    _, rows = direct_vs_transferred_table(runs)
    assert rows == [["sparsegpt:0.5 [build bbbb]", "PTB", "paper", "`ptb-train`", "60.00", "40.00", "55.00"]]


def test_baseline_is_the_no_prompt_row_of_the_same_model_spec_and_build(tmp_path):
    from ctp_eval.study.runs import baseline

    d = tmp_path / "results"
    write_result(d, "none-a", compression="gptq:w4", build="aaaa", ppl={"ctp_c4": 50.0})
    write_result(d, "none-b", compression="gptq:w4", build="bbbb", ppl={"ctp_c4": 60.0})
    write_result(d, "none-other", compression="gptq:w4", build="bbbb", model="other", ppl={"ctp_c4": 70.0})
    write_result(d, "prompt-b", compression="gptq:w4", build="bbbb", prompt="p.safetensors", k=100, ppl={"ctp_c4": 40.0})
    write_result(d, "prompt-c", compression="gptq:w4", build="cccc", prompt="p.safetensors", k=100, ppl={"ctp_c4": 45.0})
    runs = {(r.model, r.build, r.kind): r for r in load_runs([d])}
    assert baseline(list(runs.values()), runs["tiny", "bbbb", "learned"]).values["ctp_c4"] == 60.0
    assert baseline(list(runs.values()), runs["tiny", "cccc", "learned"]) is None  # no row of its build: no gap

"""The unmodified `lm_eval` executable finds `ctp` (via the installed .pth hook), runs it, writes results JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctp_eval.prompt import SoftPrompt

BIN = Path(sys.executable).parent

MC_DOCS = [
    {"q": "The quick brown fox", "choices": [" jumps over the lazy dog.", " of France."], "label": 0},
    {"q": "Paris is the capital", "choices": [" seven eight", " of France."], "label": 1},
    {"q": "one two three four", "choices": [" five six", " capital"], "label": 0},
]


def env():
    e = dict(os.environ)
    e.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return e


@pytest.fixture(scope="module")
def tiny_task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tasks")
    data = d / "mc.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in MC_DOCS))
    (d / "tiny_mc.yaml").write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1
"""
    )
    (d / "tiny_gen.yaml").write_text(
        f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1
"""
    )
    return d


@pytest.fixture(scope="module")
def prompt_path(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path = tmp_path_factory.mktemp("p") / "prompt.safetensors"
    SoftPrompt.for_model(torch.randn(6, 64) * 0.5, model, tok).save(path)
    return path


def read_results(out: Path) -> dict:
    files = sorted(out.rglob("results_*.json"))
    assert files, f"no results JSON under {out}"
    return json.loads(files[-1].read_text())


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


def test_stock_lm_eval_runs_ctp_end_to_end(tiny_llama_dir, tiny_task_dir, prompt_path, tmp_path):
    out = tmp_path / "out"
    run([str(BIN / "lm_eval"), "--model", "ctp",
         "--model_args", f"pretrained={tiny_llama_dir},prompt={prompt_path},dtype=float32",
         "--device", "cpu", "--batch_size", "2", "--tasks", "tiny_mc,tiny_gen",
         "--include_path", str(tiny_task_dir), "--output_path", str(out)])
    res = read_results(out)
    assert res["config"]["model"] == "ctp"
    assert res["config"]["ctp_prompt_k"] == 6 and res["config"]["ctp_compression"] == "none"
    acc = res["results"]["tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert "exact_match,none" in res["results"]["tiny_gen"]

    # The same accuracy from the model in-process: the CLI path adds nothing of its own.
    from lm_eval.api.instance import Instance

    from ctp_eval.eval.lm import CTPLM

    lm = CTPLM(pretrained=str(tiny_llama_dir), prompt=str(prompt_path), dtype="float32", device="cpu")
    correct = 0
    for doc in MC_DOCS:
        lls = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", doc, (doc["q"], c), 0) for c in doc["choices"]])]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == doc["label"])
    assert acc == pytest.approx(correct / len(MC_DOCS))


def test_ctp_eval_wrapper_defaults_to_ctp_model(tiny_llama_dir, tiny_task_dir, tmp_path):
    out = tmp_path / "out"
    run([str(BIN / "ctp-eval"), "--model_args", f"pretrained={tiny_llama_dir},dtype=float32", "--device", "cpu",
         "--tasks", "tiny_mc", "--include_path", str(tiny_task_dir), "--output_path", str(out)])
    res = read_results(out)
    assert res["config"]["model"] == "ctp" and res["config"]["ctp_prompt_k"] == 0


def test_builtin_models_still_registered_and_import_is_cheap():
    code = (
        "import sys, ctp_eval\n"
        "assert 'torch' not in sys.modules and 'lm_eval' not in sys.modules, 'import ctp_eval must stay cheap'\n"
        "import lm_eval.models\n"
        "from lm_eval.api.registry import model_registry\n"
        "assert 'torch' not in sys.modules, 'registration must not import torch'\n"
        "assert all(m in model_registry for m in ('ctp', 'hf', 'vllm', 'steered', 'dummy'))\n"
        "from lm_eval.api.registry import get_model\n"
        "cls = get_model('ctp')\n"
        "from lm_eval.models.huggingface import HFLM\n"
        "assert issubclass(cls, HFLM) and cls.__name__ == 'CTPLM'\n"
        "print('ok')\n"
    )
    proc = run([sys.executable, "-c", code])
    assert proc.stdout.strip().endswith("ok")


def test_task_manager_finds_ctp_tasks_without_include_path():
    code = (
        "from lm_eval.tasks import TaskManager\n"
        "from ctp_eval._hook import tasks_dir\n"
        "import os\n"
        "tm = TaskManager()\n"
        "names = set(tm.all_tasks)\n"
        "ours = {f[:-5] for f in os.listdir(tasks_dir()) if f.endswith('.yaml')}\n"
        "print(sorted(n for n in names if n.startswith('ctp_')))\n"
        "assert any(n.startswith('ctp_') for n in names), names\n"
    )
    proc = run([sys.executable, "-c", code])
    assert "ctp_" in proc.stdout

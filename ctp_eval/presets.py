"""The one registry of named choices: the paper's compression specs, the task sets, the training recipes.

Everything that lists specs, tasks or recipes (ctp-bench, the leaderboard, the study drivers, the benchmarks,
the `ctp_paper` task group, checked by a test) reads them here. No torch import.
"""

from __future__ import annotations

# The paper's grid (Figure 3, Table 4): 2/3/4-bit GPTQ, 50-75 % SparseGPT, and both jointly.
PAPER_SPECS = ("gptq:w4", "gptq:w3g128", "gptq:w2g64", "sparsegpt:0.5", "sparsegpt:0.625", "sparsegpt:0.75",
               "sparsegpt:0.5+gptq:w4")
# The same grid with every quantizer grouped by 128 columns: what `bench/compress.py` times at 7B shapes.
GROUPED_SPECS = ("gptq:w4g128", "gptq:w3g128", "gptq:w2g128", "sparsegpt:0.5", "sparsegpt:0.625", "sparsegpt:0.75",
                 "sparsegpt:0.5+gptq:w4g128")

# Task name -> the short name tables print. Perplexity tasks follow `ctp_eval.eval.ppl`'s protocol.
PPL_TASKS = {"ctp_c4": "C4", "ctp_wikitext2": "WikiText-2", "ctp_ptb": "PTB"}
MC_TASKS = {
    "ctp_openbookqa": "OBQA",
    "ctp_hellaswag": "HellaSwag",
    "ctp_piqa": "PIQA",
    "ctp_mmlu_hs_european_history": "MMLU hs-eu-hist",
}
CASE_STUDY_TASK = "ctp_case_study"  # greedy answers to short questions, read side by side (the paper's Figure 1)
PAPER_TASK_GROUP = "ctp_paper"  # tasks/ctp_paper.yaml: exactly PPL_TASKS then MC_TASKS
PAPER_TASKS = (*PPL_TASKS, *MC_TASKS)

# ctp-train's paper defaults of the recipe flags ctp-bench passes through (anything else must be named).
PAPER_RECIPE = dict(lr=None, lr_schedule="linear", warmup_steps=None, init="vocab", loss="ce", kd_weight=0.5,
                    teacher_topk=0, train_dtype=None, seed=0)
# The recipe the recipe study chose for full runs: cross-entropy at lr 3e-2, selected at 1,024 tokens.
STUDY_RECIPE = dict(recipe="ce-lr3e-2", loss="ce", lr=3e-2)
# `ctp-bench --quick`: distillation at lr 3e-2, the setting its published 30-step timing used (per step, the
# study found CE and KD within 4 points of each other at every lr; CE is cheaper per token).
QUICK_RECIPE = dict(recipe="kd", loss="kd", lr=3e-2)

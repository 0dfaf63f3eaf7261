"""The generation case study (the paper's Figure 1 in spirit): short factual questions written for this project,
answered greedily, so that a dense, a compressed and a prompted model can be read side by side.

`questions` is the task's `custom_dataset` (the questions ship with the task folder: no data directory needed);
`contains_answer` scores an answer 1 when it names one of the accepted answers (case-insensitive), a coarse
companion to reading the answers themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = Path(__file__).with_name("case_study_questions.jsonl")


def questions(**kwargs):
    import datasets

    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def contains_answer(doc: dict, results: list[str]) -> dict:
    answer = results[0].lower()
    return {"contains_answer": float(any(a.lower() in answer for a in doc["answers"]))}

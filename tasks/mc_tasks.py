"""Dataset loaders for the zero-shot multiple-choice tasks (ctp_openbookqa, ctp_hellaswag, ctp_piqa,
ctp_mmlu_hs_european_history).

Each is an lm-eval `custom_dataset`: lm-eval calls it with the task's metadata (YAML metadata, `--metadata`
and the model args merged) as keyword arguments and expects a `datasets.DatasetDict`. Local files are read
when a data directory is given (`data_dir` in the metadata, else $CTP_DATA_DIR; layout of shared/data) and
converted to the *hub* schema of the data set lm-eval's built-in task loads, so the YAMLs can mirror the
built-in prompts unchanged; otherwise the built-in's hub data set is loaded. Resolution and the error when
neither works come from ctp_eval.data (one source of truth).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ctp_eval.data import (
    DataUnavailableError,
    local_or_hub,
    read_jsonl,
    unavailable_message,
)


def _dataset_dict(splits: dict[str, list[dict]]):
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataUnavailableError(unavailable_message(what, f"{path} does not exist"))
    return path


def _hub(*args, **kwargs):
    def load():
        import datasets

        return datasets.load_dataset(*args, **kwargs)

    return load


# ---------------------------------------------------------------- OpenBookQA (hub: allenai/openbookqa, main)


def _obqa_row(row: dict) -> dict:
    # official jsonl nests the stem and choices; the hub flattens them (question_stem, choices.{text,label})
    choices = row["question"]["choices"]
    return {
        "id": row["id"],
        "question_stem": row["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": row["answerKey"],
    }


def openbookqa(data_dir=None, **_):
    def local(root: Path):
        d = root / "openbookqa"
        return _dataset_dict({
            "validation": [_obqa_row(r) for r in read_jsonl(_need(d / "main_dev.jsonl", "OpenBookQA"))],
            "test": [_obqa_row(r) for r in read_jsonl(_need(d / "main_test.jsonl", "OpenBookQA"))],
        })

    return local_or_hub("OpenBookQA", data_dir, local, _hub("allenai/openbookqa", "main"))


# ---------------------------------------------------------------- HellaSwag (hub: Rowan/hellaswag)


def hellaswag(data_dir=None, **_):
    def local(root: Path):
        rows = read_jsonl(_need(root / "hellaswag" / "hellaswag_val.jsonl", "HellaSwag"))
        for row in rows:
            row["label"] = str(row["label"])  # the hub stores labels as strings; lm-eval's process_docs int()s them
        return _dataset_dict({"validation": rows})

    return local_or_hub("HellaSwag", data_dir, local, _hub("Rowan/hellaswag"))


def hellaswag_process_docs(dataset):
    # Reuse lm-eval's own preprocessing instead of copying it: identical prompts by construction.
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)


# ---------------------------------------------------------------- PIQA (hub: baber/piqa)


def piqa(data_dir=None, **_):
    def local(root: Path):
        d = root / "piqa"
        rows = read_jsonl(_need(d / "valid.jsonl", "PIQA"))
        labels = _need(d / "valid-labels.lst", "PIQA").read_text(encoding="utf-8").split()
        if len(labels) != len(rows):
            raise DataUnavailableError(f"PIQA: {len(rows)} questions but {len(labels)} labels in {d}")
        return _dataset_dict({
            "validation": [
                {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
                for r, y in zip(rows, labels)
            ]
        })

    return local_or_hub("PIQA", data_dir, local, _hub("baber/piqa"))


# ---------------------------------------------------------------- MMLU (hub: cais/mmlu, one subject)


def _mmlu_rows(path: Path, subject: str) -> list[dict]:
    with open(_need(path, "MMLU"), newline="", encoding="utf-8") as f:
        return [
            {"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans.strip())}
            for q, a, b, c, d, ans in csv.reader(f)
        ]


def mmlu(data_dir=None, subject: str = "high_school_european_history", **_):
    def local(root: Path):
        d = root / "mmlu"
        return _dataset_dict({
            "dev": _mmlu_rows(d / "dev" / f"{subject}_dev.csv", subject),
            "validation": _mmlu_rows(d / "val" / f"{subject}_val.csv", subject),
            "test": _mmlu_rows(d / "test" / f"{subject}_test.csv", subject),
        })

    return local_or_hub(f"MMLU {subject}", data_dir, local, _hub("cais/mmlu", subject))

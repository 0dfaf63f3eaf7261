"""Text corpora for perplexity, calibration and prompt training: one loader, local files first, then the hub.

Resolution, in order (the same for every corpus and for the lm-eval tasks in `tasks/`):

1. a data directory: the `data_dir` argument, else `$CTP_DATA_DIR`, laid out as `shared/data/README.md` says;
2. the HF hub through `datasets.load_dataset` (the GPTQ / paper sources);
3. otherwise one `DataUnavailableError` naming both ways to supply the data.

C4 needs care because only 1,000 C4 documents exist offline (the first 1,000 of `en` *train* shard 0), and
the paper reports C4 perplexity on the first 1,100 documents of `en` *validation* shard 0. We therefore fix
one split of the 1,000 train documents, here and nowhere else:

    train      = docs   0-799   prompt learning and compression calibration
    validation = docs 800-899   best-checkpoint selection
    test       = docs 900-999   the C4 perplexity we report offline ("c4-train1000[900:]")

From the hub, `train` / `validation` are the same documents (they are the first 1,000 of the same shard), and
`test` is the paper's "c4-val1100". The two test sets are different data, so every result carries
`corpus_source(...)` and the two must never be compared as if equal.

Joining follows GPTQ's `datautils.py`: WikiText-2 rows with "\\n\\n", PTB sentences and C4 documents with " ".
"""

from __future__ import annotations

import json
import logging
import os
import random
import weakref
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

# Splits a prompt may be trained on; never test, the split every table evaluates on.
TRAIN_SPLITS = ("train", "validation")

DATA_DIR_ENV = "CTP_DATA_DIR"

C4_LOCAL_FILE = "c4/c4_en_train_shard00000_first1000.jsonl"
C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
C4_VAL_SHARD = "en/c4-validation.00000-of-00008.json.gz"
# Document ranges of the 1,000 C4 train docs (see module docstring). Changing them changes every C4 result.
C4_SPLITS = {"train": (0, 800), "validation": (800, 900), "test": (900, 1000)}
C4_VAL_DOCS = 1100  # the paper's (and GPTQ's) C4 evaluation slice when the hub is reachable

CORPORA = ("c4", "wikitext2", "ptb")
SPLITS = ("train", "validation", "test")
# Separator used to join a corpus' rows into the one string that is tokenized (GPTQ datautils.py).
JOINERS = {"wikitext2": "\n\n", "ptb": " ", "c4": " "}


class DataUnavailableError(RuntimeError):
    """Neither a data directory nor the HF hub could supply a data set."""


def unavailable_message(what: str, detail: str = "") -> str:
    """The one error text used whenever data cannot be found (also by the lm-eval task loaders)."""
    msg = (
        f"Cannot load {what}: no local copy and the HF hub is not reachable. Supply the data either by "
        f"pointing ${DATA_DIR_ENV} (or the `data_dir` task/model argument, e.g. "
        f"--metadata '{{\"data_dir\": \"/path/to/data\"}}') at a data directory laid out like shared/data "
        f"(see its README.md), or by giving this process access to the Hugging Face hub."
    )
    return f"{msg} ({detail})" if detail else msg


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory to read: `data_dir`, else $CTP_DATA_DIR, else None (meaning: use the hub).

    A directory that is named but does not exist is an error, not a silent fall-back to the hub.
    """
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        source = "data_dir" if data_dir not in (None, "") else f"${DATA_DIR_ENV}"
        raise DataUnavailableError(f"{source}={chosen!s} is not a directory")
    return path


def local_or_hub(what: str, data_dir, local_fn: Callable[[Path], object], hub_fn: Callable[[], object]):
    """Run `local_fn(dir)` when a data dir is set, else `hub_fn()`; turn hub failures into one clear error.

    Local failures (a missing file inside a named data dir) are raised as they are: falling back to the hub
    would silently change which data a number was computed on.
    """
    root = resolve_data_dir(data_dir)
    if root is not None:
        return local_fn(root)
    try:
        return hub_fn()
    except Exception as err:  # datasets raises many types when offline (ConnectionError, OfflineModeIsEnabled, ...)
        raise DataUnavailableError(unavailable_message(what, f"hub error: {type(err).__name__}: {err}")) from err


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataUnavailableError(unavailable_message(what, f"{path} does not exist"))
    return path


def read_jsonl(path: Path, field: str | None = None) -> list:
    """Rows of a JSON-lines file (`field` picks one key of every row)."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row[field] for row in rows] if field else rows


def _check(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name not in CORPORA and not _is_path(name):
        raise ValueError(f"unknown corpus {name!r}: use one of {CORPORA} or a path to a .txt/.jsonl file")


def _is_path(name: str) -> bool:
    return name.endswith((".txt", ".jsonl")) and os.path.isfile(name)


# ---------------------------------------------------------------- per-corpus loaders


def _c4_local(root: Path, split: str) -> list[str]:
    docs = read_jsonl(_require(root / C4_LOCAL_FILE, "C4"), "text")
    lo, hi = C4_SPLITS[split]
    return docs[lo:hi]


def _c4_hub(split: str) -> list[str]:
    import datasets

    if split == "test":
        ds = datasets.load_dataset("allenai/c4", data_files={"validation": C4_VAL_SHARD}, split="validation")
        return list(ds[:C4_VAL_DOCS]["text"])
    ds = datasets.load_dataset("allenai/c4", data_files={"train": C4_TRAIN_SHARD}, split="train")
    lo, hi = C4_SPLITS[split]
    return list(ds[lo:hi]["text"])


def _wikitext2_local(root: Path, split: str) -> list[str]:
    if split == "train":
        raise DataUnavailableError(
            "WikiText-2 train is not in the offline data directory (only validation and test are); "
            "use the hub, another corpus (e.g. c4), or train on validation (ctp-train --data-split validation)."
        )
    return read_jsonl(_require(root / "wikitext2" / f"wikitext2_raw_{split}.jsonl", "WikiText-2"), "text")


def _wikitext2_hub(split: str) -> list[str]:
    import datasets

    return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def _ptb_local(root: Path, split: str) -> list[str]:
    fname = {"train": "ptb.train.txt", "validation": "ptb.valid.txt", "test": "ptb.test.txt"}[split]
    text = _require(root / "ptb" / fname, "PTB").read_text(encoding="utf-8")
    # HF ptb_text_only's `sentence` is the file line with .strip() applied.
    return [line.strip() for line in text.split("\n")[: text.count("\n")]]


def _ptb_hub(split: str) -> list[str]:
    import datasets

    return list(datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"])


_LOADERS = {"c4": (_c4_local, _c4_hub), "wikitext2": (_wikitext2_local, _wikitext2_hub), "ptb": (_ptb_local, _ptb_hub)}


def load_texts(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> list[str]:
    """The rows of a corpus split, in order (documents for C4, rows for WikiText-2, sentences for PTB).

    `name` is "c4", "wikitext2", "ptb", or a path to a local `.txt` (the whole file is one text; `split` is
    ignored) or `.jsonl` file (its "text" field, one row per line).
    """
    _check(name, split)
    if _is_path(name):
        if name.endswith(".jsonl"):
            return read_jsonl(Path(name), "text")
        return [Path(name).read_text(encoding="utf-8")]
    local_fn, hub_fn = _LOADERS[name]
    return local_or_hub(f"{name} {split}", data_dir, lambda root: local_fn(root, split), lambda: hub_fn(split))


def corpus_text(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> str:
    """The single string a perplexity protocol tokenizes: the rows joined per GPTQ (see JOINERS)."""
    return JOINERS.get(name, "\n\n").join(load_texts(name, split, data_dir))


def corpus_source(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> str:
    """Human-readable name of exactly which data `corpus_text(name, split, data_dir)` reads.

    e.g. "wikitext2-test", "ptb-test", "c4-train1000[900:]" (offline C4 test), "c4-val1100" (hub C4 test).
    """
    _check(name, split)
    if _is_path(name):
        return os.path.basename(name)
    if name != "c4":
        return f"{name}-{split}"
    if resolve_data_dir(data_dir) is None and split == "test":
        return f"c4-val{C4_VAL_DOCS}"
    lo, hi = C4_SPLITS[split]
    return f"c4-train1000[{lo or ''}:{'' if hi == 1000 else hi}]"


# ---------------------------------------------------------------- tokenized views

# Token streams per tokenizer object, dropped with the tokenizer (tests build many throw-away tokenizers).
_STREAMS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens: the prompt, not a BOS, starts a window (matches the
    lm-eval route, which calls `lm.tok_encode(text, add_special_tokens=False)`)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def token_stream(tokenizer, name: str, split: str = "test", data_dir: str | os.PathLike | None = None):
    """The whole corpus split tokenized once, as a LongTensor (N,); cached in memory per tokenizer."""
    import torch

    key = (name, split, str(resolve_data_dir(data_dir)))
    try:
        cache = _STREAMS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: just don't cache
        cache = {}
    if key not in cache:
        cache[key] = torch.tensor(encode(tokenizer, corpus_text(name, split, data_dir)), dtype=torch.long)
    return cache[key]


def random_segments(
    tokenizer,
    name: str = "c4",
    split: str = "train",
    n: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
):
    """GPTQ-style calibration batch, LongTensor (n, seqlen): pick a random document with more than `seqlen`
    tokens, take a random crop of `seqlen` tokens from it, repeat `n` times. Seeded and deterministic.

    Unlike GPTQ (which loops until it happens to draw a long document) we tokenize the split once and draw
    only among long-enough documents, so a corpus without any fails at once with a clear error.
    """
    import torch

    docs = load_texts(name, split, data_dir)
    long_enough = [ids for ids in (encode(tokenizer, d) for d in docs) if len(ids) > seqlen]
    if not long_enough:
        raise ValueError(
            f"no document of {corpus_source(name, split, data_dir)} has more than seqlen={seqlen} tokens "
            f"({len(docs)} documents); use a smaller seqlen or a corpus with longer documents"
        )
    if len(long_enough) < n:
        logger.warning(
            "only %d of %d documents of %s exceed %d tokens; the %d segments will reuse documents",
            len(long_enough), len(docs), corpus_source(name, split, data_dir), seqlen, n,
        )
    rng = random.Random(seed)  # local generator: never touches global RNG state
    out = torch.empty(n, seqlen, dtype=torch.long)
    for row in range(n):
        ids = long_enough[rng.randrange(len(long_enough))]
        start = rng.randrange(len(ids) - seqlen)
        out[row] = torch.tensor(ids[start : start + seqlen])
    return out

"""ctp_eval.data: local-first resolution, the fixed C4 split, GPTQ joining, calibration segments."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA_DIR

from ctp_eval import data


@pytest.fixture
def offline(monkeypatch):
    """No data dir and a hub that fails the way `datasets` does offline."""
    import datasets

    def no_hub(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", no_hub)


@pytest.fixture
def local(monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(DATA_DIR))


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.resolve_data_dir() is None
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.resolve_data_dir() == tmp_path
    assert data.resolve_data_dir(DATA_DIR) == DATA_DIR  # the argument wins over the environment
    with pytest.raises(data.DataUnavailableError, match="not a directory"):
        data.resolve_data_dir(tmp_path / "missing")


def test_no_data_anywhere_names_both_ways(offline):
    with pytest.raises(data.DataUnavailableError) as err:
        data.load_texts("wikitext2", "test")
    assert data.DATA_DIR_ENV in str(err.value) and "hub" in str(err.value)


def test_c4_split_is_fixed_and_disjoint(local):
    raw = data.read_jsonl(DATA_DIR / data.C4_LOCAL_FILE, "text")
    splits = {s: data.load_texts("c4", s) for s in data.SPLITS}
    assert [len(splits[s]) for s in data.SPLITS] == [800, 100, 100]
    assert splits["train"] + splits["validation"] + splits["test"] == raw
    assert [data.corpus_source("c4", s) for s in data.SPLITS] == [
        "c4-train1000[:800]", "c4-train1000[800:900]", "c4-train1000[900:]"
    ]
    assert data.corpus_text("c4", "test") == " ".join(raw[900:])


def test_hub_c4_test_is_named_differently(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.corpus_source("c4", "test") == "c4-val1100"
    assert data.corpus_source("c4", "train") == "c4-train1000[:800]"  # same docs as offline


def test_wikitext2_and_ptb_join_like_gptq(local):
    rows = [json.loads(line)["text"] for line in open(DATA_DIR / "wikitext2" / "wikitext2_raw_test.jsonl")]
    assert len(rows) == 4358
    assert data.corpus_text("wikitext2", "test") == "\n\n".join(rows)
    assert data.corpus_source("wikitext2", "test") == "wikitext2-test"
    lines = (DATA_DIR / "ptb" / "ptb.test.txt").read_text().splitlines()
    assert data.load_texts("ptb", "test") == [line.strip() for line in lines]
    assert len(data.load_texts("ptb", "train")) == 42068
    assert data.corpus_text("ptb", "validation").startswith("consumers may want")


def test_wikitext2_train_offline_is_a_clear_error(local):
    with pytest.raises(data.DataUnavailableError, match="train"):
        data.load_texts("wikitext2", "train")


def test_bad_names(local):
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_texts("c5", "test")
    with pytest.raises(ValueError, match="split"):
        data.load_texts("c4", "dev")


def _jsonl(tmp_path, docs):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def test_token_stream_is_cached(tiny_tokenizer, tmp_path):
    path = _jsonl(tmp_path, ["one two three", "four five six"])
    ids = data.token_stream(tiny_tokenizer, path, "train")
    assert ids.dtype == torch.long and ids.tolist() == tiny_tokenizer.encode(
        "one two three\n\nfour five six", add_special_tokens=False
    )
    assert data.token_stream(tiny_tokenizer, path, "train") is ids


def test_random_segments_gptq_style(tiny_tokenizer, tmp_path):
    docs = ["short doc", " ".join(f"word{i}" for i in range(200)), " ".join(f"fox{i}" for i in range(300))]
    path = _jsonl(tmp_path, docs)
    seg = data.random_segments(tiny_tokenizer, path, "train", n=6, seqlen=20, seed=3)
    assert seg.shape == (6, 20) and seg.dtype == torch.long
    assert torch.equal(seg, data.random_segments(tiny_tokenizer, path, "train", n=6, seqlen=20, seed=3))
    assert not torch.equal(seg, data.random_segments(tiny_tokenizer, path, "train", n=6, seqlen=20, seed=4))
    encoded = [tiny_tokenizer.encode(d, add_special_tokens=False) for d in docs]
    for row in seg.tolist():  # every segment is a contiguous crop of one long-enough document
        assert any(
            doc[i : i + 20] == row for doc in encoded if len(doc) > 20 for i in range(len(doc) - 20)
        )
    with pytest.raises(ValueError, match="seqlen"):
        data.random_segments(tiny_tokenizer, path, "train", n=2, seqlen=100_000)

"""`ctp-compress`: compress into the cache, copy out, and the copy loads as an ordinary checkpoint."""

from __future__ import annotations

import json

import pytest

from ctp_eval.cli import compress_main


def test_ctp_compress_writes_a_loadable_checkpoint(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from conftest import DATA_DIR

    monkeypatch.setenv("CTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CTP_DATA_DIR", str(DATA_DIR))
    out = tmp_path / "w4"
    compress_main(["--spec", "sparsegpt:0.5", "--model", str(tiny_llama_dir), "--out", str(out),
                   "--nsamples", "4", "--seqlen", "32"])
    assert capsys.readouterr().out.strip().endswith(str(out))
    info = json.loads((out / "ctp_compression.json").read_text())
    assert info["spec"] == "sparsegpt:0.5"
    from ctp_eval.eval.lm import CTPLM

    lm = CTPLM(pretrained=str(out), device="cpu", dtype="float32")
    w = lm.model.model.layers[1].self_attn.q_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6)
    assert lm.get_model_info()["ctp_compression"] == "sparsegpt:0.5"
    with pytest.raises(SystemExit, match="exists"):
        compress_main(["--spec", "sparsegpt:0.5", "--model", str(tiny_llama_dir), "--out", str(out),
                       "--nsamples", "4", "--seqlen", "32"])


def test_ctp_compress_rejects_bad_spec():
    with pytest.raises(SystemExit, match="Valid forms"):
        compress_main(["--spec", "prune:lots"])


def test_damp_and_blocksize_reach_the_solver(tiny_llama_dir, tmp_path, monkeypatch):
    """--damp / --blocksize are solver options: recorded in the entry, part of its cache key, and passed to GPTQ."""
    from conftest import DATA_DIR

    from ctp_eval.compress import apply

    monkeypatch.setenv("CTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CTP_DATA_DIR", str(DATA_DIR))
    seen = []
    real = apply.gptq_solve

    def spy(W, H, **kw):
        seen.append((kw.get("damp"), kw.get("blocksize")))
        return real(W, H, **kw)

    monkeypatch.setattr(apply, "gptq_solve", spy)
    args = ["--spec", "gptq:w4", "--model", str(tiny_llama_dir), "--nsamples", "4", "--seqlen", "32"]
    compress_main(args + ["--out", str(tmp_path / "a")])
    compress_main(args + ["--damp", "0.1", "--blocksize", "16", "--out", str(tmp_path / "b")])
    a, b = (json.loads((tmp_path / n / "ctp_compression.json").read_text()) for n in "ab")
    assert a["cache_key"] != b["cache_key"]
    assert (b["options"]["damp"], b["options"]["blocksize"]) == (0.1, 16)
    assert seen and seen[-1] == (0.1, 16) and seen[0] != (0.1, 16)

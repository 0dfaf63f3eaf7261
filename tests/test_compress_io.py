"""Compressed checkpoints and the compress-on-load cache, on a saved tiny Llama with a local calibration file."""


import pytest
import torch
from safetensors.torch import load_file

from ctp_eval import models
from ctp_eval.compress import io as cio
from ctp_eval.compress.apply import block_linears, find_blocks
from ctp_eval.compress.io import CalibConfig, ensure_compressed, read_compression_info


def _load(path):
    model, _ = models.load_model_and_tokenizer(path)
    _, blocks = find_blocks(model)
    return model, {f"{i}.{n}": m.weight for i, b in enumerate(blocks) for n, m in block_linears(b).items()}


def test_compress_save_load_and_cache(tiny_llama_dir, calib, tmp_path, monkeypatch):
    out = ensure_compressed(str(tiny_llama_dir), "gptq:w4g16", calib=calib, cache_dir=tmp_path, progress=False)
    info = read_compression_info(out)
    assert info["spec"] == "gptq:w4g16" and info["format"] == cio.FORMAT
    assert {k: info["calibration"][k] for k in ("nsamples", "seqlen", "seed")} == {"nsamples": 4, "seqlen": 16, "seed": 0}
    assert info["calibration"]["source"] == "calib.jsonl"
    assert info["stats"]["n_linear"] == 14 and info["versions"]["ctp_eval"]
    assert models.model_id(out) == info["base_model"]

    # an ordinary HF folder: plain from_pretrained gives the fake-quantized weights
    _, weights = _load(out)
    for w in weights.values():
        assert max(r.unique().numel() for r in w[:, :16]) <= 16
    # the saved grids reproduce the weights (what packed export needs)
    qp = load_file(f"{out}/{cio.QPARAMS_FILE}")
    name = "model.layers.0.self_attn.q_proj"
    w = weights["0.self_attn.q_proj"]
    g = qp[f"{name}.g_idx"].long()
    scale, zero = qp[f"{name}.scale"][:, g], qp[f"{name}.zero"][:, g]
    torch.testing.assert_close(scale * (torch.round(w / scale + zero) - zero), w, rtol=0, atol=1e-6)

    # cache hit: no second compression
    monkeypatch.setattr(cio, "compress_model", lambda *a, **k: pytest.fail("recompressed on a cache hit"))
    assert ensure_compressed(str(tiny_llama_dir), "GPTQ:W4G16", calib=calib, cache_dir=tmp_path) == out
    # a saved checkpoint passed with its own spec is used as is; stacking another spec is refused
    assert ensure_compressed(out, "gptq:w4g16") == out
    with pytest.raises(ValueError, match="already compressed"):
        ensure_compressed(out, "gptq:w3")
    assert ensure_compressed(str(tiny_llama_dir), "none") == str(tiny_llama_dir)


def test_cache_key_and_determinism(tiny_llama_dir, calib, tmp_path):
    spec = "sparsegpt:0.5+gptq:w4"
    a = ensure_compressed(str(tiny_llama_dir), spec, calib=calib, cache_dir=tmp_path / "a", progress=False)
    b = ensure_compressed(str(tiny_llama_dir), spec, calib=calib, cache_dir=tmp_path / "b", progress=False)
    wa, wb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same data -> identical checkpoint
    other_seed = CalibConfig(**{**calib.__dict__, "seed": 1})
    c = ensure_compressed(str(tiny_llama_dir), spec, calib=other_seed, cache_dir=tmp_path / "a", progress=False)
    assert c != a
    # calibration-free specs ignore the calibration config in their key
    r1 = ensure_compressed(str(tiny_llama_dir), "rtn:w4", calib=calib, cache_dir=tmp_path / "a", progress=False)
    r2 = ensure_compressed(str(tiny_llama_dir), "rtn:w4", calib=other_seed, cache_dir=tmp_path / "a", progress=False)
    assert r1 == r2 and read_compression_info(r1)["calibration"] is None
    _, weights = _load(a)
    for w in weights.values():
        assert (w == 0).float().mean() >= 0.5


def test_default_cache_dir_env(tiny_llama_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    out = ensure_compressed(str(tiny_llama_dir), "magnitude:2:4", progress=False)
    assert out.startswith(str(tmp_path / "compressed"))
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "compressed").iterdir())


def test_model_identity(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    embedded = tmp_path / "models" / models.EMBEDDED_ID
    embedded.mkdir(parents=True)
    # the lm-eval model passes the resolved embedded folder: it must key like pretrained=None
    assert cio._model_identity(str(embedded)) == cio._model_identity(None) == (models.EMBEDDED_ID,) * 2
    other = tmp_path / "a" / "same-name"
    other.mkdir(parents=True)
    assert cio._model_identity(str(other)) == ("same-name", str(other.resolve()))
    assert cio._model_identity("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M",) * 2

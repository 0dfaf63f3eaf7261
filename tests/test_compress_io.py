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
    ident = lambda x: tuple(vars(models.model_identity(x)).values())  # noqa: E731  (name, key)
    assert ident(str(embedded)) == ident(None) == (models.EMBEDDED_ID,) * 2
    other = tmp_path / "a" / "same-name"
    other.mkdir(parents=True)
    assert ident(str(other)) == ("same-name", str(other.resolve()))
    assert ident("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M",) * 2


# ---------------------------------------------------------------- damaged folders


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _count_compressions(monkeypatch) -> list:
    calls = []
    real = cio.compress_model

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(cio, "compress_model", counting)
    return calls


def test_saved_folder_records_file_sizes_and_checksums(tiny_llama_dir, tmp_path, monkeypatch):
    import hashlib
    import json
    from pathlib import Path

    out = Path(ensure_compressed(str(tiny_llama_dir), "rtn:w4", cache_dir=tmp_path, progress=False))
    files = read_compression_info(out)["files"]
    on_disk = {p.name for p in out.iterdir()} - {cio.INFO_FILE}
    assert set(files) == on_disk and {"model.safetensors", "config.json", cio.QPARAMS_FILE} <= on_disk
    weights = out / "model.safetensors"
    assert files["model.safetensors"] == {"size": weights.stat().st_size,
                                          "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}

    # an entry written before the map: still a cache hit, and the same build id (the map is not fingerprinted)
    build = cio.build_id(out)
    info = json.loads((out / cio.INFO_FILE).read_text())
    del info["files"]
    (out / cio.INFO_FILE).write_text(json.dumps(info))
    calls = _count_compressions(monkeypatch)
    assert ensure_compressed(str(tiny_llama_dir), "rtn:w4", cache_dir=tmp_path) == str(out)
    assert calls == [] and cio.build_id(out) == build


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_cache_entry_is_named_and_rebuilt(damage, tiny_llama_dir, tmp_path, monkeypatch, caplog):
    from pathlib import Path

    out = Path(ensure_compressed(str(tiny_llama_dir), "rtn:w4", cache_dir=tmp_path, progress=False))
    weights = out / "model.safetensors"
    good = weights.read_bytes()
    if damage == "truncate":
        _truncate(weights)
    elif damage == "flip":  # same size: only the checksum can tell
        weights.write_bytes(good[:-100] + bytes([good[-100] ^ 1]) + good[-99:])
    else:
        weights.unlink()
    calls = _count_compressions(monkeypatch)
    with caplog.at_level("WARNING", logger=cio.__name__):
        again = ensure_compressed(str(tiny_llama_dir), "rtn:w4", cache_dir=tmp_path, progress=False)
    assert again == str(out) and len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(out) in warnings[0] and "model.safetensors" in warnings[0]
    assert weights.read_bytes() == good  # RTN is deterministic
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing left aside

    # a waiting rank (lookup_only) never loads a damaged entry: it is removed and the rank keeps waiting
    _truncate(weights)
    assert ensure_compressed(str(tiny_llama_dir), "rtn:w4", cache_dir=tmp_path, lookup_only=True) is None
    assert not out.exists() and len(calls) == 1


def test_damaged_user_folder_is_refused_with_the_rebuild_command(tiny_llama_dir, calib, tmp_path, monkeypatch):
    import shlex
    import shutil

    from ctp_eval import cli

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    entry = ensure_compressed(str(tiny_llama_dir), "gptq:w4g16", calib=calib, progress=False)
    mine = tmp_path / "my-checkpoint"
    shutil.copytree(entry, mine)  # what ctp-compress --out does
    build = cio.build_id(mine)
    _truncate(mine / "model.safetensors", 0.9)
    for load in (lambda: ensure_compressed(str(mine), "gptq:w4g16"), lambda: cio.build_id(mine)):
        with pytest.raises(cio.DamagedCompressionError) as err:
            load()
        message = str(err.value)
        assert str(mine) in message and "model.safetensors" in message and "\n" not in message
    assert (mine / "model.safetensors").is_file()  # the user's folder is never deleted

    # the command in the message rebuilds the same compression: here a cache hit, copied to --out
    command = shlex.split(message.split("with: ", 1)[1])
    assert command[0] == "ctp-compress" and command[-2:] == ["--out", str(mine)]
    shutil.rmtree(mine)
    calls = _count_compressions(monkeypatch)
    cli.compress_main(command[1:])
    assert calls == [] and cio.build_id(mine) == build


def test_ctp_model_refuses_a_damaged_folder_and_rebuilds_a_damaged_cache_entry(tiny_llama_dir, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from ctp_eval.eval.lm import CTPLM

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    entry = Path(ensure_compressed(str(tiny_llama_dir), "rtn:w4", progress=False))
    mine = tmp_path / "mine"
    shutil.copytree(entry, mine)
    _truncate(mine / "model.safetensors")
    with pytest.raises(cio.DamagedCompressionError, match="mine is damaged: model.safetensors is"):
        CTPLM(pretrained=str(mine), device="cpu", dtype="float32")

    _truncate(entry / "model.safetensors")
    calls = _count_compressions(monkeypatch)
    lm = CTPLM(pretrained=str(tiny_llama_dir), compression="rtn:w4", device="cpu", dtype="float32")
    assert len(calls) == 1 and lm.compression_build == cio.build_id(entry)

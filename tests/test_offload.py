"""Device and dtype through every entry point that compresses, and the block offload.

No GPU is needed: the "meta" device stands in for the accelerator (tensors there have shapes and dtypes but no
data), and the single seam `apply._move_block` is replaced by a mover that can bring a block back from it.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file

from ctp_eval import models
from ctp_eval.compress import apply
from ctp_eval.compress import io as cio
from ctp_eval.compress.io import ensure_compressed
from ctp_eval.train import setup as trainsetup

VOCAB = 300


@pytest.fixture(scope="module")
def bf16_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama saved in bfloat16, as 7B checkpoints are."""
    path = tmp_path_factory.mktemp("tiny-llama-bf16")
    build_model("llama", vocab_size=len(tiny_tokenizer)).to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _devices(obj) -> set[str]:
    """Device types of every tensor nested in args / kwargs."""
    if torch.is_tensor(obj):
        return {obj.device.type}
    if isinstance(obj, (tuple, list)):
        return set().union(*map(_devices, obj)) if obj else set()
    if isinstance(obj, dict):
        return _devices(list(obj.values()))
    return set()


@pytest.mark.parametrize("on_host", [False, True])
def test_blocks_visit_the_device_one_at_a_time(monkeypatch, on_host):
    model = build_model("llama", vocab_size=VOCAB).to(torch.bfloat16)
    _, blocks = apply.find_blocks(model)
    index = {id(b): i for i, b in enumerate(blocks)}
    moves, solves, block_inputs, stored = [], [], [], []
    saved: dict = {}

    def mover(block, device):  # meta holds no data: keep the weights to restore them on the way back
        device = torch.device(device)
        moves.append((index[id(block)], device.type))
        if device.type == "meta":
            saved[id(block)] = copy.deepcopy(block.state_dict())
            block.to(device)
        else:
            block.to_empty(device=device)
            block.load_state_dict(saved.pop(id(block)))

    def solve(lin, H, spec, options, stats, full):
        i = int(full.split(".")[2])
        others = {p.device.type for j, b in enumerate(blocks) if j != i for p in b.parameters()}
        solves.append((i, lin.weight.device.type, lin.weight.dtype, H.device.type, H.dtype, others))
        return {}

    run_block = apply._run_block

    def spy_run_block(block, batches, device):
        stored.append(batches[0][0].device.type)  # where the calibration activations are kept
        if batches[0][0].device.type == "meta":
            return run_block(block, batches, device)
        # host activations: meta outputs cannot be copied back, so run on meta copies and return host placeholders
        outs = run_block(block, [[h.to("meta"), a, k] for h, a, k in batches], device)
        return [torch.zeros(o.shape, dtype=o.dtype) for o in outs]

    monkeypatch.setattr(apply, "_move_block", mover)
    monkeypatch.setattr(apply, "_solve_into", solve)
    monkeypatch.setattr(apply, "_run_block", spy_run_block)
    def pre_hook(block, args, kwargs):  # (where the block is, where its inputs are)
        block_inputs.append((next(block.parameters()).device.type, _devices([args, kwargs])))

    hooks = [b.register_forward_pre_hook(pre_hook, with_kwargs=True) for b in blocks]
    ids = torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    apply.compress_model(model, "gptq:w4", ids, device="meta", batch_size=2, progress=False,
                         activations_on_host=on_host)
    for h in hooks:
        h.remove()

    assert moves == [(0, "meta"), (0, "cpu"), (1, "meta"), (1, "cpu")]
    assert len(solves) == 2 * 7
    for i, w_dev, w_dtype, h_dev, h_dtype, others in solves:
        assert (w_dev, w_dtype) == ("meta", torch.bfloat16)  # the block on the device, in the model's dtype
        assert (h_dev, h_dtype) == ("meta", torch.float32)  # Hessians on the device, in fp32
        assert others == {"cpu"}  # one block at a time: the rest of the model stays on the host
    # every block call got its hidden states, mask and rotary tables where the block was: on the host during the
    # capture (the model's own forward), on the device for the 2 batches x (Hessian pass + output pass) of block
    # 0 and the Hessian pass of block 1 (the last block's output is not needed)
    assert all(devs == {where} for where, devs in block_inputs)
    assert [where for where, _ in block_inputs].count("meta") == 2 * 2 + 2
    assert set(stored) == ({"cpu"} if on_host else {"meta"})
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.bfloat16)}


def test_bf16_checkpoint_is_solved_in_fp32_and_saved_in_bf16(bf16_llama_dir, calib, tmp_path, monkeypatch):
    assert models.resolve_dtype(str(bf16_llama_dir), "auto") == torch.bfloat16  # the checkpoint's own dtype
    seen = []
    solve_layer = apply.solve_layer

    def spy(W, H, spec, options=apply.CompressOptions()):
        seen.append((W.dtype, None if H is None else H.dtype))
        return solve_layer(W, H, spec, options)

    monkeypatch.setattr(apply, "solve_layer", spy)
    out = ensure_compressed(str(bf16_llama_dir), "gptq:w4g16", calib=calib, cache_dir=tmp_path, device="cpu",
                            progress=False)
    # GPTQ solves (with H) and their RTN baselines (H None) all see fp32 weights; every Hessian is fp32
    assert seen and {w for w, _ in seen} == {torch.float32} and {h for _, h in seen} == {torch.float32, None}
    info = cio.read_compression_info(out)
    assert info["dtype"] == "bfloat16" and info["compress_device"] == "cpu"
    assert info["compress_kernels"].split(",")[0] == torch.backends.cpu.get_cpu_capability()
    tensors = load_file(f"{out}/model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    # every stored weight is its fp32 grid value rounded to bf16 (what packed export relies on)
    qp = load_file(f"{out}/{cio.QPARAMS_FILE}")
    name = "model.layers.1.mlp.down_proj"
    w, g = tensors[f"{name}.weight"], qp[f"{name}.g_idx"].long()
    scale, zero = qp[f"{name}.scale"][:, g], qp[f"{name}.zero"][:, g]
    assert scale.dtype == torch.float32
    codes = torch.round(w.float() / scale) + zero
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.equal((scale * (codes - zero)).to(torch.bfloat16), w)

    # the dtype is part of the cache key: fp32 is another entry, with fp32 weights
    fp32 = ensure_compressed(str(bf16_llama_dir), "gptq:w4g16", calib=calib, cache_dir=tmp_path, device="cpu",
                             dtype="float32", progress=False)
    assert fp32 != out and load_file(f"{fp32}/model.safetensors")[f"{name}.weight"].dtype == torch.float32

    # the bf16 checkpoint loads directly: as pretrained= (HFLM's dtype auto) and as ctp-train --model
    from ctp_eval import train as T
    from ctp_eval.eval.lm import CTPLM

    lm = CTPLM(pretrained=out, device="cpu")
    assert lm.model.dtype == torch.bfloat16 and lm.get_model_info()["ctp_compression"] == "gptq:w4g16"
    cfg = T.TrainConfig(out=str(tmp_path / "run"), model=out, dtype="bfloat16", progress=False)
    model, _, spec = trainsetup.load_model(cfg, torch.device("cpu"))
    assert model.dtype == torch.bfloat16 and spec == "gptq:w4g16"
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, w)


class _Stop(Exception):
    pass


@pytest.fixture
def spy_ensure(monkeypatch):
    """Replace ensure_compressed: record its arguments, then stop the caller before any work."""
    calls = []

    def spy(pretrained, spec, **kw):
        calls.append(kw)
        raise _Stop

    monkeypatch.setattr(cio, "ensure_compressed", spy)
    return calls


def test_lm_eval_model_passes_hflm_device_and_dtype(spy_ensure, tiny_llama_dir, monkeypatch):
    from ctp_eval.eval.lm import CTPLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a 2-GPU machine, as far as devices go
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(_Stop):
        CTPLM(pretrained=str(tiny_llama_dir), compression="gptq:w4", device="cuda:1", dtype="float16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(_Stop):
        CTPLM(pretrained=str(tiny_llama_dir), compression="gptq:w4", device="cpu")
    # lm-eval's CLI sends device=cuda:0 by default, GPU or not; HFLM then runs on the CPU, and so must compression
    with pytest.raises(_Stop):
        CTPLM(pretrained=str(tiny_llama_dir), compression="gptq:w4", device="cuda:0")
    assert [(str(c["device"]), c["dtype"]) for c in spy_ensure] == [
        ("cuda:1", "float16"), ("cpu", "auto"), ("cpu", "auto")]


def test_ctp_compress_passes_device_dtype_threads(spy_ensure, tiny_llama_dir):
    from ctp_eval.cli import compress_main

    with pytest.raises(_Stop):
        compress_main(["--spec", "gptq:w4", "--model", str(tiny_llama_dir), "--device", "cuda:1", "--dtype",
                       "bfloat16", "--threads", "3", "--activations-on-host"])
    with pytest.raises(_Stop):
        compress_main(["--spec", "gptq:w4", "--model", str(tiny_llama_dir)])
    got = [{k: c[k] for k in ("device", "dtype", "threads", "activations_on_host")} for c in spy_ensure]
    assert got == [dict(device="cuda:1", dtype="bfloat16", threads=3, activations_on_host=True),
                   dict(device="auto", dtype="auto", threads=None, activations_on_host=False)]


def test_ctp_train_compresses_on_its_device_in_its_dtype(spy_ensure, tiny_llama_dir, tmp_path):
    from ctp_eval import train as T

    cfg = T.TrainConfig(out=str(tmp_path / "run"), model=str(tiny_llama_dir), compression="gptq:w4",
                        dtype="bfloat16", progress=False)
    with pytest.raises(_Stop):
        trainsetup.load_model(cfg, torch.device("meta"))
    assert spy_ensure[0]["device"] == torch.device("meta") and spy_ensure[0]["dtype"] == torch.bfloat16


def test_ctp_train_other_ranks_wait_for_local_rank_0(tiny_llama_dir, tmp_path, monkeypatch):
    from ctp_eval import train as T

    calls, answers = [], iter([None, None, str(tiny_llama_dir)])

    def lookup(pretrained, spec, **kw):
        calls.append(kw)
        return next(answers)

    monkeypatch.setattr(cio, "ensure_compressed", lookup)
    from ctp_eval.compress import host

    monkeypatch.setattr(host.time, "sleep", lambda s: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = T.TrainConfig(out=str(tmp_path / "run"), model=str(tiny_llama_dir), compression="gptq:w4", progress=False)
    model, _, spec = trainsetup.load_model(cfg, torch.device("cpu"))
    assert spec == "gptq:w4" and len(calls) == 3 and all(c.get("lookup_only") for c in calls)


def test_ctp_bench_compresses_on_its_device_in_its_dtype(spy_ensure, tmp_path):
    from ctp_eval.study.bench import BenchConfig, Runner

    runner = Runner(BenchConfig(out=str(tmp_path), specs="gptq:w4", compress_device="cuda:1", dtype="bfloat16"))
    with pytest.raises(_Stop):
        runner.compressed("gptq:w4")
    assert (spy_ensure[0]["device"], spy_ensure[0]["dtype"]) == ("cuda:1", "bfloat16")


def test_bad_device_dtype_threads_are_refused(tiny_llama_dir, tmp_path, monkeypatch):
    from ctp_eval.cli import compress_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no cuda device"):
        ensure_compressed(str(tiny_llama_dir), "rtn:w4", cache_dir=tmp_path, device="cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        ensure_compressed(str(tiny_llama_dir), "rtn:w4", cache_dir=tmp_path, device="gpu0")
    with pytest.raises(SystemExit, match="sees no cuda device"):
        compress_main(["--spec", "rtn:w4", "--model", str(tiny_llama_dir), "--device", "cuda"])
    with pytest.raises(SystemExit, match="floating torch dtype"):
        compress_main(["--spec", "rtn:w4", "--model", str(tiny_llama_dir), "--device", "cpu", "--dtype", "int8"])
    with pytest.raises(SystemExit):
        compress_main(["--spec", "rtn:w4", "--model", str(tiny_llama_dir), "--threads", "0"])
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_threads_apply_to_hessians_and_solves(monkeypatch):
    seen = []
    solve_layer, hessians = apply.solve_layer, apply._hessians
    monkeypatch.setattr(apply, "solve_layer", lambda *a, **k: (seen.append(("solve", torch.get_num_threads())),
                                                                  solve_layer(*a, **k))[1])
    monkeypatch.setattr(apply, "_hessians", lambda *a, **k: (seen.append(("H", torch.get_num_threads())),
                                                             hessians(*a, **k))[1])
    ids = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    apply.compress_model(build_model("llama", vocab_size=VOCAB), "gptq:w4", ids, threads=other, progress=False)
    assert {n for _, n in seen} == {other} and {k for k, _ in seen} == {"solve", "H"}
    assert torch.get_num_threads() == before  # restored
    seen.clear()
    monkeypatch.setenv(apply.THREADS_ENV, str(other))
    apply.compress_model(build_model("llama", vocab_size=VOCAB), "gptq:w4", ids, progress=False)
    assert {n for _, n in seen} == {other}
    seen.clear()
    monkeypatch.delenv(apply.THREADS_ENV)
    apply.compress_model(build_model("llama", vocab_size=VOCAB), "gptq:w4", ids, progress=False)
    assert {n for _, n in seen} == {before}  # default: torch's own count, i.e. every core it uses


def test_stock_lm_eval_cli_compresses_in_the_asked_dtype(tiny_llama_dir, tmp_path):
    """The real `lm_eval` executable, no --device: its CLI passes cuda:0, which HFLM (and compression) must
    treat as "not here, use the CPU" on a machine without CUDA."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    docs = [{"q": "The quick brown fox", "choices": [" jumps.", " of France."], "label": 0}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc_offload.yaml").write_text(
        f"task: tiny_mc_offload\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1\n")
    env = {**os.environ, "CTP_CACHE_DIR": str(tmp_path / "cache"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "ctp", "--model_args",
           f"pretrained={tiny_llama_dir},compression=rtn:w4g16,dtype=bfloat16", "--tasks", "tiny_mc_offload",
           "--include_path", str(tmp_path), "--batch_size", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = (tmp_path / "cache" / "compressed").iterdir()
    info = cio.read_compression_info(entry)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert info["dtype"] == "bfloat16" and info["compress_device"].startswith(expected)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 kernel-set names")
def test_compress_kernels_name_the_kernel_set_the_solves_ran_on():
    # builds differ across kernel sets (AVX-512 vs AVX2 vs GPU), so the record must follow what torch dispatches
    # to, not what the CPU could do: forcing the portable kernels must show up in it
    code = "from ctp_eval.compress.io import compute_kernels; print(compute_kernels('cpu'))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "DEFAULT, MKL_CBWR=COMPATIBLE"

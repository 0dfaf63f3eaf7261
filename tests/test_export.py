"""compressed-tensors export: exact codes, round trip through transformers, on-disk size, CLI, refusals.

The packed files are checked with an unpacker written here from the format's description (element i of a row
occupies bits [i*b, (i+1)*b) of the row's little-endian int32 words, stored as code + 2^(b-1); zero points are
packed the same way along the output dimension), not with the library's own unpacking.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ctp_eval.compress.apply import block_linears, find_blocks
from ctp_eval.compress.export import (
    ExportError,
    export_compressed,
    marlin_problems,
    spec_export_problem,
    stored_group_size,
    to_packed_grid,
)
from ctp_eval.compress.io import CalibConfig, ensure_compressed


# ----- independent references -------------------------------------------------------------------------------
def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(rows, n_words) int32 -> (rows, n) signed codes, by reading the bit stream of each row."""
    raw = np.ascontiguousarray(words.numpy().astype("<i4")).view(np.uint8)  # little-endian bytes
    stream = np.unpackbits(raw.reshape(words.shape[0], -1), axis=1, bitorder="little")  # (rows, 32 * n_words)
    fields = stream[:, : n * bits].reshape(words.shape[0], n, bits).astype(np.int64)
    values = (fields << np.arange(bits)).sum(axis=2) - 2 ** (bits - 1)
    return torch.from_numpy(values)


def dequantize_from_files(tensors: dict, name: str, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Rebuild a Linear weight from the exported tensors with the formula w = scale * (q - z)."""
    rows, cols = tensors[f"{name}.weight_shape"].tolist()
    codes = unpack_rows(tensors[f"{name}.weight_packed"], bits, cols)
    scale = tensors[f"{name}.weight_scale"].float()
    n_groups = scale.shape[1]
    if sym:
        assert f"{name}.weight_zero_point" not in tensors
        zero = torch.zeros(rows, n_groups, dtype=torch.long)
    else:
        zero = unpack_rows(tensors[f"{name}.weight_zero_point"].T.contiguous(), bits, rows).T  # packed along rows
    width = cols if group_size == 0 else group_size
    assert n_groups * width == cols
    col = torch.arange(cols) // width
    return scale[:, col] * (codes - zero[:, col]).float()


def expected_linear_bytes(rows: int, cols: int, bits: int, group_size: int, sym: bool) -> int:
    n_groups = 1 if group_size == 0 else cols // group_size
    packed = rows * math.ceil(cols * bits / 32) * 4
    scales = rows * n_groups * 4  # float32
    zeros = 0 if sym else math.ceil(rows * bits / 32) * n_groups * 4
    return packed + scales + zeros + 2 * 8  # + weight_shape (2 x int64)


# ----- the pure re-encoding ---------------------------------------------------------------------------------
def _grid_weight(rows=3, cols=12, group=8, bits=3, sym=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    group = group or cols  # 0: one grid per row
    n_groups = math.ceil(cols / group)
    maxq = 2**bits - 1
    q = torch.randint(0, maxq + 1, (rows, cols), generator=gen)
    if sym:
        zero = torch.full((rows, n_groups), float(2 ** (bits - 1)))
    else:
        zero = torch.randint(0, maxq + 1, (rows, n_groups), generator=gen).float()
    scale = torch.rand(rows, n_groups, generator=gen) + 0.1
    col = torch.arange(cols) // group
    W = scale[:, col] * (q - zero[:, col])
    return W, scale, zero, q


def test_packed_grid_reencodes_exactly_with_a_finer_dividing_group():
    W, scale, zero, q = _grid_weight()  # groups [0, 8) and [8, 12): 12 is not a multiple of 8
    g = to_packed_grid(W, scale, zero, bits=3, group_size=8, sym=False)
    assert g.group_size == 4  # gcd(8, 12): each of our groups is whole
    assert torch.equal(g.codes, (q - 4).to(torch.int8))
    assert torch.equal(g.zero, (zero[:, [0, 0, 1]] - 4).to(torch.int8))
    assert torch.equal(g.scale, scale[:, [0, 0, 1]])
    col = torch.arange(12) // 4
    assert torch.equal(g.scale[:, col] * (g.codes.float() - g.zero[:, col].float()), W)


def test_packed_grid_stores_a_per_channel_grid_as_groups():
    W, scale, zero, q = _grid_weight(cols=12, group=0, bits=4)
    g = to_packed_grid(W, scale, zero, bits=4, group_size=0, sym=False, stored_group=6)
    assert g.group_size == 6 and torch.equal(g.scale, scale[:, [0, 0]]) and torch.equal(g.codes, (q - 8).to(torch.int8))
    with pytest.raises(ExportError, match="cannot hold"):
        to_packed_grid(W, scale, zero, bits=4, group_size=0, sym=False, stored_group=5)


def test_stored_group_size_fits_every_layer():
    assert stored_group_size(128, [576, 1536]) == 64  # SmolLM2 g128: 576 = 4 x 128 + 64
    assert stored_group_size(64, [64, 128]) == 64  # per channel on the 64-wide layers = one group of 64
    assert stored_group_size(48, [64, 128]) == 16
    assert stored_group_size(1024, [576, 1536]) == 64  # 576 per channel, 1536 = 1024 + 512
    assert stored_group_size(0, [576, 1536]) == 0 and stored_group_size(4096, [576, 1536]) == 0


def test_packed_grid_symmetric_and_per_channel():
    W, scale, zero, q = _grid_weight(cols=10, group=0, bits=4, sym=True)
    g = to_packed_grid(W, scale, zero, bits=4, group_size=0, sym=True, g_idx=torch.zeros(10, dtype=torch.int32))
    assert g.zero is None and g.group_size == 0 and torch.equal(g.codes, (q - 8).to(torch.int8))


def test_packed_grid_refuses_off_grid_weights_and_act_order_groups():
    W, scale, zero, _ = _grid_weight()
    W2 = W.clone()
    W2[1, 5] += 0.3 * scale[1, 0]
    with pytest.raises(ExportError, match="not on the saved 3-bit grid"):
        to_packed_grid(W2, scale, zero, bits=3, group_size=8, sym=False, name="q_proj")
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ExportError, match="non-contiguous"):
        to_packed_grid(W, scale, zero, bits=3, group_size=8, sym=False, g_idx=(torch.arange(12) // 8)[perm])
    with pytest.raises(ExportError, match="symmetric grid"):
        to_packed_grid(W, scale, zero, bits=3, group_size=8, sym=True)


@pytest.mark.parametrize(
    "spec, reason",
    [("none", "nothing to export"), ("sparsegpt:0.5", "no sparse storage format"),
     ("magnitude:2:4", "no sparse storage format"), ("gptq:w4g16-act", "non-contiguous")],
)
def test_unexportable_specs_say_why(spec, reason):
    assert reason in spec_export_problem(spec)


@pytest.mark.parametrize("spec", ["gptq:w4", "gptq:w4-act", "gptq:w3g128", "sparsegpt:0.5+gptq:w4g64", "rtn:w8-sym"])
def test_exportable_specs(spec):
    assert spec_export_problem(spec) is None


def test_marlin_conditions_name_what_fails():
    """vLLM's GPU Marlin WNA16 kernel: 4-bit with or without zero points, 8-bit only symmetric, groups of
    32/64/128 or per channel, in_features a multiple of 128 and out_features of 64 (tensor parallelism 1)."""
    assert marlin_problems(4096, 11008, 4, 128, sym=False) == []
    assert marlin_problems(11008, 4096, 8, 0, sym=True) == []
    (p,) = marlin_problems(576, 1536, 4, 64, sym=False)  # SmolLM2's q/gate inputs
    assert "in_features 576" in p and "128" in p
    (p,) = marlin_problems(4096, 4096, 8, 128, sym=False)
    assert "asymmetric 8-bit" in p
    (p,) = marlin_problems(4096, 96, 4, 32, sym=True)
    assert "out_features 96" in p
    (p,) = marlin_problems(4096, 4096, 4, 16, sym=False)
    assert "group size 16" in p
    assert len(marlin_problems(576, 4096, 3, 16, sym=True)) == 3  # bits, group and width all fail


# ----- round trip on a tiny Llama ------------------------------------------------------------------------------
def _linears(model):
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in block_linears(b).items()}


# (spec, bits, stored group size, sym): tiny Llama widths are 64 (q/k/v/o/gate/up inputs) and 128 (down_proj)
ROUND_TRIP = [
    ("gptq:w4g16", 4, 16, False),  # the standard int4 group format
    ("gptq:w3g48-sym", 3, 16, True),  # 3-bit dense packing; 48 divides neither width -> group 16
    ("gptq:w4-act", 4, 0, False),  # act-order per channel: the order only changed the solve
    ("sparsegpt:0.5+gptq:w4g64", 4, 64, False),  # joint; per channel on 64-wide, group 64 on 128-wide layers
    ("rtn:w2g32", 2, 32, False),
]


@pytest.mark.parametrize("spec, bits, group, sym", ROUND_TRIP)
def test_export_round_trips_through_transformers(tiny_llama_dir, calib, tmp_path, spec, bits, group, sym):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = ensure_compressed(str(tiny_llama_dir), spec, calib=calib, cache_dir=tmp_path / "cache", progress=False)
    out = tmp_path / "export"
    record = export_compressed(src, out)
    assert record["max_abs_diff"] == 0.0

    fq = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ct = AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    # weight level: every Linear equals the fake-quantized one, both through transformers and from the raw files
    tensors = load_file(str(out / "model.safetensors"))
    fq_lin, ct_lin = _linears(fq), _linears(ct)
    for name, lin in fq_lin.items():
        assert torch.equal(ct_lin[name].weight, lin.weight), name
        assert torch.equal(dequantize_from_files(tensors, name, bits, group, sym), lin.weight), name
        assert f"{name}.weight" not in tensors
    if "sparsegpt" in spec:
        w = ct_lin["model.layers.0.mlp.up_proj"].weight  # pruned half (plus weights rounded to 0) stays exact 0
        assert (w == 0).float().mean().item() >= 0.5
    ids = torch.randint(0, fq.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ct(ids).logits, fq(ids).logits, rtol=0, atol=1e-5)

    # config that vLLM / transformers read
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (scheme,) = qc["config_groups"].values()
    assert scheme["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    w = scheme["weights"]
    assert (w["num_bits"], w["symmetric"], w["type"]) == (bits, sym, "int")
    assert (w["strategy"], w["group_size"]) == (("group", group) if group else ("channel", None))
    # transformers >= 5.11 reads `dequantize`; older ones only `run_compressed`, which must ask for it too
    assert qc["dequantize"] is True and qc["run_compressed"] is False
    older = {k: v for k, v in qc.items() if k != "dequantize"}
    assert CompressedTensorsConfig.from_dict(older).dequantize is True

    # on disk: exactly the packed size, vs 4 bytes per fp32 weight before
    expected = sum(expected_linear_bytes(m.out_features, m.in_features, bits, group, sym) for m in fq_lin.values())
    dense = sum(m.weight.numel() * 4 for m in fq_lin.values())
    assert record["linear_bytes"] == {"fake_quant": dense, "export": expected, "ratio": dense / expected}
    info = json.loads((out / "ctp_compression.json").read_text())
    assert info["spec"] == spec and info["export"]["linear_bytes"]["export"] == expected


def test_export_is_architecture_generic(tiny_model_dir, tmp_path):
    """Llama and OPT (q/k/v/out_proj, fc1/fc2, biases, tied head): every tensor comes back identical."""
    from transformers import AutoModelForCausalLM

    src = ensure_compressed(str(tiny_model_dir), "rtn:w4g32", cache_dir=tmp_path, progress=False)
    record = export_compressed(src, tmp_path / "export")
    fq, ct = AutoModelForCausalLM.from_pretrained(src), AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert record["n_linear"] == len(_linears(fq)) == {"llama": 14, "opt": 12}[fq.config.model_type]
    ref, got = fq.state_dict(), ct.state_dict()
    extra = set(got) - set(ref)  # transformers 5.17 keeps the quantization parameters after dequantizing
    assert {k.rsplit(".", 1)[1] for k in extra} <= {"weight_scale", "weight_zero_point", "weight_shape"}
    assert set(ref) <= set(got) and all(torch.equal(ref[k], got[k]) for k in ref)


def _transformers_before(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version(version)


@pytest.mark.skipif(_transformers_before("5.24"), reason="transformers 5.17 dequantizes bf16 exports with "
                    "bf16-rounded scales (export_compressed then refuses, saying so); 5.24 reloads them exactly")
def test_bf16_checkpoint_exports_exactly(tiny_llama_dir, tmp_path):
    """8-bit codes on bf16 weights: re-rounding with bf16 scales would miss codes; the export must not."""
    from transformers import AutoModelForCausalLM

    src = ensure_compressed(str(tiny_llama_dir), "rtn:w8g32", cache_dir=tmp_path, dtype=torch.bfloat16, progress=False)
    export_compressed(src, tmp_path / "export")
    fq = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    ct = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.bfloat16)  # config: dequantize
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
    for name, lin in _linears(fq).items():
        assert lin.weight.dtype == torch.bfloat16 and torch.equal(_linears(ct)[name].weight, lin.weight), name
        assert torch.equal(dequantize_from_files(tensors, name, 8, 32, False).to(torch.bfloat16), lin.weight), name


def test_linears_left_dense_by_the_compression_stay_dense(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from ctp_eval.compress.io import INFO_FILE, QPARAMS_FILE

    src = tmp_path / "src"
    shutil.copytree(ensure_compressed(str(tiny_llama_dir), "rtn:w4g16", cache_dir=tmp_path, progress=False), src)
    dense = "model.layers.1.mlp.gate_proj"
    qp = {k: v for k, v in load_file(str(src / QPARAMS_FILE)).items() if not k.startswith(dense + ".")}
    save_file(qp, str(src / QPARAMS_FILE))
    with pytest.raises(ExportError, match=f"no grid for .*{dense}"):
        export_compressed(src, tmp_path / "a")
    info = json.loads((src / INFO_FILE).read_text())
    info["stats"]["unused"] = [dense]  # what the compression records for a Linear it never reached
    (src / INFO_FILE).write_text(json.dumps(info))
    export_compressed(src, tmp_path / "b")
    tensors = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert f"{dense}.weight" in tensors and f"{dense}.weight_packed" not in tensors
    qc = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert sorted(qc["ignore"]) == sorted(["lm_head", dense])
    fq, ct = AutoModelForCausalLM.from_pretrained(src), AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"))
    assert all(torch.equal(a, ct.state_dict()[k]) for k, a in fq.state_dict().items())


def test_prompt_gives_the_same_ppl_on_the_export(tiny_llama_dir, calib, tmp_path):
    """`--model ctp pretrained=EXPORT` loads the export; the same prompt file scores the same."""
    from conftest import DATA_DIR
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctp_eval.eval.lm import CTPLM
    from ctp_eval.eval.ppl import perplexity
    from ctp_eval.prompt import SoftPrompt

    src = ensure_compressed(str(tiny_llama_dir), "gptq:w4g16", calib=calib, cache_dir=tmp_path, progress=False)
    out = tmp_path / "export"
    export_compressed(src, out)
    model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    emb = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.5
    SoftPrompt.for_model(emb, model, tok, compression="gptq:w4g16").save(tmp_path / "p.safetensors")

    lms = [CTPLM(pretrained=str(p), prompt=str(tmp_path / "p.safetensors"), device="cpu", dtype="float32", batch_size=2)
           for p in (src, out)]
    assert lms[1].get_model_info()["ctp_compression"] == "gptq:w4g16"
    text = "Quantization and pruning make models smaller, and a soft prompt recovers their accuracy. " * 12
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    rolling = [lm.loglikelihood_rolling(req)[0] for lm in lms]
    assert rolling[0] == pytest.approx(rolling[1], abs=1e-4) and rolling[0] != 0
    ppl = [perplexity(lm.model, lm.tokenizer, "wikitext2", "test", seqlen=64, prompt=lm.prompt_embeds,
                      limit_windows=3, data_dir=DATA_DIR).ppl for lm in lms]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)


def test_export_refuses_bad_input(tiny_llama_dir, calib, tmp_path):
    with pytest.raises(ExportError, match="not a ctp compressed checkpoint"):
        export_compressed(tiny_llama_dir, tmp_path / "a")
    sparse = ensure_compressed(str(tiny_llama_dir), "magnitude:0.5", cache_dir=tmp_path, progress=False)
    with pytest.raises(ExportError, match="no sparse storage format"):
        export_compressed(sparse, tmp_path / "b")
    src = ensure_compressed(str(tiny_llama_dir), "rtn:w4g16", cache_dir=tmp_path, progress=False)
    (tmp_path / "c").mkdir()
    with pytest.raises(ExportError, match="exists"):
        export_compressed(src, tmp_path / "c")
    export_compressed(src, tmp_path / "d", verify=False)
    with pytest.raises(ExportError, match="already a compressed-tensors export"):
        export_compressed(tmp_path / "d", tmp_path / "e")
    # grids that do not match the weights (a stale qparams file) are caught, not silently re-quantized
    from safetensors.torch import save_file

    from ctp_eval.compress.io import QPARAMS_FILE

    qp = load_file(f"{src}/{QPARAMS_FILE}")
    qp["model.layers.1.mlp.down_proj.scale"] *= 1.01
    save_file(qp, f"{src}/{QPARAMS_FILE}")
    with pytest.raises(ExportError, match="model.layers.1.mlp.down_proj: the weights are not on the saved"):
        export_compressed(src, tmp_path / "f")
    assert not (tmp_path / "f").exists() and not list(tmp_path.glob(".tmp-*"))


# ----- streaming ---------------------------------------------------------------------------------------------
def _whole_model_export(src, out, bits: int, sym: bool, group: int) -> dict:
    """What compressed-tensors' own whole-model path writes (the model in memory, ModelCompressor.compress_model,
    save_pretrained), given grids whose groups are already the stored ones (our scale and zero - 2^(b-1))."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM

    from ctp_eval.compress.io import QPARAMS_FILE

    qparams = load_file(f"{src}/{QPARAMS_FILE}")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if group else "channel",
                            group_size=group or None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": scheme}, ignore=["lm_head"]))
    for name, lin in _linears(model).items():
        lin.weight_scale.data = qparams[f"{name}.scale"].float()
        if not sym:
            lin.weight_zero_point.data = (qparams[f"{name}.zero"] - 2 ** (bits - 1)).to(torch.int8)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    compressor.remove_decompression_hook(model)
    model.save_pretrained(out)
    return load_file(str(out / "model.safetensors"))


# tiny Llama widths 64 and 128: these groups divide both, so the stored grids are the saved ones
@pytest.mark.parametrize("spec, bits, sym, group", [("rtn:w4g16", 4, False, 16), ("rtn:w3g32-sym", 3, True, 32),
                                                    ("rtn:w8", 8, False, 0)])
def test_streamed_export_writes_what_the_whole_model_path_writes(tiny_llama_dir, tmp_path, spec, bits, sym, group):
    src = ensure_compressed(str(tiny_llama_dir), spec, cache_dir=tmp_path, progress=False)
    export_compressed(src, tmp_path / "streamed")
    got = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    ref = _whole_model_export(src, tmp_path / "whole", bits, sym, group)
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_sharded_checkpoint_exports_shard_by_shard(tiny_llama_dir, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    src = ensure_compressed(str(tiny_llama_dir), "rtn:w4g16", cache_dir=tmp_path, progress=False)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="100KB")
    for f in Path(src).iterdir():  # grids, record, tokenizer
        if not (sharded / f.name).exists() and f.name != "model.safetensors":
            shutil.copyfile(f, sharded / f.name)
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    export_compressed(src, tmp_path / "one")
    record = export_compressed(sharded, tmp_path / "many")
    assert record["max_abs_diff"] == 0.0

    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    many = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(tmp_path / "many" / f))
        assert all(index["weight_map"][k] == f for k in tensors)
        many.update(tensors)
    assert many.keys() == one.keys() == index["weight_map"].keys()
    assert all(torch.equal(many[k], v) for k, v in one.items())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in many.values())


def test_large_model_path_reads_no_whole_model_and_catches_bad_bytes(tiny_llama_dir, tmp_path, monkeypatch):
    """Above RELOAD_MAX_BYTES the written files are checked by decoding them one tensor at a time; that check
    alone must catch a flipped bit in a packed word and a changed byte in a copied tensor."""
    from transformers import AutoModelForCausalLM

    from ctp_eval.compress import export as E

    src = ensure_compressed(str(tiny_llama_dir), "rtn:w4g16", cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(E, "RELOAD_MAX_BYTES", 0)  # every model counts as large

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the export loaded a whole model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_whole_model)
    record = export_compressed(src, tmp_path / "ok")
    assert record["max_abs_diff"] == 0.0 and record["verified_by"] == ["compressed-tensors decode"]

    pack = E._Plan.pack

    def flip_a_bit(self, name, W):
        out = pack(self, name, W)
        if name == "model.layers.1.mlp.up_proj":
            out[f"{name}.weight_packed"][3, 1] ^= 1 << 5
        return out

    monkeypatch.setattr(E._Plan, "pack", flip_a_bit)
    with pytest.raises(ExportError, match="decode to weights"):
        export_compressed(src, tmp_path / "bad-code")
    monkeypatch.setattr(E._Plan, "pack", pack)

    def change_a_byte(src_fh, dst, n):
        data = bytearray(src_fh.read(n))
        data[n // 2] ^= 0xFF
        dst.write(data)

    monkeypatch.setattr(E, "_copy_bytes", change_a_byte)
    with pytest.raises(ExportError, match="differs from the source"):
        export_compressed(src, tmp_path / "bad-copy")
    assert not (tmp_path / "bad-code").exists() and not (tmp_path / "bad-copy").exists()


def test_vllm_flag_per_layer(tmp_path, tiny_tokenizer):
    """Widths that are multiples of 128: 4-bit g32 runs on Marlin everywhere, asymmetric 8-bit nowhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    records = {}
    for spec in ("rtn:w4g32", "rtn:w8g32"):
        src = ensure_compressed(str(tmp_path / "base"), spec, cache_dir=tmp_path, progress=False)
        records[spec] = export_compressed(src, tmp_path / spec.replace(":", "-"))
    assert records["rtn:w4g32"]["vllm_kernels"] is True and records["rtn:w4g32"]["vllm_marlin_failing"] == {}
    failing = records["rtn:w8g32"]["vllm_marlin_failing"]
    assert records["rtn:w8g32"]["vllm_kernels"] is False and len(failing) == 7  # q k v o gate up down
    assert all(len(p) == 1 and "asymmetric 8-bit" in p[0] for p in failing.values())


# ----- CLI ---------------------------------------------------------------------------------------------------
def test_ctp_compress_export_and_from_compressed(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from conftest import DATA_DIR

    from ctp_eval.cli import compress_main

    monkeypatch.setenv("CTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CTP_DATA_DIR", str(DATA_DIR))
    calib = ["--nsamples", "4", "--seqlen", "32"]
    fq, exp = tmp_path / "fq", tmp_path / "exp"
    model = ["--model", str(tiny_llama_dir)]
    compress_main(["--spec", "gptq:w4g16", *model, "--out", str(fq), "--export", str(exp), *calib])
    assert capsys.readouterr().out.split() == [str(fq), str(exp)]
    assert json.loads((exp / "ctp_compression.json").read_text())["export"]["max_abs_diff"] == 0.0

    compress_main(["--from-compressed", str(fq), "--export", str(tmp_path / "exp2")])
    assert capsys.readouterr().out.split() == [str(tmp_path / "exp2")]
    a, b = load_file(str(exp / "model.safetensors")), load_file(str(tmp_path / "exp2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    compress_main(["--from-compressed", str(fq), "--export", str(tmp_path / "exp3"), "--no-verify"])
    record = json.loads((tmp_path / "exp3" / "ctp_compression.json").read_text())["export"]
    assert "max_abs_diff" not in record and (tmp_path / "exp3" / "model.safetensors").is_file()

    # refused before compressing: nothing lands in the cache
    with pytest.raises(SystemExit, match="cannot export: sparsegpt:0.5 is sparse-only"):
        compress_main(["--spec", "sparsegpt:0.5", *model, "--export", str(tmp_path / "x"), *calib])
    assert not any("sparsegpt" in p.name for p in (tmp_path / "cache" / "compressed").iterdir())
    with pytest.raises(SystemExit, match="exists"):
        compress_main(["--from-compressed", str(fq), "--export", str(exp)])
    with pytest.raises(SystemExit, match="cannot export: .* not a ctp compressed checkpoint"):
        compress_main(["--from-compressed", str(tiny_llama_dir), "--export", str(tmp_path / "y")])
    with pytest.raises(SystemExit):  # argparse: --from-compressed needs --export; --spec excludes it
        compress_main(["--from-compressed", str(fq)])
    with pytest.raises(SystemExit):
        compress_main(["--from-compressed", str(fq), "--spec", "gptq:w4", "--export", str(tmp_path / "z")])


# ----- the real model ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_export_round_trip(tmp_path):
    """SmolLM2-135M, gptq:w4g128 (4 x 128 calibration tokens): widths 576 and 1536 are stored with groups of 64."""
    from conftest import DATA_DIR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctp_eval.eval.lm import CTPLM
    from ctp_eval.eval.ppl import perplexity
    from ctp_eval.prompt import SoftPrompt, init_from_vocab

    calib = CalibConfig(nsamples=4, seqlen=128)
    src = ensure_compressed(None, "gptq:w4g128", calib=calib, cache_dir=tmp_path, data_dir=DATA_DIR, progress=False)
    out = tmp_path / "export"
    record = export_compressed(src, out)
    assert record["max_abs_diff"] == 0.0 and record["group_size"] == 64 and record["n_linear"] == 30 * 7

    fq = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ct = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    fq_lin, ct_lin = _linears(fq), _linears(ct)
    assert all(torch.equal(ct_lin[n].weight, m.weight) for n, m in fq_lin.items())
    tensors = load_file(str(out / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):  # 576 and 1536 wide
        assert torch.equal(dequantize_from_files(tensors, name, 4, 64, False), fq_lin[name].weight), name
    ids = torch.randint(0, fq.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ct(ids).logits, fq(ids).logits, rtol=0, atol=1e-4)

    dense = sum(m.weight.numel() * 4 for m in fq_lin.values())
    expected = sum(expected_linear_bytes(m.out_features, m.in_features, 4, 64, False) for m in fq_lin.values())
    assert record["linear_bytes"] == {"fake_quant": dense, "export": expected, "ratio": dense / expected}
    assert record["linear_bytes"]["ratio"] > 6.9  # 32 bits -> 4 + 32/64 (scale) + 4/64 (zero) bits per weight

    # the same prompt file gives the same perplexity through `--model ctp pretrained=EXPORT`
    tok = AutoTokenizer.from_pretrained(src)
    SoftPrompt.for_model(init_from_vocab(fq, 20, seed=0), fq, tok).save(tmp_path / "p.safetensors")
    lms = [CTPLM(pretrained=str(p), prompt=str(tmp_path / "p.safetensors"), device="cpu", dtype="float32",
                 batch_size=2) for p in (src, out)]
    ppl = [perplexity(lm.model, lm.tokenizer, "wikitext2", "test", seqlen=128, prompt=lm.prompt_embeds,
                      limit_windows=2, data_dir=DATA_DIR).ppl for lm in lms]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)


def test_verify_tolerates_only_quantization_parameters(tiny_llama_dir, tmp_path, monkeypatch):
    """transformers 5.17 reloads an export as fake-quantized Linears that keep weight_scale / weight_zero_point /
    weight_shape beside the dequantized weight: those extra keys pass, any other difference does not."""
    import copy

    from transformers import AutoModelForCausalLM

    from ctp_eval.compress import export as E

    src = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    reloaded = copy.deepcopy(src)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: reloaded)
    lin = reloaded.model.layers[0].mlp.down_proj
    lin.register_parameter("weight_scale", torch.nn.Parameter(torch.ones(lin.out_features, 1), requires_grad=False))
    lin.register_buffer("weight_shape", torch.tensor(lin.weight.shape))
    assert E._verify(src, tmp_path) == 0.0
    lin.register_buffer("running_mean", torch.zeros(3))  # not a quantization parameter
    with pytest.raises(ExportError, match="different tensors.*running_mean"):
        E._verify(src, tmp_path)
    del lin.running_mean
    with torch.no_grad():
        lin.weight[0, 0] += 1.0
    assert E._verify(src, tmp_path) == pytest.approx(1.0)


def test_export_floor_follows_the_bit_width(monkeypatch):
    """compressed-tensors 0.17 (vLLM 0.32's pin) packs 2/4/8-bit codes as readers expect, not 3-bit ones."""
    import compressed_tensors

    from ctp_eval.compress.export import ExportError, _check_library

    monkeypatch.setattr(compressed_tensors, "__version__", "0.17.0")
    assert _check_library(4) == "0.17.0" and _check_library(8) == "0.17.0"
    with pytest.raises(ExportError, match="3-bit export needs|too old for a 3-bit"):
        _check_library(3)

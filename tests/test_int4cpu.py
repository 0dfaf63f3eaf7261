"""The int4 CPU runtime: Int4Linear against the fake-quantized Linear, whole converted models with a soft prompt
against the fake-quantized model, bytes held, refusals.

References are the fake-quantized weights themselves (dense float matmuls), never the kernel's own dequantizer.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ctp_eval.compress.int4cpu import (
    Int4Error,
    Int4Linear,
    convert_model,
    int4_problem,
    kernel_available,
    kernel_group_size,
    load_int4_model,
)
from ctp_eval.compress.io import QPARAMS_FILE, ensure_compressed
from ctp_eval.compress.quant import rtn_quantize

needs_kernel = pytest.mark.skipif(not kernel_available(),
                                  reason="this torch has no aten._weight_int4pack_mm_for_cpu (torch >= 2.5 has it)")


# ----- pure rules -------------------------------------------------------------------------------------------
def test_kernel_group_keeps_our_groups_whole():
    assert kernel_group_size(576, 64) == 64
    assert kernel_group_size(576, 128) == 64  # 576 = 4 x 128 + 64: each 128-group is two kernel groups
    assert kernel_group_size(1536, 128) == 128
    assert kernel_group_size(576, 0) == 64 and kernel_group_size(1536, 0) == 256  # per channel: largest dividing
    assert kernel_group_size(64, 32) == 32
    assert kernel_group_size(96, 48) is None  # groups of 48: no kernel size keeps them whole
    assert kernel_group_size(576, 16) is None


def test_int4_problems_name_the_condition():
    assert int4_problem(576, 1536, 4, 64) is None
    assert int4_problem(64, 32, 3, 32) is None  # 3-bit codes are valid 4-bit codes
    assert "8-bit" in int4_problem(576, 1536, 8, 64)
    assert "out_features 24" in int4_problem(64, 24, 4, 32)
    assert "groups of 16" in int4_problem(64, 32, 4, 16)


# ----- one layer --------------------------------------------------------------------------------------------
def _fake_quant_linear(rows, cols, bits, group, sym=False, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(cols, rows, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, cols, generator=gen) * 0.05)
        Wq, scale, zero = rtn_quantize(lin.weight, bits, group, sym)
        lin.weight.copy_(Wq)
        if bias:
            lin.bias.copy_(torch.randn(rows, generator=gen))
    return lin, scale, zero


@needs_kernel
@pytest.mark.parametrize("rows, cols, bits, group, sym, kernel_group", [
    (32, 128, 4, 64, False, 64),
    (48, 192, 4, 128, False, 64),  # 192 = 128 + 64: the short last group is its own kernel group
    (16, 256, 4, 0, False, 256),  # per channel
    (32, 128, 4, 32, True, 32),  # symmetric: float zero 0
    (32, 64, 3, 32, False, 32),
])
def test_int4_linear_equals_the_fake_quantized_linear(rows, cols, bits, group, sym, kernel_group):
    lin, scale, zero = _fake_quant_linear(rows, cols, bits, group, sym, bias=True)
    m = Int4Linear.from_grid(lin.weight.detach(), scale, zero, bits, group, sym=sym, bias=lin.bias,
                             dtype=torch.float32)
    assert m.group_size == kernel_group
    x = torch.randn(2, 5, cols, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = lin(x)  # (2, 5, rows)
        got = m(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # what it holds: N*K/2 code bytes and one fp32 (scale, zero) pair per kernel group; no float weight
    assert m.weight_bytes == rows * cols // 2 + rows * (cols // kernel_group) * 2 * 4
    assert not list(m.parameters())


@needs_kernel
def test_int4_linear_bf16_compute_and_inference_only():
    lin, scale, zero = _fake_quant_linear(64, 128, 4, 64)
    m = Int4Linear.from_grid(lin.weight.detach(), scale, zero, 4, 64)  # bf16 by default: the fast path
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = lin(x), m(x)
    assert got.dtype == torch.float32  # cast back to the input's dtype
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()  # bf16 activations and scales
    with pytest.raises(RuntimeError, match="inference-only"):
        m(x.requires_grad_())


@needs_kernel
def test_int4_linear_refuses_off_grid_weights_and_unfit_shapes():
    lin, scale, zero = _fake_quant_linear(32, 128, 4, 64)
    W = lin.weight.detach().clone()
    W[3, 7] += 0.3 * scale[3, 0]
    with pytest.raises(Int4Error, match="not on the saved 4-bit grid"):
        Int4Linear.from_grid(W, scale, zero, 4, 64)
    lin, scale, zero = _fake_quant_linear(24, 128, 4, 64)
    with pytest.raises(Int4Error, match="out_features 24"):
        Int4Linear.from_grid(lin.weight.detach(), scale, zero, 4, 64)
    with pytest.raises(Int4Error, match="compute dtype"):
        Int4Linear(128, 32, 64, dtype=torch.float64)


@needs_kernel
def test_convert_leaves_unfit_linears_dense_and_says_why():
    model = nn.ModuleDict()
    qparams = {}
    for name, rows in (("fit", 32), ("odd", 24)):
        lin, scale, zero = _fake_quant_linear(rows, 64, 4, 32)
        model[name], qparams[name] = lin, {"scale": scale, "zero": zero}
    stats = convert_model(model, qparams, "rtn:w4g32")
    assert isinstance(model["fit"], Int4Linear) and type(model["odd"]) is nn.Linear
    assert stats["n_int4"] == 1 and "out_features 24" in stats["left_dense"]["odd"]
    assert stats["linear_bytes"]["before"] == 32 * 64 * 4


# ----- whole models with a soft prompt -----------------------------------------------------------------------
def _prompted_logits(model, ids, prompt):
    from ctp_eval.eval.ppl import model_logits_fn
    from ctp_eval.prompt.layout import forward_with_prompt

    with torch.no_grad():
        shared = model_logits_fn(model, prompt)(ids)  # what ctp_eval.eval.ppl.perplexity scores
        prepend = forward_with_prompt(model, ids, prompt)  # inputs_embeds = [prompt; text]
    return shared, prepend


def _block_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


@needs_kernel
def test_converted_model_with_a_prompt_matches_the_fake_quantized_model(tiny_model_dir, calib, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    from ctp_eval.eval.ppl import model_logits_fn, protocol_nll

    src = ensure_compressed(str(tiny_model_dir), "gptq:w4g32", calib=calib, cache_dir=tmp_path, progress=False)
    fq = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    int4 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    stats = convert_model(int4, f"{src}/{QPARAMS_FILE}", "gptq:w4g32", dtype=torch.float32)
    n = len(_block_linears(fq))
    assert stats["n_int4"] == n and not stats["left_dense"] and not _block_linears(int4)
    assert stats["group_sizes"] == {32: n}
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randn(5, fq.config.hidden_size, generator=gen) * 0.05  # (k, d)
    ids = torch.randint(2, fq.config.vocab_size, (2, 20), generator=gen)
    for got, ref in zip(_prompted_logits(int4, ids, prompt), _prompted_logits(fq, ids, prompt)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    wins = torch.randint(2, fq.config.vocab_size, (3, 16), generator=gen)
    a, b = (protocol_nll(model_logits_fn(m, prompt), wins) for m in (int4, fq))
    assert math.isclose(a.ppl, b.ppl, rel_tol=1e-5)
    # the default bf16 compute: the same weights, activations rounded to bf16 inside each Linear
    fast = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert convert_model(fast, f"{src}/{QPARAMS_FILE}", "gptq:w4g32")["compute_dtype"] == "bfloat16"
    c = protocol_nll(model_logits_fn(fast, prompt), wins)
    assert math.isclose(c.ppl, b.ppl, rel_tol=1e-2) and c.ppl != b.ppl


@needs_kernel
def test_streamed_load_holds_no_float_linear_and_matches(tiny_model_dir, calib, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    src = ensure_compressed(str(tiny_model_dir), "gptq:w4g64", calib=calib, cache_dir=tmp_path, progress=False)
    fq = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    int4, tok, stats = load_int4_model(src, compute_dtype=torch.float32)
    assert not _block_linears(int4) and stats["n_int4"] == len(_block_linears(fq))
    assert not any(t.is_meta for t in [*int4.parameters(), *int4.buffers()])
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randn(4, fq.config.hidden_size, generator=gen) * 0.05
    ids = torch.randint(2, fq.config.vocab_size, (1, 12), generator=gen)
    for got, ref in zip(_prompted_logits(int4, ids, prompt), _prompted_logits(fq, ids, prompt)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # greedy generation from [prompt; text] embeddings, as the ctp model's prepend path does
    with torch.no_grad():
        outs = [m.generate(inputs_embeds=torch.cat([prompt[None], m.get_input_embeddings()(ids)], 1),
                           max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id) for m in (int4, fq)]
    assert torch.equal(*outs)


@needs_kernel
def test_int4_bytes_against_bf16(tiny_llama_dir, calib, tmp_path):
    src = ensure_compressed(str(tiny_llama_dir), "gptq:w4g64", calib=calib, cache_dir=tmp_path, progress=False)
    _, _, bf16 = load_int4_model(src)  # bf16 scales and zeros
    _, _, fp32 = load_int4_model(src, compute_dtype=torch.float32)
    b = bf16["linear_bytes"]
    assert b["ratio_bf16"] <= 0.3  # 0.5 byte of code + 4 bytes per 64 weights, against 2 bytes a weight
    assert math.isclose(b["ratio_bf16"], (0.5 + 4 / 64) / 2)
    assert math.isclose(fp32["linear_bytes"]["ratio_bf16"], (0.5 + 8 / 64) / 2)  # fp32 scales and zeros
    assert fp32["linear_bytes"]["before"] == 2 * fp32["linear_bytes"]["bf16"]  # the checkpoint is fp32


@needs_kernel
def test_specs_without_a_4bit_grid_are_refused(tiny_llama_dir, calib, tmp_path):
    for spec, reason in [("rtn:w8g32", "8-bit"), ("magnitude:0.5", "sparse-only"), ("gptq:w4g32-act", "act-order")]:
        src = ensure_compressed(str(tiny_llama_dir), spec, calib=calib, cache_dir=tmp_path, progress=False)
        with pytest.raises(Int4Error, match=reason):
            load_int4_model(src)


@needs_kernel
def test_ctp_model_scores_the_same_after_conversion(tiny_llama_dir, calib, tmp_path, one_thread):
    """The `ctp` lm-eval model (prompt_mode=prepend: nothing precomputed before the swap) on the fake-quantized
    folder, before and after its Linears become Int4Linear: the same loglikelihoods."""
    from lm_eval.api.instance import Instance
    from transformers import AutoTokenizer

    from ctp_eval.eval.lm import CTPLM
    from ctp_eval.prompt import SoftPrompt

    src = ensure_compressed(str(tiny_llama_dir), "gptq:w4g64", calib=calib, cache_dir=tmp_path, progress=False)
    lm = CTPLM(pretrained=src, dtype="float32", device="cpu")
    prompt = tmp_path / "prompt.safetensors"
    SoftPrompt.for_model(torch.randn(6, 64, generator=torch.Generator().manual_seed(3)) * 0.5, lm.model,
                         AutoTokenizer.from_pretrained(src)).save(prompt)
    lm = CTPLM(pretrained=src, prompt=str(prompt), prompt_mode="prepend", dtype="float32", device="cpu")
    reqs = [Instance("loglikelihood", {}, (ctx, cont), 0) for ctx, cont in
            [("Paris is the capital of", " France"), ("one two three", " four five")]]
    before = [ll for ll, _ in lm.loglikelihood(reqs)]
    convert_model(lm.model, f"{src}/{QPARAMS_FILE}", "gptq:w4g64", dtype=torch.float32)
    assert not _block_linears(lm.model)
    after = [ll for ll, _ in lm.loglikelihood(reqs)]
    assert after == pytest.approx(before, rel=1e-5, abs=1e-4)


@needs_kernel
def test_ctp_weights_int4_runs_packed_with_its_prompt(tiny_llama_dir, calib, tmp_path, one_thread):
    """`lm_eval --model ctp --model_args ...,weights=int4`: packed before the prompt's cache is computed, scores
    as the fake-quantized model to bf16 rounding, and says so in the results; refused where it cannot apply."""
    from lm_eval.api.instance import Instance

    from ctp_eval.eval.lm import CTPLM
    from ctp_eval.prompt import SoftPrompt

    src = ensure_compressed(str(tiny_llama_dir), "gptq:w4g64", calib=calib, cache_dir=tmp_path, progress=False)
    prompt = tmp_path / "prompt.safetensors"
    SoftPrompt(torch.randn(6, 64, generator=torch.Generator().manual_seed(3)) * 0.5).save(prompt)
    reqs = [Instance("loglikelihood", {}, (ctx, cont), 0) for ctx, cont in
            [("Paris is the capital of", " France"), ("one two three", " four five")]]
    stored = CTPLM(pretrained=src, prompt=str(prompt), dtype="float32", device="cpu")
    packed = CTPLM(pretrained=src, prompt=str(prompt), dtype="float32", device="cpu", weights="int4")
    assert not _block_linears(packed.model) and _block_linears(stored.model)
    ref, ours = [ll for ll, _ in stored.loglikelihood(reqs)], [ll for ll, _ in packed.loglikelihood(reqs)]
    assert ours == pytest.approx(ref, rel=2e-2) and ours != ref  # bf16 compute: close, not bit-equal
    info = packed.get_model_info()
    assert info["ctp_weights"] == "int4" and info["ctp_int4"]["n_int4"] == 7 * packed.model.config.num_hidden_layers
    with pytest.raises(ValueError, match="not a compressed-tensors"):
        CTPLM(pretrained=str(tiny_llama_dir), dtype="float32", device="cpu", weights="int4")
    with pytest.raises(ValueError, match="weights must be one of"):
        CTPLM(pretrained=src, device="cpu", weights="int8")


@needs_kernel
@pytest.mark.parametrize("spec", ["gptq:w4g64", "gptq:w4g32-sym"])
def test_ctp_weights_int4_reads_a_compressed_tensors_export(tiny_llama_dir, calib, tmp_path, one_thread, spec):
    """weights=int4 on a `ctp-compress --export` folder (what llm-compressor's W4A16 folders also are): the grids
    come from its scale / zero-point tensors, and the packed model is the one our own folder gives."""
    from lm_eval.api.instance import Instance

    from ctp_eval.compress.export import export_compressed
    from ctp_eval.compress.int4cpu import compressed_tensors_grids
    from ctp_eval.eval.lm import CTPLM

    src = ensure_compressed(str(tiny_llama_dir), spec, calib=calib, cache_dir=tmp_path, progress=False)
    out = tmp_path / "export"
    export_compressed(src, out)
    assert not (out / QPARAMS_FILE).exists()
    grids, read_spec = compressed_tensors_grids(out)
    assert read_spec.startswith("rtn:w4g") and read_spec.endswith("-sym") == spec.endswith("-sym")
    reqs = [Instance("loglikelihood", {}, ("Paris is the capital of", " France"), 0)]
    ours = CTPLM(pretrained=src, dtype="float32", device="cpu", weights="int4")
    exported = CTPLM(pretrained=str(out), dtype="float32", device="cpu", weights="int4")
    assert not _block_linears(exported.model) and exported.int4_stats["n_int4"] == ours.int4_stats["n_int4"]
    assert exported.loglikelihood(reqs)[0][0] == pytest.approx(ours.loglikelihood(reqs)[0][0], abs=1e-5)


def test_compressed_tensors_grids_refuse_what_the_kernel_cannot_run(tmp_path):
    import json

    from ctp_eval.compress.int4cpu import compressed_tensors_grids

    def folder(weights, **extra):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, **extra}}}
        (d / "config.json").write_text(json.dumps({"quantization_config": qc}))
        return d

    w4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64, "symmetric": True}
    for weights, extra, reason in [(dict(w4, num_bits=8), {}, "do not fit"), (dict(w4, type="float"), {}, "do not fit"),
                                   (dict(w4, actorder="group"), {}, "act-order"),
                                   (w4, {"input_activations": {"num_bits": 8}}, "weight-only")]:
        with pytest.raises(Int4Error, match=reason):
            compressed_tensors_grids(folder(weights, **extra))
    with pytest.raises(Int4Error, match="no packed Linear"):
        compressed_tensors_grids(folder(w4))

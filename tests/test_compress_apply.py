"""Layer-by-layer traversal on tiny random Llama / OPT models built in-process."""

import pytest
import torch
from conftest import build_model

from ctp_eval.compress.apply import (
    CompressOptions,
    _sequential_groups,
    block_linears,
    capture_block_inputs,
    compress_model,
    find_blocks,
)
from ctp_eval.compress.quant import group_slices

VOCAB = 300


def _calib(n=8, seqlen=32, seed=0):
    return torch.randint(2, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _weights(model):
    _, blocks = find_blocks(model)
    return {f"{i}.{n}": lin.weight.detach().clone() for i, b in enumerate(blocks) for n, lin in block_linears(b).items()}


@pytest.fixture(params=["llama", "opt"])
def arch(request):
    return request.param


def test_find_blocks(arch):
    name, blocks = find_blocks(build_model(arch, vocab_size=VOCAB))
    assert name == {"llama": "model.layers", "opt": "model.decoder.layers"}[arch]
    assert len(blocks) == 2


def test_gptq_model(arch):
    model = build_model(arch, vocab_size=VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qp = {}
    stats = compress_model(model, "gptq:w3g16", _calib(), progress=False, qparams_out=qp)
    assert stats["n_linear"] == len(_weights(model)) == len(qp)
    for w in _weights(model).values():
        for sl in group_slices(w.shape[1], 16):
            assert max(row.unique().numel() for row in w[:, sl]) <= 8
    # only Linear weights inside blocks change: embeddings, norms, biases and lm_head are untouched
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".weight") and "layers." in k for k in changed)
    assert all(v["rel_err"] < v["rel_err_baseline"] for v in stats["layers"].values())
    assert torch.isfinite(model(_calib(2, 16, seed=1)).logits).all()


@pytest.mark.parametrize("spec,frac", [("sparsegpt:0.5", 0.5), ("sparsegpt:0.75", 0.75), ("magnitude:0.625", 0.625)])
def test_sparsity_exact_per_layer(spec, frac):
    model = build_model("llama", vocab_size=VOCAB)
    stats = compress_model(model, spec, _calib(), progress=False)
    for w in _weights(model).values():
        assert int((w == 0).sum()) == round(frac * w.numel())
    assert stats["zeros"] == pytest.approx(frac, abs=1e-6)
    if spec.startswith("sparsegpt"):
        assert stats["rel_err_mean"] < stats["rel_err_baseline_mean"]


def test_n_m_and_joint(arch):
    model = build_model(arch, vocab_size=VOCAB)
    compress_model(model, "sparsegpt:2:4+gptq:w4g32", _calib(), progress=False)
    for w in _weights(model).values():
        assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2)  # 2:4 pruned, plus rare rounded zeros
        for sl in group_slices(w.shape[1], 32):
            assert max(row.unique().numel() for row in w[:, sl]) <= 16


def test_joint_unstructured_and_baseline():
    for spec in ("sparsegpt:0.5+gptq:w4", "magnitude:0.5+rtn:w4"):
        model = build_model("llama", vocab_size=VOCAB)
        stats = compress_model(model, spec, _calib(), progress=False)
        for w in _weights(model).values():
            assert (w == 0).float().mean() >= 0.5
            assert max(row.unique().numel() for row in w) <= 16
        assert ("rel_err_mean" in stats) == spec.startswith("sparsegpt")


def test_deterministic():
    outs = []
    for _ in range(2):
        model = build_model("llama", vocab_size=VOCAB)
        compress_model(model, "sparsegpt:0.5+gptq:w3", _calib(), progress=False)
        outs.append(_weights(model))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_rtn_needs_no_calibration_and_none_is_noop():
    model = build_model("llama", vocab_size=VOCAB)
    ref = _weights(model)
    assert compress_model(model, "none", None)["layers"] == {}
    assert all(torch.equal(ref[k], v) for k, v in _weights(model).items())
    compress_model(model, "rtn:w2", None, progress=False)
    assert all(max(r.unique().numel() for r in w) <= 4 for w in _weights(model).values())
    with pytest.raises(ValueError, match="calibration"):
        compress_model(model, "gptq:w4", None)


def test_true_sequential_groups_and_batching():
    model = build_model("llama", vocab_size=VOCAB)
    _, blocks = find_blocks(model)
    batches = capture_block_inputs(model, blocks, _calib(), batch_size=3)
    assert [b.hidden.shape[0] for b in batches] == [3, 3, 2]
    assert all(len(b.calls) == len(blocks) for b in batches)
    first = [batches[0].hidden, *batches[0].calls[0]]
    groups = _sequential_groups(blocks[0], block_linears(blocks[0]), first, torch.device("cpu"))
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
    ]
    # batch size changes only float summation order; true-sequential runs and differs from the default
    a, b, c = (build_model("llama", vocab_size=VOCAB) for _ in range(3))
    compress_model(a, "gptq:w4", _calib(), batch_size=8, progress=False)
    compress_model(b, "gptq:w4", _calib(), batch_size=1, progress=False)
    compress_model(c, "gptq:w4", _calib(), options=CompressOptions(true_sequential=True), progress=False)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    agree = sum(torch.isclose(wa[k], wb[k], atol=1e-6).float().mean() for k in wa) / len(wa)
    assert agree > 0.99
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_unused_linear_is_named_and_left_unchanged(caplog, true_sequential):
    model = build_model("llama", vocab_size=VOCAB)
    _, blocks = find_blocks(model)
    blocks[1].mlp.spare = torch.nn.Linear(64, 64)  # registered in the block, never called (an unrouted expert)
    spare = blocks[1].mlp.spare.weight.detach().clone()
    with caplog.at_level("WARNING", logger="ctp_eval.compress.apply"):
        stats = compress_model(model, "gptq:w2", _calib(), progress=False,
                               options=CompressOptions(true_sequential=true_sequential))
    assert torch.equal(blocks[1].mlp.spare.weight, spare)
    assert stats["unused"] == ["model.layers.1.mlp.spare"]
    assert "model.layers.1.mlp.spare" in caplog.text and "left uncompressed" in caplog.text
    assert "model.layers.1.mlp.spare" not in stats["layers"]
    w = blocks[1].mlp.down_proj.weight
    assert max(row.unique().numel() for row in w) <= 4  # the Linears that ran were compressed


def test_linear_run_by_only_some_batches_is_compressed_in_true_sequential():
    """An expert that batch 0 does not route to still gets its Hessian from the other batches."""
    model = build_model("llama", vocab_size=VOCAB)
    _, blocks = find_blocks(model)
    mlp = blocks[0].mlp
    mlp.expert = torch.nn.Linear(64, 64)
    forward = mlp.forward

    def routed(x):
        out = forward(x)
        return out + mlp.expert(x) if x.shape[0] < 3 else out  # only the short last batch reaches the expert

    mlp.forward = routed
    stats = compress_model(model, "gptq:w2", _calib(n=8), batch_size=3, progress=False,
                           options=CompressOptions(true_sequential=True))
    assert "model.layers.0.mlp.expert" in stats["layers"] and "unused" not in stats
    assert max(row.unique().numel() for row in mlp.expert.weight) <= 4


def test_refuses_blocks_with_weights_outside_linear():
    from transformers import AutoModelForCausalLM, GPT2Config, MixtralConfig

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*attn\.c_attn: Conv1D.*nn\.Linear"):
        compress_model(gpt2, "rtn:w4", None)
    moe = AutoModelForCausalLM.from_config(MixtralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, vocab_size=VOCAB))
    with pytest.raises(ValueError, match=r"MixtralForCausalLM.*mlp\.experts: MixtralExperts \(4, 256, 64\)"):
        compress_model(moe, "gptq:w4", _calib())


def test_capture_restores_block_forward():
    model = build_model("llama", vocab_size=VOCAB)
    _, blocks = find_blocks(model)
    before = model(_calib(2)).logits
    sentinel = blocks[1].forward  # an instance-level forward, as accelerate's hooks install
    blocks[1].forward = sentinel
    capture_block_inputs(model, blocks, _calib(2), batch_size=2)
    assert "forward" not in blocks[0].__dict__ and blocks[1].__dict__["forward"] is sentinel
    assert torch.equal(model(_calib(2)).logits, before)  # the blocks compute again

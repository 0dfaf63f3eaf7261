"""Prompt-aware attention (ctp_eval.eval.prefix_attention) against the plain paths it replaces.

  * kernels: the log-sum-exp merge ("lse", torch's private CPU flash op) and its public fallback ("concat") equal
    one SDPA call over [prompt keys][text keys] with an explicit mask, outputs and all five input gradients, with
    grouped-query and plain multi-head attention, in transformers' (B, T, H, D) memory layout and a contiguous one;
  * every architecture of the matrix (tests/archs.py): logits equal the prepend path for every kernel, with the
    8-token sliding windows (sliding layers take the plain path) and with windows covering prompt + text (they take
    the split); which layers take the plain path, and why;
  * training: the shared-prefix loss and prompt gradient equal the prepend path's (llama, qwen2 with sliding and full
    layers, gemma3, opt), with CE and KD objectives, through the chunked LM head and the full-logits loss, with
    gradient checkpointing, and with bf16 weights and an fp32 prompt;
  * without the private op, "auto" falls back to the public kernel; a layer that never reads the prompt is an error;
  * the private op's self-check: on this torch it passes and the fused kernel runs; an op that reads the wrong kv
    heads, returns the log-sum-exp in another base or shifted (only the backward sees that), or raises sends "auto"
    to the public kernel with the prepend path's logits and prompt gradient, logged once.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from archs import ARCHS, WINDOW, build_arch

from ctp_eval.eval import prefix_attention as pa
from ctp_eval.prompt import forward_with_prompt
from ctp_eval.train import losses

K = 12  # prompt length: longer than the 8-token sliding window
T = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(model, k=K, seed=1, requires_grad=False):
    """(k, d) prompt at the scale of the model's own token vectors (Gemma's scaled embeddings included)."""
    with torch.no_grad():
        scale = model.get_input_embeddings()(torch.arange(300)).std().item()
    p = torch.randn(k, model.config.hidden_size, generator=torch.Generator().manual_seed(seed)) * scale
    return torch.nn.Parameter(p) if requires_grad else p


def _ids(b=3, t=T, seed=2):
    return torch.randint(2, 300, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- kernels


def _reference(q, kt, vt, kp, vp, scale):
    """One SDPA call over [prompt][text] keys with the explicit (T, k+T) mask: (B, T, H, D)."""
    b, h, t, _ = q.shape
    k, rep = kp.shape[2], h // kt.shape[1]
    keys = torch.cat([kp.expand(b, -1, -1, -1), kt], 2).repeat_interleave(rep, 1)
    values = torch.cat([vp.expand(b, -1, -1, -1), vt], 2).repeat_interleave(rep, 1)
    mask = torch.ones(t, k + t, dtype=torch.bool).tril(k)  # text row i sees the prompt and text 0..i
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("kernel", ["lse", "concat"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])
@pytest.mark.parametrize("layout", ["transformers", "contiguous"])
def test_kernels_equal_masked_attention_with_gradients(kernel, heads, layout):
    h, hkv = heads
    b, t, k, d, scale = 3, 13, 5, 8, 0.3
    gen = torch.Generator().manual_seed(0)
    if layout == "transformers":  # q = proj(x).view(B, T, H, D).transpose(1, 2)
        q = torch.randn(b, t, h, d, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(b, h, t, d, generator=gen)
    kt, vt = (torch.randn(b, hkv, t, d, generator=gen) for _ in range(2))
    kp, vp = (torch.randn(1, hkv, k, d, generator=gen) for _ in range(2))
    inputs = [x.requires_grad_() for x in (q, kt, vt, kp, vp)]
    grad_out = torch.randn(b, t, h, d, generator=gen)
    want = _reference(*inputs, scale)
    want_grads = torch.autograd.grad(want, inputs, grad_out)
    fn = (lambda *a: pa._LSEMerge.apply(*a, pa._private_flash())) if kernel == "lse" else pa._concat_causal
    got = fn(*inputs, scale)
    assert got.shape == (b, t, h, d) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # seen <= 4e-7
    for name, g, w in zip(("q", "k_text", "v_text", "k_prompt", "v_prompt"), torch.autograd.grad(got, inputs, grad_out),
                          want_grads):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)  # seen <= 7e-7


def test_lse_kernel_gradient_to_the_prompt_only():
    """The first layer: text states do not depend on the prompt, only the prompt's keys/values need a gradient."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 9, 4, 8, generator=gen).transpose(1, 2)
    kt, vt = (torch.randn(2, 2, 9, 8, generator=gen) for _ in range(2))
    kp, vp = (torch.randn(1, 2, 4, 8, generator=gen).requires_grad_() for _ in range(2))
    grad_out = torch.randn(2, 9, 4, 8, generator=gen)
    want = torch.autograd.grad(_reference(q, kt, vt, kp, vp, 0.3), (kp, vp), grad_out)
    got = torch.autograd.grad(pa._LSEMerge.apply(q, kt, vt, kp, vp, 0.3, pa._private_flash()), (kp, vp), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_lse_kernel_bf16_close_to_fp32():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 4, 8, generator=gen).transpose(1, 2)
    kt, vt = (torch.randn(2, 2, 16, 8, generator=gen) for _ in range(2))
    kp, vp = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(2))
    want = _reference(q, kt, vt, kp, vp, 0.35)
    got = pa._LSEMerge.apply(*(x.bfloat16() for x in (q, kt, vt, kp, vp)), 0.35, pa._private_flash())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=3e-2)  # bf16 inputs: ~3 significant digits


def test_fold_is_a_view_in_transformers_layout():
    q = torch.randn(3, 7, 4, 8).transpose(1, 2)  # (B, H, T, D) over (B, T, H, D) memory
    folded = pa._fold(q)
    assert folded.shape == (1, 4, 21, 8) and folded.data_ptr() == q.data_ptr()
    torch.testing.assert_close(pa._unfold(folded, 3), q, rtol=0, atol=0)


# ---------------------------------------------------------------- every architecture


# Layers on the plain path with the matrix's 8-token windows (prompt + text = 32 > 8) ...
PLAIN_SMALL_WINDOW = {"mistral": {0, 1, 2}, "qwen2": {1, 2}, "qwen3": {1, 2}, "gemma2": {0, 1, 2}, "gemma3": {0, 2}}
# ... and with windows covering prompt + text: only Gemma 2's soft-capping remains.
PLAIN_WIDE_WINDOW = {"gemma2": {0, 1, 2}}


@pytest.mark.parametrize("window", [WINDOW, 64])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_prepend_path_every_kernel(arch, window):
    model = build_arch(arch, window=window)
    prompt, ids = _prompt(model), _ids()
    with torch.no_grad():
        want = forward_with_prompt(model, ids, prompt)  # the reference: [prompt; text] as inputs_embeds
        prefix = pa.compute_prefix(model, prompt)
        assert set(prefix.keys) == {0, 1, 2} and all(v.shape[0] == 1 for v in prefix.keys.values())  # batch 1
        seen = {}
        for kernel in pa.KERNELS:
            p = seen[kernel] = prefix.with_kernel(kernel)
            got = pa.forward_text(model, ids, p).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=kernel)  # seen <= 4e-7
            assert p.read == {0, 1, 2}
            expected = (PLAIN_SMALL_WINDOW if window == WINDOW else PLAIN_WIDE_WINDOW).get(arch, set())
            assert set(p.plain_layers) == ({0, 1, 2} if kernel == "plain" else expected), (kernel, p.plain_layers)
        shared = forward_with_prompt(model, ids, prompt, shared_prefix=True)
        torch.testing.assert_close(shared, want, rtol=1e-5, atol=1e-5)
    if arch == "gemma2":
        assert set(seen["auto"].plain_layers.values()) == {"attention logit soft-capping"}


def test_plain_path_reasons_name_the_window():
    model = build_arch("mistral")
    prefix = pa.compute_prefix(model, _prompt(model))
    with torch.no_grad():
        pa.forward_text(model, _ids(), prefix)
    assert prefix.plain_layers == {i: f"sliding window {WINDOW} < prompt + text {K + T}" for i in range(3)}


def test_public_fallback_without_private_op(monkeypatch):
    model = build_arch("llama")
    prompt, ids = _prompt(model), _ids()
    with torch.no_grad():
        want = forward_with_prompt(model, ids, prompt)
    calls = []
    real = pa._concat_causal
    monkeypatch.setattr(pa, "_private_flash", lambda: None)
    monkeypatch.setattr(pa, "_concat_causal", lambda *a: calls.append(1) or real(*a))
    p = pa.compute_prefix(model, prompt.requires_grad_())
    got = pa.forward_text(model, ids, p).logits
    assert len(calls) == 3  # every layer through the public kernel
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()  # and it trains
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


# ---------------------------------------------------------------- the private op's self-check


def _wrong_kv_heads(ops):  # K/V heads read in another order, as a kernel without grouped-query indexing would
    fwd, bwd = ops
    return (lambda q, k, v, *a, **kw: fwd(q, k.flip(1), v.flip(1), *a, **kw)), bwd


def _lse_mapped(ops, fn):
    fwd, bwd = ops

    def forward(*a, **kw):
        out, lse = fwd(*a, **kw)
        return out, fn(lse)

    return forward, bwd


def _raising(ops):
    def forward(*a, **kw):
        raise RuntimeError("no kernel for this layout")

    return forward, ops[1]


BROKEN = {
    "wrong kv heads": _wrong_kv_heads,
    "log-sum-exp base 2": lambda ops: _lse_mapped(ops, lambda lse: lse / math.log(2)),
    # both parts shifted alike: the merged output is unchanged, only the backward (fed the merged lse) goes wrong
    "log-sum-exp shifted": lambda ops: _lse_mapped(ops, lambda lse: lse + 1),
    "raises": _raising,
}


def _spy_concat(monkeypatch) -> list:
    calls, real = [], pa._concat_causal
    monkeypatch.setattr(pa, "_concat_causal", lambda *a: calls.append(1) or real(*a))
    return calls


def _logits_and_prompt_grad(logits_fn, prompt):
    """Logits and the prompt's gradient of a fixed random projection of them (every position and vocab entry)."""
    prompt.grad = None
    logits = logits_fn()
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    (logits * weights).sum().backward()
    grad, prompt.grad = prompt.grad.clone(), None
    return logits.detach(), grad


def _records(caplog) -> list:
    return [r for r in caplog.records if r.name == pa.__name__]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_verdicts(monkeypatch, dtype):
    """This torch's op passes for grouped-query and multi-head layouts; every broken variant fails, bf16 too (the
    tolerance is not so loose that a semantic slip hides in rounding)."""
    monkeypatch.setattr(pa, "_VERDICTS", {})
    ops = pa._private_flash()
    for h, hkv, d in ((4, 2, 16), (9, 3, 64), (4, 4, 8)):
        q, kv = torch.zeros(1, h, 1, d, dtype=dtype), torch.zeros(1, hkv, 1, d, dtype=dtype)
        assert pa._lse_verdict(ops, q, kv, kv) == (True, "self-check against public SDPA passed"), (h, hkv, d)
        for name, make in BROKEN.items():
            ok, why = pa._lse_verdict(make(ops), q, kv, kv)
            assert not ok, (name, h, hkv, d)
            if name == "log-sum-exp shifted":
                assert why.startswith("self-check: d"), why  # the output matched: a gradient caught it
    assert len(pa._VERDICTS) == 3 * (1 + len(BROKEN))


def test_self_check_passes_and_the_fused_kernel_runs(monkeypatch, caplog):
    model = build_arch("llama").requires_grad_(False)
    prompt, ids = _prompt(model, requires_grad=True), _ids()
    want, want_grad = _logits_and_prompt_grad(lambda: forward_with_prompt(model, ids, prompt), prompt)
    fwd, bwd = pa._private_flash()
    counts = {"fwd": 0, "bwd": 0}

    def counting(name, op):
        return lambda *a, **kw: counts.__setitem__(name, counts[name] + 1) or op(*a, **kw)

    ops = (counting("fwd", fwd), counting("bwd", bwd))
    monkeypatch.setattr(pa, "_private_flash", lambda: ops)
    monkeypatch.setattr(pa, "_VERDICTS", {})
    calls = _spy_concat(monkeypatch)
    caplog.set_level(logging.INFO, logger=pa.__name__)
    for _ in range(2):  # the second pass reuses the verdict
        got, grad = _logits_and_prompt_grad(
            lambda: pa.forward_text(model, ids, pa.compute_prefix(model, prompt)).logits, prompt)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-4)  # entries up to ~60, seen <= 4e-5
    assert calls == []
    assert list(pa._VERDICTS.values()) == [(True, "self-check against public SDPA passed")]
    # the check once (2 forward, 2 backward calls), then per pass 2 forward calls per layer and 2 backward calls per
    # layer but the first (its text states do not depend on the prompt: only the prompt part's backward)
    assert counts == {"fwd": 2 + 2 * 3 * 2, "bwd": 2 + 2 * 5}
    [record] = _records(caplog)
    assert record.levelno == logging.INFO and "fused 'lse' kernel" in record.getMessage()


@pytest.mark.parametrize("broken", list(BROKEN))
def test_self_check_failure_falls_back_to_the_public_kernel(monkeypatch, caplog, broken):
    model = build_arch("llama").requires_grad_(False)
    prompt, ids = _prompt(model, requires_grad=True), _ids()
    want, want_grad = _logits_and_prompt_grad(lambda: forward_with_prompt(model, ids, prompt), prompt)
    bad = BROKEN[broken](pa._private_flash())
    monkeypatch.setattr(pa, "_private_flash", lambda: bad)
    monkeypatch.setattr(pa, "_VERDICTS", {})
    calls = _spy_concat(monkeypatch)
    caplog.set_level(logging.INFO, logger=pa.__name__)
    got, grad = _logits_and_prompt_grad(
        lambda: pa.forward_text(model, ids, pa.compute_prefix(model, prompt)).logits, prompt)
    assert len(calls) == 3  # every layer through the public kernel
    [(ok, why)] = pa._VERDICTS.values()  # one check for the three layers
    assert not ok
    if broken == "raises":
        assert why == "fused op raised RuntimeError: no kernel for this layout"
    [record] = _records(caplog)
    assert record.levelno == logging.WARNING
    assert "public 'concat' kernel" in record.getMessage() and why in record.getMessage()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-4)  # entries up to ~60, seen <= 4e-5


def test_explicit_lse_kernel_raises_when_the_check_fails(monkeypatch):
    model = build_arch("llama")
    bad = _raising(pa._private_flash())
    monkeypatch.setattr(pa, "_private_flash", lambda: bad)
    monkeypatch.setattr(pa, "_VERDICTS", {})
    prefix = pa.compute_prefix(model, _prompt(model), kernel="lse")
    with torch.no_grad(), pytest.raises(RuntimeError, match="kernel='lse' cannot run here: fused op raised"):
        pa.forward_text(model, _ids(), prefix)


def test_backward_runs_the_ops_its_forward_ran(monkeypatch):
    """The private op swapped between forward and backward cannot mix kernels within one step."""
    model = build_arch("llama").requires_grad_(False)
    prompt, ids = _prompt(model, requires_grad=True), _ids()
    want = forward_with_prompt(model, ids, prompt).sum()
    want.backward()
    want_grad, prompt.grad = prompt.grad.clone(), None
    loss = pa.forward_text(model, ids, pa.compute_prefix(model, prompt)).logits.sum()

    def fail(*a, **kw):
        raise AssertionError("backward called an op its forward did not run")

    monkeypatch.setattr(pa, "_private_flash", lambda: (fail, fail))
    loss.backward()
    torch.testing.assert_close(prompt.grad, want_grad, rtol=1e-4, atol=1e-6)


def test_a_layer_that_never_reads_the_prompt_is_an_error():
    model = build_arch("llama")
    prefix = pa.compute_prefix(model, _prompt(model))
    prefix.keys[7] = prefix.keys[0]  # a layer the model does not have: it will never read its states
    prefix.values[7] = prefix.values[0]
    with pytest.raises(RuntimeError, match=r"layers \[7\] did not read"):
        pa.forward_text(model, _ids(), prefix)


def test_model_without_prompt_is_unchanged_after_install():
    model = build_arch("qwen2")
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        name = pa.install(model)
        after = model(input_ids=ids).logits
    assert name == "ctp_prefix_sdpa" and pa.install(model) == name  # idempotent
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # the model's own attention when no prompt is passed


# ---------------------------------------------------------------- training


def _grad(fn, prompt):
    prompt.grad = None
    out = fn()
    g = prompt.grad.clone()
    prompt.grad = None
    return out, g


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "opt"])
@pytest.mark.parametrize("kind", ["ce", "ce+kd"])
def test_shared_prefix_gradients_equal_prepend(arch, kind):
    from ctp_eval.train.teacher import Teacher

    model = build_arch(arch).requires_grad_(False)
    objective = losses.Objective(kind, kd_weight=0.3)
    teacher = Teacher(build_arch(arch, seed=1), chunk=5).targets(_ids()) if objective.uses_teacher else None
    prompt, ids = _prompt(model, requires_grad=True), _ids()

    def full(shared):
        parts = losses.full_loss(model, ids, prompt, objective, teacher, shared_prefix=shared)
        parts["loss"].backward()
        return parts["loss"].detach()

    split = losses.split_head(model)

    def chunked(shared):
        return losses.chunked_loss_backward(split, ids, prompt, 7, objective, teacher, shared_prefix=shared)["loss"]

    want, want_grad = _grad(lambda: full(False), prompt)  # the prepend path
    for name, fn in (("full", lambda: full(True)), ("chunked", lambda: chunked(True)),
                     ("chunked-prepend", lambda: chunked(False))):
        loss, grad = _grad(fn, prompt)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6, msg=name)  # seen: rel <= 1e-6


def test_shared_prefix_with_gradient_checkpointing():
    model = build_arch("qwen2").requires_grad_(False)
    prompt, ids = _prompt(model, requires_grad=True), _ids()
    split = losses.split_head(model)
    want, want_grad = _grad(lambda: losses.chunked_loss_backward(split, ids, prompt, 7)["loss"], prompt)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # HF checkpoints only in train mode; the layers are re-run during backward
    try:
        loss, grad = _grad(lambda: losses.chunked_loss_backward(split, ids, prompt, 7)["loss"], prompt)
    finally:
        model.eval()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_bf16_weights_fp32_prompt():
    """ctp-train --dtype bfloat16 on CPU: bf16 model, fp32 master prompt; shared and prepend paths agree to bf16
    precision, the gradient reaching the prompt is fp32, and a few steps lower the loss."""
    from ctp_eval.train import TrainConfig, make_optimizer, train_step, tuners

    model = build_arch("llama").to(torch.bfloat16).requires_grad_(False)
    ref_model = build_arch("llama").requires_grad_(False)  # the same weights in fp32
    ids = _ids()
    init = _prompt(ref_model).detach()
    grads, loss_v = {}, {}
    for name, m, shared in (("bf16-shared", model, True), ("bf16-prepend", model, False), ("fp32", ref_model, True)):
        tuner = tuners.PromptTuner(m, init, loss_chunk=7, shared_prefix=shared)
        assert tuner.prompt.dtype == torch.float32
        loss_v[name] = tuner.loss_backward(ids)["loss"].item()
        assert tuner.prompt.grad.dtype == torch.float32
        grads[name] = tuner.prompt.grad.clone()
    assert loss_v["bf16-shared"] == pytest.approx(loss_v["bf16-prepend"], rel=1e-2)
    assert loss_v["bf16-shared"] == pytest.approx(loss_v["fp32"], rel=2e-2)
    for other in ("bf16-prepend", "fp32"):
        cos = F.cosine_similarity(grads["bf16-shared"].flatten(), grads[other].flatten(), dim=0)
        assert cos > 0.98, (other, cos)
    cfg = TrainConfig(out="-", k=K, seqlen=T, batch_size=3, steps=4, lr=0.05, loss_chunk=7, dtype="bfloat16")
    tuner = tuners.PromptTuner(model, init, loss_chunk=7)
    opt, sched = make_optimizer(tuner, cfg)
    losses_seen = [train_step(tuner, opt, sched, ids, cfg.max_grad_norm)[0] for _ in range(4)]
    assert losses_seen[-1] < losses_seen[0], losses_seen


# ---------------------------------------------------------------- evaluation through ctp


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ctp_cache_mode_equals_prepend_in_model_dtype(tiny_llama_dir, tiny_tokenizer, tmp_path, dtype):
    """`ctp` scores through prompt-aware attention in the model's dtype (bf16: the prompt's states are bf16 too)."""
    from ctp_eval.eval.lm import CTPLM
    from ctp_eval.prompt import SoftPrompt

    model = build_arch("llama")  # any model: only its scale matters for the prompt
    SoftPrompt.for_model(_prompt(model), model, tiny_tokenizer).save(tmp_path / "p.safetensors")
    lms = {mode: CTPLM(pretrained=str(tiny_llama_dir), prompt=str(tmp_path / "p.safetensors"), prompt_mode=mode,
                       device="cpu", dtype=dtype, batch_size=2) for mode in ("cache", "prepend")}
    assert lms["cache"].prefix.keys[0].dtype == getattr(torch, dtype)
    ids = _ids(b=2, t=16)
    got, want = (lms[mode]._model_call(ids).float() for mode in ("cache", "prepend"))
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16: the two paths round differently (seen 4e-3, logits ~0.6)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_training_shares_the_prefix_only_where_the_fused_kernel_runs():
    """CPU (torch's fused flash op with log-sum-exp): shared; a GPU (the copying "concat" kernel, slower than
    prepending): prepended. An explicit choice wins."""
    from ctp_eval.eval.prefix_attention import shared_prefix_pays
    from ctp_eval.train import tuners

    assert shared_prefix_pays("cpu") and shared_prefix_pays(torch.device("cpu"))
    assert not shared_prefix_pays("cuda") and not shared_prefix_pays("cuda:1") and not shared_prefix_pays("meta")
    model = build_arch("llama").requires_grad_(False)
    init = _prompt(model).detach()
    assert tuners.PromptTuner(model, init).shared_prefix is True
    assert tuners.PromptTuner(model, init, shared_prefix=False).shared_prefix is False
    meta = build_arch("llama").to("meta")
    assert tuners.PromptTuner(meta, init.to("meta")).shared_prefix is False

"""Every supported architecture family, on tiny random models (tests/archs.py), against independent references.

Per architecture:
  (a) calibration: with nothing compressed, the inputs the traversal feeds each block (and the last block's
      output) equal the model's own hidden states, so blocks of another attention type (sliding vs full,
      another rotary base) are calibrated on their own masks and rotary tables;
  (b) `hard_prompt=` gives the logits of prepending the same ids as input_ids (Gemma: scaled embeddings);
  (c) a soft prompt through `ctp`, in all three prompt modes (cache: prompt-aware attention; cache-plain: the
      transformers cache; prepend), equals a plain inputs_embeds reference for loglikelihood,
      loglikelihood_rolling and batched generate_until; the prompt (k=12) is longer than the 8-token sliding
      window, so sliding layers keep only part of the prompt's cache and take the plain path of prompt-aware
      attention (which layers do is checked, per architecture);
  (d) 3 ctp-train steps on a gptq:w4 model lower the loss, with the chunked loss (where the decoder/head split
      reproduces the logits; not under Gemma 2's final soft-capping) and the full-logits loss;
  (e) gptq:w4 beats round-to-nearest on every layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from archs import ARCHS, WINDOW, build_arch
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ctp_eval.compress.apply import (
    _run_block,
    calibrated_blocks,
    compress_model,
    find_blocks,
)
from ctp_eval.eval.lm import CTPLM
from ctp_eval.prompt import SoftPrompt

K = 12  # soft prompt length: longer than the sliding window
assert K > WINDOW
CONTEXTS = ["The quick brown fox", "Paris is the capital", "one two three four five six", "A"]
CONTINUATIONS = [" jumps over the lazy dog.", " of France.", " seven eight", " soft prompt"]
HARD = "soft prompt recovers the"
LONG_TEXT = " ".join(CONTEXTS + CONTINUATIONS) * 3  # ~270 tokens: three rolling windows
GEN = {"until": ["\n\n"], "max_gen_toks": 6}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def arch_dir(arch, tiny_tokenizer, tmp_path_factory):
    """Saved model + tokenizer + a K-row soft prompt at the scale of the model's own token vectors."""
    path = tmp_path_factory.mktemp(f"arch-{arch}")
    model = build_arch(arch, vocab_size=len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    with torch.no_grad():
        scale = model.get_input_embeddings()(torch.arange(len(tiny_tokenizer))).std().item()
    gen = torch.Generator().manual_seed(1)
    SoftPrompt.for_model(torch.randn(K, 64, generator=gen) * scale, model, tiny_tokenizer).save(path / "p.safetensors")
    return path


def _calib(n=3, seqlen=32, seed=0):
    return torch.randint(2, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def ctp(path, **kw):
    return CTPLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=2, **kw)


# ---------------------------------------------------------------- (a)


def test_a_noop_traversal_reproduces_hidden_states(arch):
    model = build_arch(arch)
    ids = _calib()  # 32 tokens > the 8-token window
    _, blocks = find_blocks(model)
    last_out = {}
    hook = blocks[-1].register_forward_hook(lambda _m, _i, out: last_out.setdefault("h", out))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states  # ref[i]: input of block i
    hook.remove()
    seen = 0
    for i, block, work, inputs in calibrated_blocks(model, blocks, ids, batch_size=2):  # batches of 2 + 1 rows
        torch.testing.assert_close(torch.cat([x[0] for x in inputs]), ref[i], rtol=1e-5, atol=1e-6)
        if i == len(blocks) - 1:
            torch.testing.assert_close(torch.cat(_run_block(block, inputs, work)), last_out["h"], rtol=1e-5, atol=1e-6)
        seen += 1
    assert seen == len(blocks) == 3


# ---------------------------------------------------------------- (b)


MODES = ("cache", "cache-plain", "prepend")
# Layers that run prompt-aware attention's plain path (ctp_eval.eval.prefix_attention) with these tiny models: sliding
# windows (8) shorter than prompt + text, and Gemma 2's attention logit soft-capping on every layer.
PLAIN_LAYERS = {"mistral": {0, 1, 2}, "qwen2": {1, 2}, "qwen3": {1, 2}, "gemma2": {0, 1, 2}, "gemma3": {0, 2}}


@pytest.mark.parametrize("mode", MODES)
def test_b_hard_prompt_equals_prepended_ids(arch_dir, mode):
    lm = ctp(arch_dir, hard_prompt=HARD, prompt_mode=mode)
    hard = lm.tokenizer(HARD, add_special_tokens=False).input_ids
    assert lm.k == len(hard)
    x = torch.tensor([lm.tok_encode(c + x) for c, x in zip(CONTEXTS[:2], CONTINUATIONS[:2])][0])[None]  # (1, T)
    with torch.no_grad():
        want = lm.model(input_ids=torch.cat([torch.tensor([hard]), x], 1)).logits[:, len(hard):]
    torch.testing.assert_close(lm._model_call(x), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- (c)


def _ref_logits(lm, prompt, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) float logits of [prompt; ids] through inputs_embeds, prompt positions dropped."""
    with torch.no_grad():
        emb = lm.model.get_input_embeddings()(torch.tensor([ids]))
        out = lm.model(inputs_embeds=torch.cat([prompt[None].to(emb.dtype), emb], 1)).logits[0, prompt.shape[0]:]
    return out.float()


def _ref_score(lm, prompt, context: list[int], continuation: list[int]) -> float:
    logp = F.log_softmax(_ref_logits(lm, prompt, (context + continuation)[:-1]), -1)  # the last id predicts nothing
    return sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))


def _ref_generate(lm, prompt, context: str) -> str:
    """Greedy decoding, one row at a time, no cache, no padding: the full sequence re-run for every token."""
    ids = lm.tok_encode(context)
    new: list[int] = []
    for _ in range(GEN["max_gen_toks"]):
        nxt = int(_ref_logits(lm, prompt, ids + new)[-1].argmax())
        if nxt == lm.tokenizer.eos_token_id:
            break
        new.append(nxt)
    return lm.tok_decode(new).split(GEN["until"][0])[0]


@pytest.fixture(scope="module")
def prompted(arch_dir):
    return {mode: ctp(arch_dir, prompt=str(arch_dir / "p.safetensors"), prompt_mode=mode) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_c_loglikelihood(prompted, mode, arch):
    lm = prompted[mode]
    reqs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(zip(CONTEXTS, CONTINUATIONS))]
    got = [ll for ll, _ in lm.loglikelihood(reqs)]
    want = [_ref_score(lm, lm.prompt_embeds, lm.tok_encode(c), lm.tok_encode(x)) for c, x in zip(CONTEXTS, CONTINUATIONS)]
    assert got == pytest.approx(want, abs=1e-4)
    if mode == "cache":  # prompt-aware attention ran, split where exact, plain path on exactly these layers
        assert lm.prefix.read == {0, 1, 2}
        assert set(lm.prefix.plain_layers) == PLAIN_LAYERS.get(arch, set()), lm.prefix.plain_layers


@pytest.mark.parametrize("mode", MODES)
def test_c_loglikelihood_rolling(prompted, mode):
    lm = prompted[mode]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (LONG_TEXT,), 0)])[0]
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        lm.tok_encode(LONG_TEXT), prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length, context_len=1)]
    assert len(windows) >= 2 and lm.max_length + lm.k <= 128  # several windows, each filling the model
    want = sum(_ref_score(lm, lm.prompt_embeds, ctx, cont) for ctx, cont in windows)
    assert got == pytest.approx(want, abs=5e-4)  # a sum over ~270 tokens (~1500 nats); seen <= 8e-5


@pytest.mark.parametrize("mode", MODES)
def test_c_batched_generate_until(prompted, mode):
    lm = prompted[mode]  # batch 2: two batches, each left-padded
    got = lm.generate_until([Instance("generate_until", {}, (c, dict(GEN)), i) for i, c in enumerate(CONTEXTS)])
    assert got == [_ref_generate(lm, lm.prompt_embeds, c) for c in CONTEXTS]


# ---------------------------------------------------------------- (d), (e)


@pytest.fixture(scope="module")
def gptq_model(arch, tiny_tokenizer):
    model = build_arch(arch, vocab_size=len(tiny_tokenizer))
    stats = compress_model(model, "gptq:w4", _calib(n=4), progress=False)
    return model.requires_grad_(False), stats


def test_d_three_train_steps_lower_the_loss(gptq_model, tiny_tokenizer, tmp_path, arch):
    from ctp_eval import train as T
    from ctp_eval.train.losses import split_head

    model, _ = gptq_model
    ids = _calib(n=2, seqlen=24, seed=3)
    split = split_head(model)
    assert (split is None) == (arch == "gemma2")  # only final logit soft-capping breaks lm_head(decoder(x))
    chunks = [0] if split is None else [0, 7]  # 0: full logits; 7: 23 targets per row in chunks of 7
    first = {}
    for chunk in chunks:
        cfg = T.TrainConfig(out=str(tmp_path / f"out{chunk}"), data="c4", val_data="c4", k=4, seqlen=24,
                            batch_size=2, steps=3, lr=0.1, loss_chunk=chunk, progress=False)
        tuner = T.build_tuner(model, tiny_tokenizer, cfg)
        opt, sched = T.make_optimizer(tuner, cfg)
        losses = [T.train_step(tuner, opt, sched, ids, cfg.max_grad_norm)[0] for _ in range(4)]  # 4th: after 3
        assert losses[3] < losses[0], (chunk, losses)
        first[chunk] = losses[0]
    assert first[chunks[-1]] == pytest.approx(first[0], rel=1e-5)  # same init: chunked == full loss


def test_e_gptq_beats_rtn_on_every_layer(gptq_model):
    _, stats = gptq_model
    assert stats["n_linear"] >= 3 * 4 and "unused" not in stats
    for name, layer in stats["layers"].items():
        assert layer["rel_err"] < layer["rel_err_baseline"], name


# ---------------------------------------------------------------- refusals


def test_models_that_cannot_take_a_prompt_are_refused():
    from transformers import LlamaForCausalLM

    from ctp_eval.models import UnsupportedModelError, check_supported

    check_supported(build_arch("llama"))  # no error

    class NoEmbeds(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask)

    with pytest.raises(UnsupportedModelError, match="NoEmbeds.forward takes no inputs_embeds"):
        check_supported(NoEmbeds(build_arch("llama").config))
    model = build_arch("llama")
    model.get_input_embeddings = lambda: None
    with pytest.raises(UnsupportedModelError, match="no input embedding module"):
        check_supported(model)

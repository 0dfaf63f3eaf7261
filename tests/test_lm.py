"""The `ctp` lm-eval model: prompted scoring and generation against independent references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from ctp_eval.eval.lm import CTPLM
from ctp_eval.prompt import PromptError, SoftPrompt

CONTEXTS = ["The quick brown fox", "Paris is the capital", "one two three four five six", "A"]
CONTINUATIONS = [" jumps over the lazy dog.", " of France.", " seven eight", " soft prompt"]


def make_prompt(model_dir, k=7, seed=1, scale=0.5):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    return SoftPrompt.for_model(torch.randn(k, model.config.hidden_size, generator=gen) * scale, model, tok)


@pytest.fixture(scope="module")
def prompt_file(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "p.safetensors"
    make_prompt(tiny_model_dir).save(path)
    return path


def ctp(model_dir, **kw):
    kw.setdefault("batch_size", 2)
    return CTPLM(pretrained=str(model_dir), device="cpu", dtype="float32", **kw)


def ll_requests():
    return [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(zip(CONTEXTS, CONTINUATIONS))]


def reference_loglikelihood(lm: CTPLM, context: str, continuation: str) -> float:
    """Hand-built: embed [prompt; context; continuation], sum log-probs of the continuation tokens."""
    ctx_ids = lm.tok_encode(context)
    cont_ids = lm.tok_encode(continuation)
    ids = torch.tensor([ctx_ids + cont_ids])
    embeds = lm.model.get_input_embeddings()(ids)
    k = lm.k
    if k:
        embeds = torch.cat([lm.prompt_embeds.unsqueeze(0), embeds], dim=1)
    with torch.no_grad():
        logits = lm.model(inputs_embeds=embeds).logits[0].float()
    logprobs = F.log_softmax(logits, dim=-1)
    total = 0.0
    for j, tok in enumerate(cont_ids):
        pos = k + len(ctx_ids) + j  # absolute position of the scored token
        total += logprobs[pos - 1, tok].item()
    return total


def test_prompted_loglikelihood_equals_inputs_embeds_reference(tiny_model_dir, prompt_file):
    lm = ctp(tiny_model_dir, prompt=str(prompt_file))
    got = [ll for ll, _ in lm.loglikelihood(ll_requests())]
    want = [reference_loglikelihood(lm, c, x) for c, x in zip(CONTEXTS, CONTINUATIONS)]
    assert got == pytest.approx(want, abs=1e-4)
    # and the prompt really changes the scores
    plain = [ll for ll, _ in ctp(tiny_model_dir).loglikelihood(ll_requests())]
    assert max(abs(a - b) for a, b in zip(got, plain)) > 1e-3


def test_prefix_cache_equals_prepend_path(tiny_model_dir, prompt_file):
    cached = ctp(tiny_model_dir, prompt=str(prompt_file), prompt_mode="cache")
    prepend = ctp(tiny_model_dir, prompt=str(prompt_file), prompt_mode="prepend")
    assert cached.prefix_kv is not None and prepend.prefix_kv is None
    a = [ll for ll, _ in cached.loglikelihood(ll_requests())]
    b = [ll for ll, _ in prepend.loglikelihood(ll_requests())]
    assert a == pytest.approx(b, abs=1e-4)
    text = " ".join(CONTEXTS + CONTINUATIONS) * 6  # long enough for several rolling windows
    roll = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert cached.loglikelihood_rolling(roll) == pytest.approx(prepend.loglikelihood_rolling(roll), abs=1e-3)
    gen = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 6}), i) for i, c in enumerate(CONTEXTS)]
    assert cached.generate_until(gen) == prepend.generate_until(gen)


def test_rolling_windows_shrink_by_k_and_score_same_tokens(tiny_model_dir, prompt_file, monkeypatch):
    lm = ctp(tiny_model_dir, prompt=str(prompt_file))
    plain = ctp(tiny_model_dir)
    assert lm.max_length == plain.max_length - lm.k
    seen = []
    original = CTPLM._model_call

    def spy(self, inps, *a, **kw):
        seen.append(inps.shape[1])
        return original(self, inps, *a, **kw)

    monkeypatch.setattr(CTPLM, "_model_call", spy)
    text = " ".join(CONTEXTS) * 20
    lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert seen and max(seen) + lm.k <= plain.max_length  # prompt + text fits the model window


def test_left_padded_batched_generation_equals_one_at_a_time(tiny_model_dir, prompt_file):
    lm = ctp(tiny_model_dir, prompt=str(prompt_file), batch_size=4)
    one = ctp(tiny_model_dir, prompt=str(prompt_file), batch_size=1)
    reqs = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 8}), i) for i, c in enumerate(CONTEXTS)]
    batched = lm.generate_until(reqs)
    single = one.generate_until(reqs)
    assert batched == single
    assert any(s for s in batched)  # something was generated


def test_stop_sequences_are_honoured(tiny_model_dir, prompt_file):
    lm = ctp(tiny_model_dir, prompt=str(prompt_file), batch_size=1)
    free = lm.generate_until([Instance("generate_until", {}, (CONTEXTS[0], {"until": ["\n\n"], "max_gen_toks": 12}), 0)])[0]
    assert len(free) >= 2
    stop = free[1:3]  # a string that occurs in the unconstrained output
    cut = lm.generate_until([Instance("generate_until", {}, (CONTEXTS[0], {"until": [stop], "max_gen_toks": 12}), 0)])[0]
    assert stop not in cut and free.startswith(cut) and len(cut) < len(free)


def test_empty_prompt_equals_hf_for_every_request_type(tiny_model_dir):
    ours = ctp(tiny_model_dir)
    hf = HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=2)
    assert [x for x, _ in ours.loglikelihood(ll_requests())] == pytest.approx([x for x, _ in hf.loglikelihood(ll_requests())])
    roll = [Instance("loglikelihood_rolling", {}, (" ".join(CONTEXTS) * 5,), 0)]
    assert ours.loglikelihood_rolling(roll) == pytest.approx(hf.loglikelihood_rolling(roll))
    gen = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 5}), i) for i, c in enumerate(CONTEXTS)]
    assert ours.generate_until(gen) == hf.generate_until(gen)


def test_hard_prompt_equals_prepending_its_tokens(tiny_model_dir):
    text = "soft prompt recovers"
    lm = ctp(tiny_model_dir, hard_prompt=text)
    hard_ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    assert lm.k == len(hard_ids)
    plain = ctp(tiny_model_dir)
    # Prepending the hard prompt's tokens to the context scores the continuation identically.
    got = [ll for ll, _ in lm.loglikelihood(ll_requests())]
    reqs = [Instance("loglikelihood", {}, (text + c, x), i) for i, (c, x) in enumerate(zip(CONTEXTS, CONTINUATIONS))]
    want = [ll for ll, _ in plain.loglikelihood(reqs)]
    # only valid where tokenization of text+context splits at the boundary; the tiny BPE does for these
    assert got == pytest.approx(want, abs=1e-4)


def test_paper_hard_prompt_alias(tiny_model_dir):
    from ctp_eval import PAPER_HARD_PROMPT

    lm = ctp(tiny_model_dir, hard_prompt="paper", max_length=512) if "llama" in str(tiny_model_dir) else None
    if lm is None:  # OPT's learned positions stop at 128: the 142-token paper prompt cannot fit
        with pytest.raises(ValueError, match="nothing would be left"):
            ctp(tiny_model_dir, hard_prompt="paper")
        return
    assert lm.k == len(lm.tokenizer(PAPER_HARD_PROMPT, add_special_tokens=False).input_ids)
    assert lm.max_length == 512 - lm.k


def test_wrong_hidden_size_is_refused(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.safetensors"
    SoftPrompt(torch.randn(4, 32)).save(bad)
    with pytest.raises(PromptError, match="hidden size 32"):
        ctp(tiny_model_dir, prompt=str(bad))


def test_wrong_tokenizer_is_refused(tiny_model_dir, tmp_path):
    prompt = make_prompt(tiny_model_dir)
    prompt.meta.tokenizer_fingerprint = "0123456789abcdef"
    path = tmp_path / "other-tok.safetensors"
    prompt.save(path)
    with pytest.raises(PromptError, match="different tokenizer"):
        ctp(tiny_model_dir, prompt=str(path))


def test_bad_prompt_mode(tiny_model_dir):
    with pytest.raises(ValueError, match="prompt_mode"):
        ctp(tiny_model_dir, prompt_mode="magic")


def test_compression_spec_compresses_on_load_caches_and_records(tiny_llama_dir, tmp_path, monkeypatch):
    from conftest import DATA_DIR

    monkeypatch.setenv("CTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CTP_DATA_DIR", str(DATA_DIR))
    lm = ctp(tiny_llama_dir, compression="gptq:w2", calib_nsamples=4, calib_seqlen=32)
    assert lm.compression == "gptq:w2"
    w = lm.model.model.layers[0].mlp.down_proj.weight
    assert max(len(torch.unique(row)) for row in w) <= 4  # 2 bits per output row
    cached = sorted((tmp_path / "cache" / "compressed").iterdir())
    assert len(cached) == 1
    again = ctp(tiny_llama_dir, compression="gptq:w2", calib_nsamples=4, calib_seqlen=32)  # cache hit
    assert torch.equal(again.model.model.layers[0].mlp.down_proj.weight, w)
    assert sorted((tmp_path / "cache" / "compressed").iterdir()) == cached
    # the cached folder is an ordinary checkpoint that records its own spec
    direct = ctp(cached[0])
    assert direct.compression == "gptq:w2" and direct.get_model_info()["ctp_compression"] == "gptq:w2"
    with pytest.raises(ValueError, match="Invalid compression spec"):
        ctp(tiny_llama_dir, compression="gptq:w99")


def test_compress_dtype_scores_another_dtypes_build(tiny_llama_dir, tmp_path, monkeypatch):
    from conftest import DATA_DIR

    monkeypatch.setenv("CTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CTP_DATA_DIR", str(DATA_DIR))
    fp32 = ctp(tiny_llama_dir, compression="gptq:w2", calib_nsamples=4, calib_seqlen=32)
    cached = sorted((tmp_path / "cache" / "compressed").iterdir())
    half = CTPLM(pretrained=str(tiny_llama_dir), device="cpu", dtype="bfloat16", compress_dtype="float32",
                 compression="gptq:w2", calib_nsamples=4, calib_seqlen=32, batch_size=2)
    assert sorted((tmp_path / "cache" / "compressed").iterdir()) == cached  # the fp32 build, not a bf16 one
    assert half.compression_build == fp32.compression_build
    w16 = half.model.model.layers[0].mlp.down_proj.weight
    assert w16.dtype == torch.bfloat16
    assert torch.equal(w16, fp32.model.model.layers[0].mlp.down_proj.weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="compress_dtype"):
        ctp(tiny_llama_dir, compress_dtype="float32")


def test_data_dir_model_arg_is_not_passed_to_transformers(tiny_llama_dir, tmp_path):
    lm = ctp(tiny_llama_dir, data_dir=str(tmp_path))  # HFLM would hand an unknown kwarg to from_pretrained
    assert lm.k == 0


def test_trainable_params_count_only_the_learned_prompt(tiny_model_dir, prompt_file):
    learned = ctp(tiny_model_dir, prompt=str(prompt_file))
    both = ctp(tiny_model_dir, prompt=str(prompt_file), hard_prompt="soft prompt")
    hard = ctp(tiny_model_dir, hard_prompt="soft prompt")
    assert learned.trainable_params() == 7 * 64  # make_prompt: k=7, hidden 64
    assert both.trainable_params() == 7 * 64 and both.k > 7
    assert hard.trainable_params() == 0

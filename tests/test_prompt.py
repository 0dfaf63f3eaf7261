"""Soft prompt file format, compatibility checks and PEFT interop (against PEFT itself)."""

from __future__ import annotations

import json

import pytest
import torch

from ctp_eval.prompt import (
    PromptError,
    PromptMetadata,
    SoftPrompt,
    forward_with_prompt,
    init_from_vocab,
    tokenizer_fingerprint,
)


@pytest.fixture()
def model_and_tok(tiny_tokenizer):
    from conftest import build_model

    return build_model("llama", vocab_size=len(tiny_tokenizer)), tiny_tokenizer


def test_save_load_roundtrip_keeps_tensor_and_metadata(model_and_tok, tmp_path):
    model, tok = model_and_tok
    p = SoftPrompt.for_model(torch.randn(9, 64), model, tok, compression="gptq:w3g128", steps=12, seed=3,
                             val_ppl_before=40.5, val_ppl_after=30.25, train_data="c4-train1000[:800]")
    path = p.save(tmp_path / "x.safetensors")
    q = SoftPrompt.load(path)
    assert torch.equal(p.embeds, q.embeds)
    assert q.meta == p.meta
    assert q.meta.tokenizer_fingerprint == tokenizer_fingerprint(tok)
    q.check_compatible(model, tok)  # no error


def test_corrupt_and_missing_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(PromptError, match="corrupt"):
        SoftPrompt.load(bad)
    with pytest.raises(PromptError, match="not found"):
        SoftPrompt.load(tmp_path / "nope.safetensors")
    (tmp_path / "dir").mkdir()
    with pytest.raises(PromptError, match="adapter_config.json"):
        SoftPrompt.load(tmp_path / "dir")


def test_wrong_tensor_name_and_future_version_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(PromptError, match="no 'prompt' tensor"):
        SoftPrompt.load(tmp_path / "w.safetensors")
    save_file({"prompt": torch.zeros(2, 3)}, str(tmp_path / "v.safetensors"), metadata={"ctp_format_version": "99"})
    with pytest.raises(PromptError, match="version 99"):
        SoftPrompt.load(tmp_path / "v.safetensors")


def test_nan_prompt_refused():
    with pytest.raises(PromptError, match="NaN"):
        SoftPrompt(torch.tensor([[float("nan"), 1.0]]))


def test_legacy_pth_loads_with_weights_only(tmp_path):
    t = torch.randn(3, 8)
    torch.save({"prompt": t}, tmp_path / "p.pth")
    assert torch.equal(SoftPrompt.load(tmp_path / "p.pth").embeds, t)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save(Evil(), tmp_path / "evil.pt")
    with pytest.raises(PromptError, match="weights_only"):
        SoftPrompt.load(tmp_path / "evil.pt")


def test_peft_roundtrip_preserves_tensor_exactly(model_and_tok, tmp_path):
    model, tok = model_and_tok
    p = SoftPrompt.for_model(torch.randn(6, 64), model, tok, compression="sparsegpt:0.5")
    p.to_peft(tmp_path / "adapter", model=model)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 6 and cfg["token_dim"] == 64
    q = SoftPrompt.load(tmp_path / "adapter")
    assert torch.equal(p.embeds, q.embeds)
    assert q.meta.compression == "sparsegpt:0.5"


def test_our_prompt_runs_under_peft_with_same_logits(model_and_tok, tmp_path):
    from peft import PeftModel

    model, tok = model_and_tok
    p = SoftPrompt.for_model(torch.randn(5, 64) * 0.3, model, tok)
    p.to_peft(tmp_path / "adapter", model=model)
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    ids = tok(["The quick brown fox jumps"], return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits[:, p.k:]  # PEFT returns logits for the k virtual positions too
        ours = forward_with_prompt(model, ids, p.embeds)
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_peft_trained_prompt_loads_here(model_and_tok, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    model, tok = model_and_tok
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_()
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    q = SoftPrompt.load(tmp_path / "theirs")
    assert torch.equal(q.embeds, peft_model.prompt_encoder["default"].embedding.weight.detach())


def test_lora_adapter_is_not_a_prompt(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(PromptError, match="LORA"):
        SoftPrompt.load(tmp_path)


def test_init_from_vocab_samples_embedding_rows(model_and_tok):
    model, _ = model_and_tok
    a = init_from_vocab(model, 10, seed=0)
    assert a.shape == (10, 64)
    weight = model.get_input_embeddings().weight
    for row in a:  # every row is a row of the vocabulary embedding
        assert (weight == row).all(dim=1).any()
    assert torch.equal(a, init_from_vocab(model, 10, seed=0))
    assert not torch.equal(a, init_from_vocab(model, 10, seed=1))


def test_metadata_unknown_keys_kept_in_extra():
    m = PromptMetadata.from_dict({"base_model": "x", "future_field": 1})
    assert m.base_model == "x" and m.extra == {"future_field": 1}


def test_token_vectors_include_the_models_embedding_scale(tiny_tokenizer):
    """Gemma scales embeddings by sqrt(hidden_size) inside the embedding module: prompt vectors made from
    token ids (hard prompt, vocabulary init) must carry that factor, as real tokens do."""
    from archs import build_arch

    model = build_arch("gemma3", vocab_size=len(tiny_tokenizer))
    weight = model.get_input_embeddings().weight
    factor = torch.tensor(model.config.hidden_size**0.5, dtype=weight.dtype)  # 8 at hidden 64
    text = "soft prompt recovers"
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    hard = SoftPrompt.from_text(text, model, tiny_tokenizer).embeds
    torch.testing.assert_close(hard, weight[ids].detach() * factor)
    vocab = init_from_vocab(model, 10, seed=0)
    for row in vocab:  # every row is a scaled row of the vocabulary embedding
        assert torch.isclose(weight.detach() * factor, row, rtol=1e-6, atol=0).all(dim=1).any()
    # and the hard prompt scores text exactly as its tokens prepended for real
    x = torch.tensor([tiny_tokenizer(" of France.", add_special_tokens=False).input_ids])
    with torch.no_grad():
        want = model(input_ids=torch.cat([torch.tensor([ids]), x], 1)).logits[:, len(ids):]
        torch.testing.assert_close(forward_with_prompt(model, x, hard), want, rtol=1e-5, atol=1e-6)

"""Prompt layout on a tokenizer that adds BOS (Llama, Mistral, Gemma): [BOS][prompt][text] everywhere.

References are built from token ids and the model's own embeddings, never from `tok_encode`, so a prompt put in
front of BOS (or a BOS counted twice) cannot pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import _CORPUS, build_model
from lm_eval.api.instance import Instance

from ctp_eval import train as T
from ctp_eval.eval.lm import CTPLM
from ctp_eval.prompt import SoftPrompt, layout_for, tokenizer_adds_bos

CONTEXTS = ["The quick brown fox", "Paris is the capital", "one two three four five six", "A"]
CONTINUATIONS = [" jumps over the lazy dog.", " of France.", " seven eight", " soft prompt"]
HARD = "soft prompt recovers"

pytestmark = pytest.mark.usefixtures("one_thread")


def build_bos_tokenizer():
    """A byte-level BPE whose post-processor adds a dedicated <s> in front of every text, as Llama's does."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>",
                                   pad_token="<pad>", model_max_length=128)


@pytest.fixture(scope="module")
def bos_dir(tmp_path_factory):
    tok = build_bos_tokenizer()
    model = build_model("llama", vocab_size=len(tok))
    model.config.bos_token_id = tok.bos_token_id
    path = tmp_path_factory.mktemp("tiny-llama-bos")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def ctp(path, **kw):
    kw.setdefault("batch_size", 2)
    return CTPLM(pretrained=str(path), device="cpu", dtype="float32", **kw)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def embeds_reference(model, tok, prefix_rows, context, continuation) -> float:
    """Sum of log-probs of the continuation after [BOS][prefix_rows][context] - the text's own BOS written once."""
    ctx, cont = ids_of(tok, context), ids_of(tok, continuation)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        rows = [embed(torch.tensor([[tok.bos_token_id]]))]
        if prefix_rows is not None:
            rows.append(prefix_rows.unsqueeze(0))
        rows.append(embed(torch.tensor([ctx + cont])))
        logp = F.log_softmax(model(inputs_embeds=torch.cat(rows, 1)).logits[0].float(), -1)
    start = sum(r.shape[1] for r in rows[:-1]) + len(ctx)  # position of the first continuation token
    return sum(logp[start + j - 1, t].item() for j, t in enumerate(cont))


def ll_requests():
    return [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(zip(CONTEXTS, CONTINUATIONS))]


def test_bos_detection():
    from conftest import build_tokenizer

    bos_tok, plain = build_bos_tokenizer(), build_tokenizer()
    assert tokenizer_adds_bos(bos_tok) and layout_for(bos_tok) == "after-bos"
    assert not tokenizer_adds_bos(plain) and layout_for(plain) == "prompt-first"
    assert tokenizer_adds_bos(plain, add_bos_token=True)  # lm-eval's add_bos_token=True wins


@pytest.mark.parametrize("mode", ["cache", "cache-plain", "prepend"])
def test_hard_prompt_goes_after_bos(bos_dir, mode):
    lm = ctp(bos_dir, hard_prompt=HARD, prompt_mode=mode)
    tok, model = lm.tokenizer, lm.model
    got = [ll for ll, _ in lm.loglikelihood(ll_requests())]
    want = []
    for c, x in zip(CONTEXTS, CONTINUATIONS):  # plain ids: [BOS][hard][context][continuation]
        ids = [tok.bos_token_id] + ids_of(tok, HARD) + ids_of(tok, c)
        cont = ids_of(tok, x)
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([ids + cont])).logits[0].float(), -1)
        want.append(sum(logp[len(ids) + j - 1, t].item() for j, t in enumerate(cont)))
    assert got == pytest.approx(want, abs=1e-4)


def prompt_with_layout(path, layout, k=5):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    gen = torch.Generator().manual_seed(3)
    return SoftPrompt.for_model(torch.randn(k, model.config.hidden_size, generator=gen), model, tok, layout=layout)


@pytest.mark.parametrize("mode", ["cache", "cache-plain", "prepend"])
def test_after_bos_prompt_scores_bos_prompt_text(bos_dir, tmp_path, mode):
    prompt = prompt_with_layout(bos_dir, "after-bos")
    path = prompt.save(tmp_path / "p.safetensors")
    lm = ctp(bos_dir, prompt=str(path), prompt_mode=mode)
    assert lm.prefix_len == prompt.k + 1 and lm.k == prompt.k
    got = [ll for ll, _ in lm.loglikelihood(ll_requests())]
    want = [embeds_reference(lm.model, lm.tokenizer, prompt.embeds, c, x) for c, x in zip(CONTEXTS, CONTINUATIONS)]
    assert got == pytest.approx(want, abs=1e-4)


def test_prompt_first_file_keeps_its_layout(bos_dir, tmp_path):
    """A file without the field (older files, PEFT adapters) keeps [prompt][BOS][text]."""
    prompt = prompt_with_layout(bos_dir, "prompt-first")
    path = prompt.save(tmp_path / "p.safetensors")
    lm = ctp(bos_dir, prompt=str(path))
    tok, model = lm.tokenizer, lm.model
    c, x = CONTEXTS[0], CONTINUATIONS[0]
    got = lm.loglikelihood([Instance("loglikelihood", {}, (c, x), 0)])[0][0]
    ids = [tok.bos_token_id] + ids_of(tok, c)
    cont = ids_of(tok, x)
    with torch.no_grad():
        embeds = torch.cat([prompt.embeds.unsqueeze(0), model.get_input_embeddings()(torch.tensor([ids + cont]))], 1)
        logp = F.log_softmax(model(inputs_embeds=embeds).logits[0].float(), -1)
    start = prompt.k + len(ids)
    assert got == pytest.approx(sum(logp[start + j - 1, t].item() for j, t in enumerate(cont)), abs=1e-4)


def test_rows_with_and_without_bos_in_one_batch(bos_dir, tmp_path):
    """A truncated row (no leading BOS) gets the prefix's BOS; a row with one has it absorbed, not doubled."""
    prompt = prompt_with_layout(bos_dir, "after-bos")
    lm = ctp(bos_dir, prompt=str(prompt.save(tmp_path / "p.safetensors")))
    tok, model = lm.tokenizer, lm.model
    body = ids_of(tok, "Paris is the capital of France")
    rows = torch.tensor([[tok.bos_token_id] + body, body + [tok.pad_token_id]])  # right-padded, as HFLM does
    got = lm._model_call(rows)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        head = torch.cat([embed(torch.tensor([[tok.bos_token_id]])), prompt.embeds.unsqueeze(0)], 1)  # (1, P, d)
        ref = model(inputs_embeds=torch.cat([head, embed(torch.tensor([body]))], 1)).logits[0]  # (P + n, V)
    P, n = head.shape[1], len(body)
    torch.testing.assert_close(got[0], ref[P - 1 : P + n], rtol=1e-4, atol=1e-4)  # BOS absorbed
    torch.testing.assert_close(got[1, :n], ref[P : P + n], rtol=1e-4, atol=1e-4)  # BOS supplied


@pytest.mark.parametrize("mode", ["cache", "prepend"])
def test_generation_after_bos(bos_dir, tmp_path, mode):
    prompt = prompt_with_layout(bos_dir, "after-bos")
    path = prompt.save(tmp_path / "p.safetensors")
    lm = ctp(bos_dir, prompt=str(path), prompt_mode=mode, batch_size=4)
    reqs = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 6}), i) for i, c in enumerate(CONTEXTS)]
    got = lm.generate_until(reqs)
    tok, model = lm.tokenizer, lm.model
    embed = model.get_input_embeddings()
    for c, text in zip(CONTEXTS, got):  # greedy from [BOS][prompt][context], one row at a time, by hand
        with torch.no_grad():
            rows = torch.cat([embed(torch.tensor([[tok.bos_token_id]])), prompt.embeds.unsqueeze(0),
                              embed(torch.tensor([ids_of(tok, c)]))], 1)
            new = model.generate(inputs_embeds=rows, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        want = tok.decode(new[0], skip_special_tokens=True).split("\n\n")[0]
        assert text == want


def test_trained_prompt_records_and_is_scored_in_its_layout(bos_dir, tmp_path):
    """ctp-train on a BOS tokenizer trains [BOS][prompt][window]; ctp applies the layout the file records."""
    words = "the quick brown fox jumps over the lazy dog Paris is the capital of France one two three".split()
    text = " ".join(words[i % len(words)] for i in range(1500))
    (tmp_path / "train.txt").write_text(text)
    cfg = T.TrainConfig(out=str(tmp_path / "out"), model=str(bos_dir), data=str(tmp_path / "train.txt"),
                        val_data=str(tmp_path / "train.txt"), k=4, seqlen=16, batch_size=2, steps=2, eval_every=2,
                        save_every=100, val_windows=2, val_seqlen=16, lr=0.1, progress=False)
    result = T.train(cfg)
    prompt = SoftPrompt.load(result.artifact)
    assert prompt.meta.layout == "after-bos"

    # the training objective was computed on [BOS][prompt][window]: rebuild it by hand for one batch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(bos_dir), AutoTokenizer.from_pretrained(bos_dir)
    tuner = T.build_tuner(model, tok, cfg)
    tuner.load_state({"prompt": prompt.embeds})
    ids = torch.tensor([ids_of(tok, text)[:16], ids_of(tok, text)[16:32]])
    got = tuner.loss_backward(ids)["ce"].item()
    embed = model.get_input_embeddings()
    with torch.no_grad():
        head = torch.cat([embed(torch.tensor([[tok.bos_token_id]]))[0], prompt.embeds]).expand(2, -1, -1)
        logits = model(inputs_embeds=torch.cat([head, embed(ids)], 1)).logits[:, head.shape[1]:]
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert got == pytest.approx(want, abs=1e-4)

    # and ctp scores it in that layout (read from the file, not assumed)
    lm = ctp(bos_dir, prompt=result.artifact)
    assert lm.layout == prompt.meta.layout
    got = [ll for ll, _ in lm.loglikelihood(ll_requests())]
    want = [embeds_reference(lm.model, tok, prompt.embeds, c, x) for c, x in zip(CONTEXTS, CONTINUATIONS)]
    assert got == pytest.approx(want, abs=1e-4)


def test_perplexity_windows_get_bos_with_and_without_a_prompt(bos_dir, tmp_path):
    """The ctp_* perplexity protocol: every window is [BOS][window] without a prompt and [BOS][prompt][window] with
    an "after-bos" one, so the two rows differ only by the prompt; the same tokens are scored either way."""
    from types import SimpleNamespace

    from ctp_eval.eval import ppl

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(_CORPUS[:40]), encoding="utf-8")
    seqlen = 24
    spec = {"corpus": str(corpus), "split": "test", "data_dir": "", "source": "tiny", "seqlen": seqlen, "n_shards": 2}
    reqs = [SimpleNamespace(doc={"text": "", "ctp_ppl": {**spec, "shard": s}}) for s in range(2)]
    prompt = prompt_with_layout(bos_dir, "after-bos")
    path = prompt.save(tmp_path / "p.safetensors")

    plain_lm, prompted_lm = ctp(bos_dir), ctp(bos_dir, prompt=str(path))
    tok, model = plain_lm.tokenizer, plain_lm.model
    wins = ppl.windows(torch.tensor(ids_of(tok, corpus.read_text())), seqlen)
    embed = model.get_input_embeddings()

    def reference(prefix_rows) -> tuple[float, float]:
        """(NLL of positions 1..T-1 of every window after [BOS][prefix_rows], the same with nothing in front)."""
        with_bos = without = 0.0
        for w in wins:
            with torch.no_grad():
                rows = [embed(torch.tensor([[tok.bos_token_id]]))]
                rows += [prefix_rows.unsqueeze(0)] if prefix_rows is not None else []
                p = sum(r.shape[1] for r in rows)
                logits = model(inputs_embeds=torch.cat(rows + [embed(w.unsqueeze(0))], 1)).logits[0, p:]
                bare = model(input_ids=w.unsqueeze(0)).logits[0]
            with_bos += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            without += F.cross_entropy(bare[:-1], w[1:], reduction="sum").item()
        return with_bos, without

    for lm, rows in ((plain_lm, None), (prompted_lm, prompt.embeds)):
        out = ppl.score_protocol_requests(lm, reqs)
        nll, n = -sum(o[0] for o in out), sum(o[1] for o in out)
        want, no_bos = reference(rows)
        assert n == len(wins) * (seqlen - 1)
        assert nll == pytest.approx(want, rel=1e-5)
        assert nll != pytest.approx(no_bos, rel=1e-4)  # BOS changes this model's scores, so a window without fails
    # perplexity(), the training-time route, puts BOS in front the same way
    direct = ppl.perplexity(model, tok, name=str(corpus), seqlen=seqlen)
    assert direct.nll_sum == pytest.approx(reference(None)[0], rel=1e-5)

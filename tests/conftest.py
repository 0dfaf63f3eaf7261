"""Shared fixtures: tiny random causal LMs and a tiny BPE tokenizer, all built in-process (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(os.environ.get("CTP_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A soft prompt recovers the accuracy of a compressed language model.",
    "Quantization and pruning make models smaller and faster, but they lose accuracy.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "one two three four five six seven eight nine ten eleven twelve",
] * 20


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences: real merges, real special tokens, ~instant."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>", model_max_length=128)


def build_model(arch: str = "llama", vocab_size: int = 300, seed: int = 0, max_pos: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_pos,
                          bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif arch == "opt":
        cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=vocab_size, max_position_embeddings=max_pos, word_embed_proj_dim=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=1)
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session", params=["llama", "opt"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer):
    """A saved tiny random model + tokenizer folder (what `pretrained=` takes), for llama and opt."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_model(request.param, vocab_size=len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model("llama", vocab_size=len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: extra threads only spin (measured 5 ms vs 300 ms per step)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    """A tiny local calibration corpus: 4 x 16 tokens, enough for every solver path."""
    import json

    from ctp_eval.compress.io import CalibConfig

    f = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    text = "Quantization and pruning make language models smaller, and a soft prompt recovers accuracy. "
    f.write_text("\n".join(json.dumps({"text": text * (3 + i)}) for i in range(6)))
    return CalibConfig(dataset=str(f), nsamples=4, seqlen=16, seed=0)



def instances(kind: str, args: list[tuple], docs: list | None = None):
    """lm-eval requests of one type, as a task would hand them to a model."""
    from lm_eval.api.instance import Instance

    docs = docs or [{}] * len(args)
    return [Instance(request_type=kind, doc=doc, arguments=a, idx=0) for a, doc in zip(args, docs)]

"""Initial values of a soft prompt (`ctp-train --init`): vocabulary rows, text, random, or another prompt file."""

from __future__ import annotations

import torch

from ctp_eval.prompt.format import PromptError, SoftPrompt
from ctp_eval.prompt.layout import token_vectors


def init_from_vocab(model, k: int, seed: int = 0, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Lester et al. init: the vectors of k tokens sampled without replacement from the vocabulary, or from
    `candidates` (token ids, e.g. the most frequent tokens of the training data)."""
    pool = candidates if candidates is not None else torch.arange(model.get_input_embeddings().weight.shape[0])
    if len(pool) < k:
        raise ValueError(f"cannot sample {k} distinct tokens from {len(pool)} candidates")
    gen = torch.Generator().manual_seed(seed)
    return token_vectors(model, pool[torch.randperm(len(pool), generator=gen)[:k]])


def most_frequent_tokens(windows: torch.Tensor, n: int) -> torch.Tensor:
    """The n most frequent token ids of the training windows (ties broken by id)."""
    counts = torch.bincount(windows.reshape(-1))
    return torch.argsort(-counts, stable=True)[:n]


def init_prompt(model, tokenizer, init: str, k: int, seed: int, train_windows: torch.Tensor | None = None) -> torch.Tensor:
    """(k, d) float32 initial prompt. vocab: the vectors of k sampled vocabulary tokens (Lester et al.); vocab:N:
    sampled from the N most frequent tokens of `train_windows` (Lester et al. use the 5,000 most common); random: N(0, s^2)
    with s the embedding matrix's std (a unit normal would dwarf real embeddings); text:... / paper: the
    text's token embeddings tiled or cut to k rows (as PEFT's TEXT init); file:PATH: a saved prompt (warm
    start, e.g. from another spec's), which must fit the model and have k rows."""
    if init == "vocab":
        return init_from_vocab(model, k, seed)
    if init.startswith("vocab:"):
        if train_windows is None:
            raise ValueError(f"--init {init} needs the training windows to count token frequencies")
        return init_from_vocab(model, k, seed, candidates=most_frequent_tokens(train_windows, int(init[6:])))
    if init.startswith("file:"):
        prompt = SoftPrompt.load(init[len("file:") :])
        prompt.check_compatible(model, tokenizer)
        if prompt.k != k:
            raise PromptError(f"--init {init}: the prompt has {prompt.k} rows, --k is {k}")
        return prompt.embeds.clone()
    weight = model.get_input_embeddings().weight
    if init == "random":
        # the std of prompt-space vectors: the embedding module's own scale (Gemma: sqrt(hidden)) included
        probe = torch.arange(min(1024, weight.shape[0]))
        scale = (token_vectors(model, probe).norm() / weight[probe.to(weight.device)].detach().float().cpu().norm()).item()
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(k, weight.shape[1], generator=gen) * weight.float().std().item() * scale
    text = "paper" if init == "paper" else init[len("text:") :]
    rows = SoftPrompt.from_text(text, model, tokenizer).embeds  # (n, d)
    reps = -(-k // rows.shape[0])
    return rows.repeat(reps, 1)[:k].clone()

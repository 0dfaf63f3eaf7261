"""The perplexity protocol, defined once: used by the `ctp_*` lm-eval tasks, `ctp-train` validation and benchmarks.

Protocol (GPTQ / the paper, with the soft prompt handled so that it cannot change what is scored):

1. the corpus split is joined into one string (`ctp_eval.data.corpus_text`) and tokenized once, without
   special tokens;
2. the token stream is cut into non-overlapping windows of `seqlen` tokens (default 1024, the paper's); the
   remainder is dropped;
3. in every window, positions 1..T-1 are scored (token t given tokens 0..t-1 of the same window);
4. PPL = exp(total NLL / number of scored tokens), accumulated in float64.

With a soft prompt the k prompt embeddings are prepended to every window *inside* `logits_fn`, which returns
logits aligned to the window's token ids. The prompt positions are therefore never scored and never counted:
the scored tokens are identical with and without a prompt. (The paper's released code averages the loss over
the prompt positions too, which understates prompted PPL by ~9% at k=100, seqlen=1024.) GPTQ divides by
windows x seqlen although it scores windows x (seqlen-1) tokens; we divide by what we score.

lm-eval route: `CTPLM.loglikelihood_rolling` hands every request whose doc carries a "ctp_ppl" dict to
`score_protocol_requests`, which applies this same protocol with `lm._model_call` (soft prompt applied inside)
as `logits_fn`. See `tasks/ppl_tasks.py` for how the tasks build such requests and report the numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEFAULT_SEQLEN = 1024  # the paper's evaluation length


@dataclass
class PPLResult:
    """Outcome of the protocol on one corpus split."""

    nll_sum: float  # total negative log-likelihood (nats) over all scored tokens
    n_tokens: int  # scored tokens: n_windows * (seqlen - 1), independent of any prompt
    n_windows: int
    seqlen: int
    source: str = ""  # which data, e.g. "wikitext2-test" or "c4-train1000[900:]" (see ctp_eval.data)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens) if self.n_tokens else float("nan")


def windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(N,) token ids -> (N // seqlen, seqlen) non-overlapping windows; the remainder is dropped."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 to score anything, got {seqlen}")
    ids = ids.reshape(-1)
    n = ids.numel() // seqlen
    return ids[: n * seqlen].view(n, seqlen)


def window_nlls(logits_fn, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> list[float]:
    """NLL (nats, float64) of positions 1..T-1 of each window: the protocol's unit of work.

    logits_fn: (B, T) ids -> (B, T, V) logits aligned to the ids (any prompt is prepended and stripped inside).
    windows: (nw, T) LongTensor, e.g. from `windows()`.
    """
    nw = windows.shape[0]
    out: list[float] = []  # python floats = float64: summing ~1e6 token NLLs in float32 would lose digits
    batches = range(0, nw, max(1, int(batch_size)))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"ppl windows (x{batch_size})", unit="batch")
    with torch.no_grad():
        for start in batches:
            ids = windows[start : start + batch_size]  # (B, T)
            logits = logits_fn(ids)  # (B, T, V)
            if logits.shape[:2] != ids.shape:
                raise ValueError(f"logits_fn returned {tuple(logits.shape)} for ids {tuple(ids.shape)}: not aligned")
            target = ids[:, 1:].to(logits.device)  # (B, T-1)
            # One window at a time over contiguous (T-1, V) rows: the softmax runs along the innermost dimension
            # (a (B, V, T) layout made it strided, 8x slower on a 262k vocabulary) and only one window's float32
            # copy of bf16/fp16 logits (too coarse to score) exists at a time. Per-token NLL, float64 sums.
            for row, tgt in zip(logits[:, :-1], target):
                nll = torch.nn.functional.cross_entropy(row.float(), tgt, reduction="none")  # (T-1,)
                out.append(nll.double().sum().item())
    return out


def protocol_nll(logits_fn, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> PPLResult:
    """Score positions 1..T-1 of every window (see `window_nlls`) and total them."""
    nw, seqlen = windows.shape
    nll_sum = math.fsum(window_nlls(logits_fn, windows, batch_size, progress))
    return PPLResult(nll_sum=nll_sum, n_tokens=nw * (seqlen - 1), n_windows=nw, seqlen=seqlen)


def window_lead(tokenizer, add_bos_token: bool | None = None, prefix_has_bos: bool = False) -> list[int]:
    """Token ids put in front of every window and never scored: BOS where the model's real inputs start with one
    (`prompt.layout.tokenizer_adds_bos`, the rule that puts a prompt after BOS) and no prefix already brings it.

    Rows without a prompt then see what rows with an "after-bos" prompt see, minus the prompt: BOS-dependent
    models (Gemma) score far worse on windows that start mid-text without it, which a prompt would otherwise be
    credited with recovering."""
    from ctp_eval.prompt.layout import tokenizer_adds_bos

    if prefix_has_bos or tokenizer is None or not tokenizer_adds_bos(tokenizer, add_bos_token):
        return []
    return [tokenizer.bos_token_id]


def with_lead(ids: torch.Tensor, lead: list[int]) -> torch.Tensor:
    """(B, T) ids -> (B, len(lead) + T): the same lead ids in front of every row."""
    if not lead:
        return ids
    return torch.cat([torch.tensor(lead, dtype=ids.dtype, device=ids.device).expand(ids.shape[0], -1), ids], dim=1)


def model_logits_fn(model, prompt: torch.Tensor | None = None, lead: list[int] = ()):
    """logits_fn for a HF causal LM, with an optional (k, d) soft prompt (the whole prefix, BOS included for an
    "after-bos" prompt) prepended to every window; without one, the `lead` ids (`window_lead`) go in front."""
    device = next(model.parameters()).device
    prefix = None  # the prompt's per-layer keys/values, computed once (prompt-aware attention)

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        nonlocal prefix
        if prompt is None:
            return model(input_ids=with_lead(ids, list(lead)).to(device)).logits[:, len(lead):]
        from ctp_eval.eval import prefix_attention

        if prefix is None:  # window_nlls runs under no_grad, so the prefix carries no graph
            prefix = prefix_attention.compute_prefix(model, prompt)
        return prefix_attention.forward_text(model, ids.to(device), prefix).logits

    return logits_fn


def perplexity(
    model,
    tokenizer,
    name: str = "wikitext2",
    split: str = "test",
    seqlen: int = DEFAULT_SEQLEN,
    prompt: torch.Tensor | None = None,
    batch_size: int = 1,
    limit_windows: int | None = None,
    data_dir=None,
    progress: bool = False,
) -> PPLResult:
    """The protocol on `name`/`split` (see ctp_eval.data) for a HF model and optional (k, d) soft prompt.

    `limit_windows` scores only the first windows (quick validation during training); the result's
    n_windows says how many were used, so a truncated number is never mistaken for a full one.
    """
    from ctp_eval import data

    wins = windows(data.token_stream(tokenizer, name, split, data_dir), seqlen)
    if limit_windows is not None:
        wins = wins[:limit_windows]
    if len(wins) == 0:
        raise ValueError(f"{name}/{split} is shorter than one window of {seqlen} tokens")
    was_training = model.training
    model.eval()  # dropout off: perplexity is a deterministic measurement
    try:
        lead = window_lead(tokenizer) if prompt is None else []
        result = protocol_nll(model_logits_fn(model, prompt, lead), wins, batch_size=batch_size, progress=progress)
    finally:
        model.train(was_training)
    result.source = data.corpus_source(name, split, data_dir)
    return result


# ---------------------------------------------------------------- lm-eval route


def shard_bounds(n: int, n_shards: int, shard: int) -> tuple[int, int]:
    """[lo, hi) of the `shard`-th of `n_shards` contiguous, near-equal slices of range(n)."""
    return shard * n // n_shards, (shard + 1) * n // n_shards


def protocol_batch_size(lm, seqlen: int) -> int:
    """Windows of `seqlen` tokens per forward: lm-eval's --batch_size, or with `auto` / `auto:N` the size HFLM's
    own detection finds for that length (it starts at max_batch_size and halves on out-of-memory)."""
    if isinstance(lm.batch_size, int):
        return lm.batch_size
    if str(lm.batch_size).startswith("auto") and hasattr(lm, "_detect_batch_size"):
        # HFLM sizes a request (key, context, continuation) by the (context + continuation)[:-1] it forwards:
        # seqlen + 1 ids give a (B, seqlen) test batch, the protocol's windows (through _model_call: prompt included).
        bs = lm._detect_batch_size([(None, [1], [1] * seqlen)], 0)
        logger.info("ctp_ppl: batch size %d for %d-token windows (lm-eval's detection)", bs, seqlen)
        return bs
    return 1


def is_protocol_request(request) -> bool:
    """A `loglikelihood_rolling` request of the ctp_* perplexity tasks: its doc carries a "ctp_ppl" spec."""
    return isinstance(request.doc, dict) and "ctp_ppl" in request.doc


def route_rolling(requests, score_protocol, score_rest, join_rest: bool = False) -> list:
    """`loglikelihood_rolling` for a model with both paths: the ctp_* perplexity tasks' requests go to
    `score_protocol` (the paper protocol), any other to `score_rest` (lm-eval's standard computation); results in
    request order. `join_rest` calls `score_rest` even with nothing to score (HFLM's rolling pass all-gathers
    across ranks, so every rank must join it; the caller then runs a throwaway request)."""
    protocol = [i for i, r in enumerate(requests) if is_protocol_request(r)]
    if not protocol:
        return score_rest(requests)
    out: list = [None] * len(requests)
    for i, res in zip(protocol, score_protocol([requests[i] for i in protocol]), strict=True):
        out[i] = res
    rest = [i for i in range(len(requests)) if i not in set(protocol)]
    if rest or join_rest:
        for i, res in zip(rest, score_rest([requests[i] for i in rest])):
            out[i] = res
    return out


def score_protocol_requests(lm, requests, window_nlls_fn=None) -> list[tuple[float, int]]:
    """Responses for lm-eval `loglikelihood_rolling` requests whose doc carries a "ctp_ppl" spec.

    doc["ctp_ppl"] = {"corpus", "split", "data_dir", "source", "seqlen", "shard", "n_shards"} (built by
    tasks/ppl_tasks.py). The corpus is re-read through ctp_eval.data and tokenized once per (corpus, split)
    with `lm.tok_encode`, so the windows are those of the whole corpus whatever the sharding; a request scores
    its shard's contiguous share of them. `lm._model_call` already prepends the soft prompt.
    Returns per request (loglikelihood sum, number of scored tokens).
    """
    from ctp_eval import data

    # An lm whose prefix absorbs a leading BOS ("after-bos" prompt) already puts BOS in front of every window.
    lead = window_lead(getattr(lm, "tokenizer", None), getattr(lm, "add_bos_token", None),
                       prefix_has_bos=getattr(lm, "absorb_id", None) is not None)
    streams: dict[tuple, torch.Tensor] = {}  # tokenize each corpus once per call, not once per shard
    by_seqlen: dict[int, list[tuple[int, torch.Tensor]]] = {}  # seqlen -> [(request index, (n, seqlen) windows)]
    for i, req in enumerate(requests):
        spec = req.doc["ctp_ppl"]
        seqlen = int(spec["seqlen"])
        if seqlen + len(lead) > lm.max_length:
            raise ValueError(
                f"ctp_ppl seqlen={seqlen}{' + BOS' if lead else ''} exceeds the model's usable length {lm.max_length} "
                "(model window minus prompt length); lower the task's ppl_seqlen"
            )
        key = (spec["corpus"], spec["split"], spec.get("data_dir") or None)
        if key not in streams:
            text = data.corpus_text(*key)
            streams[key] = torch.tensor(lm.tok_encode(text, add_special_tokens=False), dtype=torch.long)
        wins = windows(streams[key], seqlen)
        # With more shards than windows, the first len(wins) shards get one window each and the rest none,
        # so `--limit n` never lands on only empty shards.
        n_shards, shard = min(int(spec.get("n_shards", 1)), len(wins)), int(spec.get("shard", 0))
        lo, hi = shard_bounds(len(wins), n_shards, shard) if shard < n_shards else (len(wins), len(wins))
        by_seqlen.setdefault(seqlen, []).append((i, wins[lo:hi]))

    # Batch windows across requests (a shard may hold a single window), then total them per request.
    device = getattr(lm, "device", "cpu")
    nll = [0.0] * len(requests)
    n_tok = [0] * len(requests)
    for seqlen, parts in by_seqlen.items():
        owners = [i for i, w in parts for _ in range(len(w))]
        all_wins = torch.cat([w for _, w in parts])
        if window_nlls_fn is not None:  # a backend without logits (vLLM) scores whole windows itself
            per_window = window_nlls_fn(all_wins, lead)
        else:
            bs = protocol_batch_size(lm, seqlen + len(lead))
            per_window = window_nlls(lambda x: lm._model_call(with_lead(x, lead).to(device))[:, len(lead):], all_wins,
                                     batch_size=bs, progress=True)
        for i, value in zip(owners, per_window):
            nll[i] += value
            n_tok[i] += seqlen - 1
    for i, req in enumerate(requests):
        logger.debug("ctp_ppl %s shard %s: %d scored tokens", req.doc["ctp_ppl"]["source"],
                    req.doc["ctp_ppl"].get("shard", 0), n_tok[i])
    return [(-nll[i], n_tok[i]) for i in range(len(requests))]

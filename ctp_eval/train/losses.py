"""The training objective of `ctp-train`: next-token cross-entropy, distillation from the dense model, or both.

Positions: every loss scores the text positions 0..T-2 of a window, each predicting the next token (the tokens
the perplexity protocol in `ctp_eval.eval.ppl` scores); the k prompt positions are never scored.

* `ce`: mean cross-entropy against the next token.
* `kd`: mean KL(teacher || student) over the full vocabulary at each position, the teacher being the
  uncompressed model on the same window without a prompt (a full-vocabulary target per token: the standard
  way to recover a compressed model from few tokens). With cached top-k teacher log-probs (`ctp_eval.train.teacher`)
  the teacher distribution is renormalised over its top k tokens.
* `ce+kd`: (1 - kd_weight) * ce + kd_weight * kd.

Memory: the obvious `model(...).logits` materialises (B, k+T, V) logits, and the fp32 copy for the loss plus
its gradient triple that (SmolLM2: 4 x 612 x 49152 floats = 481 MB per copy); a teacher doubles it. We instead
run the decoder to hidden states, then push the T-1 text positions through the LM head `chunk` rows at a time:
each chunk's fp32 logits (student and teacher), loss and backward into the (detached) hidden states happen
before the next chunk, and one final `backward(hidden, grad)` carries the accumulated gradient through the
decoder. Same loss and gradient, peak logits memory of one chunk, no recomputation, and the k prompt positions
never reach the LM head. The split into decoder + head is verified numerically against `model(...).logits`
once per model; a model whose forward does anything else (logit soft-capping, scaling) falls back to the
full-logits path (`full_loss`).

Shared prompt (`shared_prefix=True`, what `ctp-train` runs on CPU; on GPUs it prepends, see
`prefix_attention.shared_prefix_pays`): the k prompt positions are identical for every row of a
batch, so the decoder runs them once per step (batch 1, with gradient) and every text row attends to their
keys/values through `ctp_eval.eval.prefix_attention` (broadcast, never copied B times). Same loss and gradient as
prepending the prompt to each row; at batch 4 x 256 with k=100 the decoder sees 100 + 1024 positions instead of
4 x 356 (-21%), and the prompt positions never reach the LM head or the loss either way. (A model with dropout
active in train mode, e.g. OPT's 0.1, then draws one dropout mask for the prompt positions, shared by the rows,
instead of one per row: the same expected gradient.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

LOSSES = ("ce", "kd", "ce+kd")


@dataclass(frozen=True)
class Objective:
    kind: str = "ce"  # one of LOSSES
    kd_weight: float = 0.5  # weight of the KL term in ce+kd

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.kind!r}")
        if not 0 <= self.kd_weight <= 1:
            raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")

    @property
    def uses_teacher(self) -> bool:
        return self.kind != "ce"

    @property
    def weights(self) -> tuple[float, float]:
        """(weight of ce, weight of kd)."""
        return {"ce": (1.0, 0.0), "kd": (0.0, 1.0)}.get(self.kind, (1.0 - self.kd_weight, self.kd_weight))


class TeacherTargets:
    """The teacher's next-token distribution at the n = B*(T-1) flat text positions of one batch.

    Either full log-probs computed chunk by chunk from the teacher's last hidden states (`hidden` (n, d) and its
    LM head `head`), from precomputed full logits (`logits` (n, V)), or a cached top-k (`topk_logprobs`,
    `topk_ids`, both (n, K)). `kl_sum(student_logp, s, e)` is sum over rows s..e-1 of KL(teacher || student).
    """

    def __init__(self, hidden=None, head=None, logits=None, topk_logprobs=None, topk_ids=None):
        self.hidden, self.head, self.logits = hidden, head, logits
        self.topk_logprobs, self.topk_ids = topk_logprobs, topk_ids

    def kl_sum(self, student_logp: torch.Tensor, s: int, e: int) -> torch.Tensor:
        if self.topk_ids is not None:
            ids = self.topk_ids[s:e].to(student_logp.device).long()  # (c, K)
            t = torch.log_softmax(self.topk_logprobs[s:e].to(student_logp.device).float(), dim=-1)  # renormalised
            return (t.exp() * (t - student_logp.gather(1, ids))).sum()
        t = self.chunk_logprobs(s, e).to(student_logp.device)  # (c, V)
        return F.kl_div(student_logp, t, log_target=True, reduction="sum")

    def chunk_logprobs(self, s: int, e: int) -> torch.Tensor:
        """(c, V) fp32 full-vocabulary log-probs of rows s..e-1 (not for a top-k cache)."""
        logits = self.logits[s:e] if self.logits is not None else self.head(self.hidden[s:e])
        return torch.log_softmax(logits.float(), dim=-1)


def _next_token_terms(logits: torch.Tensor, targets: torch.Tensor, objective: Objective, teacher, s: int, n: int):
    """(weighted loss, ce, kd) summed over rows s.. of the (c, V) `logits`, divided by n (a mean over n rows)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (c, V) fp32
    w_ce, w_kd = objective.weights
    ce = F.nll_loss(logp, targets, reduction="sum") / n
    kd = teacher.kl_sum(logp, s, s + logits.shape[0]) / n if teacher is not None else torch.zeros_like(ce)
    return w_ce * ce + w_kd * kd, ce.detach(), kd.detach()


def full_loss(model, ids: torch.Tensor, prompt: torch.Tensor | None, objective: Objective = Objective(),
              teacher: TeacherTargets | None = None, shared_prefix: bool = False) -> dict:
    """Reference loss through full logits (B, T, V) of `forward_with_prompt`; `loss` is differentiable."""
    from ctp_eval.prompt import forward_with_prompt

    logits = forward_with_prompt(model, ids, prompt, shared_prefix=shared_prefix)  # (B, T, V), prompt dropped
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    loss, ce, kd = _next_token_terms(flat, ids[:, 1:].reshape(-1), objective, teacher, 0, flat.shape[0])
    return {"loss": loss, "ce": ce, "kd": kd}


def split_head(model):
    """(input embedding, decoder, lm_head) if `lm_head(decoder(x))` reproduces `model(x).logits`, else None."""
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings()
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None:
        return None
    if getattr(model.config, "final_logit_softcapping", None):  # applied after lm_head (Gemma 2): not a split
        return None
    ids = torch.arange(8, device=head.weight.device).unsqueeze(0) % head.weight.shape[0]  # (1, 8)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits.float()
            got = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
    except Exception as err:  # an architecture whose decoder has another call signature
        logger.info("decoder/head split unavailable (%s); using full logits", err)
        return None
    finally:
        model.train(was_training)
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-3, atol=1e-3):
        logger.warning("%s does more than lm_head(decoder(x)); using the full-logits loss", type(model).__name__)
        return None
    return model.get_input_embeddings(), decoder, head


def decoder_hidden(split, ids: torch.Tensor, prompt: torch.Tensor | None, shared_prefix: bool = True) -> torch.Tensor:
    """(B, T, d) last hidden states at the text positions, with `prompt` (k, d) in front of every row: run once
    and shared by the rows (`shared_prefix`, see the module docstring), or prepended as inputs_embeds."""
    embed, decoder, _ = split
    if prompt is None:
        return decoder(input_ids=ids, use_cache=False).last_hidden_state
    if shared_prefix:
        from ctp_eval.eval import prefix_attention

        prefix = prefix_attention.compute_prefix(decoder, prompt)  # the k positions once, batch 1, with gradient
        return prefix_attention.forward_text(decoder, ids, prefix).last_hidden_state
    tok = embed(ids)  # (B, T, d), as forward_with_prompt builds it
    prefix = prompt.to(tok.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)  # (B, k, d)
    hidden = decoder(inputs_embeds=torch.cat([prefix, tok], 1), use_cache=False).last_hidden_state
    return hidden[:, prompt.shape[0] :]


def chunked_loss_backward(split, ids: torch.Tensor, prompt: torch.Tensor | None, chunk: int,
                          objective: Objective = Objective(), teacher: TeacherTargets | None = None,
                          shared_prefix: bool = True) -> dict:
    """Backpropagate the objective and return {loss, ce, kd} (detached). See module docstring."""
    head = split[2]
    h = decoder_hidden(split, ids, prompt, shared_prefix)[:, :-1]  # (B, T-1, d) predicts ids[:, 1:]
    leaf = h.detach().contiguous().requires_grad_()
    flat_h, flat_t = leaf.view(-1, leaf.shape[-1]), ids[:, 1:].reshape(-1)
    n = flat_t.numel()
    totals = {name: torch.zeros((), device=ids.device) for name in ("loss", "ce", "kd")}
    for s in range(0, n, chunk):
        loss, ce, kd = _next_token_terms(head(flat_h[s : s + chunk]), flat_t[s : s + chunk], objective, teacher, s, n)
        loss.backward()
        for name, v in (("loss", loss.detach()), ("ce", ce), ("kd", kd)):
            totals[name] += v
    if h.requires_grad:
        torch.autograd.backward(h, leaf.grad)
    return totals

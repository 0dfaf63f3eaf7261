"""What `ctp-train` optimises, and the loss: a soft prompt (the paper's method) or a LoRA adapter (its baseline).

Loss: mean next-token cross-entropy over the text tokens of each window, positions 1..T-1 (the same tokens the
perplexity protocol in `ctp_eval.ppl` scores); the k prompt positions are never scored.

Memory: the obvious `model(...).logits` materialises (B, k+T, V) logits, and the fp32 copy for the loss plus
its gradient triple that (SmolLM2: 4 x 612 x 49152 floats = 481 MB per copy). We instead run the decoder to
hidden states, then push T-1 text positions through the LM head `loss_chunk` rows at a time: each chunk's
fp32 logits, loss and backward into the (detached) hidden states happen before the next chunk, and one final
`backward(hidden, grad)` carries the accumulated gradient through the decoder. Same loss and gradient, peak
logits memory of one chunk, no recomputation, and the k prompt positions never reach the LM head. The split
into decoder + head is verified numerically against `model(...).logits` once per model; a model whose
forward does anything else (logit soft-capping, scaling) falls back to the full-logits path.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ctp_eval.prompt import SoftPrompt, forward_with_prompt, init_from_vocab

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- loss


def full_loss(model, ids: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
    """Reference loss through full logits (B, T, V) of `forward_with_prompt`; differentiable."""
    logits = forward_with_prompt(model, ids, prompt)  # (B, T, V), prompt positions already dropped
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def split_head(model):
    """(input embedding, decoder, lm_head) if `lm_head(decoder(x))` reproduces `model(x).logits`, else None."""
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings()
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None:
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


def chunked_loss_backward(split, ids: torch.Tensor, prompt: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """Backpropagate the mean text-token loss and return it (detached). See module docstring."""
    embed, decoder, head = split
    if prompt is None:
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, d)
    else:
        tok = embed(ids)  # (B, T, d), as forward_with_prompt builds it
        prefix = prompt.to(tok.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)  # (B, k, d)
        hidden = decoder(inputs_embeds=torch.cat([prefix, tok], 1), use_cache=False).last_hidden_state
        hidden = hidden[:, prompt.shape[0] :]  # (B, T, d): text positions only
    h = hidden[:, :-1]  # (B, T-1, d) predicts ids[:, 1:]
    leaf = h.detach().contiguous().requires_grad_()
    flat_h, flat_t = leaf.view(-1, leaf.shape[-1]), ids[:, 1:].reshape(-1)
    n = flat_t.numel()
    total = torch.zeros((), device=ids.device)
    for s in range(0, n, chunk):
        logits = head(flat_h[s : s + chunk]).float()  # (chunk, V): fp32 log-softmax, one chunk alive
        part = F.cross_entropy(logits, flat_t[s : s + chunk], reduction="sum") / n
        part.backward()
        total += part.detach()
    if h.requires_grad:
        torch.autograd.backward(h, leaf.grad)
    return total


# ---------------------------------------------------------------- prompt init


def init_prompt(model, tokenizer, init: str, k: int, seed: int) -> torch.Tensor:
    """(k, d) float32 initial prompt. vocab: k sampled vocabulary rows (Lester et al.); random: N(0, s^2)
    with s the embedding matrix's std (a unit normal would dwarf real embeddings); text:... / paper: the
    text's token embeddings tiled or cut to k rows (as PEFT's TEXT init)."""
    if init == "vocab":
        return init_from_vocab(model, k, seed)
    weight = model.get_input_embeddings().weight
    if init == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(k, weight.shape[1], generator=gen) * weight.float().std().item()
    text = "paper" if init == "paper" else init[len("text:") :]
    rows = SoftPrompt.from_text(text, model, tokenizer).embeds  # (n, d)
    reps = -(-k // rows.shape[0])
    return rows.repeat(reps, 1)[:k].clone()


# ---------------------------------------------------------------- tuners


class PromptTuner:
    """k trainable fp32 embeddings in front of a frozen model."""

    method = "prompt"

    def __init__(self, model, embeds: torch.Tensor, loss_chunk: int = 1024):
        self.model = model
        device = next(model.parameters()).device
        # fp32 master copy even for a bf16 model: updates of ~lr*1e-3 would vanish in bf16's 8-bit mantissa
        self.prompt = torch.nn.Parameter(embeds.detach().float().to(device).clone())
        self.loss_chunk = loss_chunk
        self.split = split_head(model) if loss_chunk > 0 else None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.prompt]

    @property
    def eval_model(self):
        return self.model

    @property
    def eval_prompt(self) -> torch.Tensor:
        return self.prompt.detach()

    def loss_backward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            loss = full_loss(self.model, ids, self.prompt)
            loss.backward()
            return loss.detach()
        return chunked_loss_backward(self.split, ids, self.prompt, self.loss_chunk)

    def state(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.prompt.detach().cpu().clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.prompt.copy_(state["prompt"])


class LoraTuner:
    """The paper's LoRA baseline through peft: adapters on the frozen (compressed) weights, no prompt."""

    method = "lora"

    def __init__(self, model, r: int, alpha: int, dropout: float, targets: list[str], loss_chunk: int = 1024):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                            task_type="CAUSAL_LM", bias="none")
        self.peft_model = get_peft_model(model, config)
        self.model = self.peft_model.get_base_model()  # the HF model, LoRA layers injected in place
        self.loss_chunk = loss_chunk
        self.split = split_head(self.model) if loss_chunk > 0 else None
        self._names = [n for n, p in self.peft_model.named_parameters() if p.requires_grad]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    @property
    def eval_model(self):
        return self.model

    eval_prompt = None

    def loss_backward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            loss = full_loss(self.model, ids, None)
            loss.backward()
            return loss.detach()
        return chunked_loss_backward(self.split, ids, None, self.loss_chunk)

    def state(self) -> dict[str, torch.Tensor]:
        params = dict(self.peft_model.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in self._names}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.peft_model.named_parameters())
        with torch.no_grad():
            for n in self._names:
                params[n].copy_(state[n])

    def save_adapter(self, directory, state: dict[str, torch.Tensor] | None = None) -> None:
        """PEFT adapter folder of `state` (default: current weights), written to a temp dir then renamed."""
        import os
        import shutil
        from pathlib import Path

        directory = Path(directory)
        current = self.state() if state is not None else None
        if state is not None:
            self.load_state(state)
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.peft_model.save_pretrained(str(tmp))
        finally:
            if current is not None:
                self.load_state(current)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)


def count_trainable(tuner) -> int:
    return sum(p.numel() for p in tuner.parameters())

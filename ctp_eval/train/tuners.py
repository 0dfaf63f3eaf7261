"""What `ctp-train` optimises: a soft prompt (the paper's method) or a LoRA adapter (its baseline).

Both hand their trainable tensors to the optimizer and backpropagate the objective of `ctp_eval.train.losses`
(cross-entropy, distillation or both) through the frozen model, chunked where the model allows.
"""

from __future__ import annotations

import logging

import torch

from ctp_eval.eval.prefix_attention import shared_prefix_pays
from ctp_eval.prompt.layout import prefix_embeds
from ctp_eval.train.losses import (
    Objective,
    TeacherTargets,
    chunked_loss_backward,
    full_loss,
    split_head,
)

logger = logging.getLogger(__name__)


def loss_backward(model, split, ids, prompt, chunk: int, objective: Objective, teacher: TeacherTargets | None,
                  shared_prefix: bool = True) -> dict:
    """Backpropagate the objective for ids (B, T) through the chunked split when there is one, else full logits;
    `shared_prefix`: the prompt runs once per batch and the rows share its keys/values (`ctp_eval.train.losses`)."""
    if split is None:
        parts = full_loss(model, ids, prompt, objective, teacher, shared_prefix=shared_prefix)
        parts["loss"].backward()
        return {k: v.detach() for k, v in parts.items()}
    return chunked_loss_backward(split, ids, prompt, chunk, objective, teacher, shared_prefix=shared_prefix)


# ---------------------------------------------------------------- tuners


class PromptTuner:
    """k trainable fp32 embeddings in front of a frozen model. `shared_prefix` True: the prompt's positions run
    once per batch and every row attends to them (`ctp_eval.eval.prefix_attention`); False: the plain path, the prompt
    prepended to every row (the reference; same loss and gradient). Default (None): whichever is faster on the
    model's device (`prefix_attention.shared_prefix_pays`: shared on CPU, prepended on GPUs). `layout`: where the
    prompt sits (`ctp_eval.prompt.LAYOUTS`); "after-bos" trains [BOS][prompt][window], as it will be applied."""

    method = "prompt"

    def __init__(self, model, embeds: torch.Tensor, loss_chunk: int = 1024, shared_prefix: bool | None = None,
                 tokenizer=None, layout: str = "prompt-first"):
        if layout != "prompt-first" and tokenizer is None:
            raise ValueError(f"layout {layout!r} needs the tokenizer (its BOS token)")
        self.model, self.tokenizer, self.layout = model, tokenizer, layout
        device = next(model.parameters()).device
        # fp32 master copy even for a bf16 model: updates of ~lr*1e-3 would vanish in bf16's 8-bit mantissa
        self.prompt = torch.nn.Parameter(embeds.detach().float().to(device).clone())
        self.loss_chunk = loss_chunk
        self.shared_prefix = shared_prefix_pays(device) if shared_prefix is None else shared_prefix
        self.split = split_head(model) if loss_chunk > 0 else None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.prompt]

    @property
    def eval_model(self):
        return self.model

    def prefix(self) -> torch.Tensor:
        """(P, d) what goes in front of every window, differentiable in the prompt (`prompt.prefix_embeds`)."""
        return prefix_embeds(self.model, self.tokenizer, self.prompt, self.layout)

    @property
    def eval_prompt(self) -> torch.Tensor:
        return self.prefix().detach()

    def loss_backward(self, ids: torch.Tensor, objective: Objective = Objective(),
                      teacher: TeacherTargets | None = None) -> dict:
        return loss_backward(self.model, self.split, ids, self.prefix(), self.loss_chunk, objective, teacher,
                             self.shared_prefix)

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

    def loss_backward(self, ids: torch.Tensor, objective: Objective = Objective(),
                      teacher: TeacherTargets | None = None) -> dict:
        return loss_backward(self.model, self.split, ids, None, self.loss_chunk, objective, teacher)

    def state(self) -> dict[str, torch.Tensor]:
        params = dict(self.peft_model.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in self._names}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.peft_model.named_parameters())
        with torch.no_grad():
            for n in self._names:
                params[n].copy_(state[n])

    def save_adapter(self, directory, state: dict[str, torch.Tensor] | None = None) -> None:
        """PEFT adapter folder of `state` (default: current weights), replaced atomically."""
        from ctp_eval.files import atomic_path

        current = self.state() if state is not None else None
        if state is not None:
            self.load_state(state)
        try:
            with atomic_path(directory, replace_folder=True) as tmp:
                self.peft_model.save_pretrained(str(tmp))
        finally:
            if current is not None:
                self.load_state(current)

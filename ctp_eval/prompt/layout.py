"""Where a prompt sits and how it is put in front of text: the one place a prompt meets the model.

Layout (`PromptMetadata.layout`, the one definition of where a prompt sits; `prefix_embeds` builds it):
  "prompt-first" - [prompt][text]: files without the field, PEFT adapters (virtual tokens first), and every
                   prompt trained with a tokenizer that adds no BOS (SmolLM2).
  "after-bos"    - [BOS][prompt][text]: prompts trained with a tokenizer that adds BOS (Llama, Mistral, Gemma),
                   whose real inputs start with BOS. A text that starts with BOS itself has it absorbed (the
                   prefix already holds it); a text without one (a training window, a truncated request) gets it.
"""

from __future__ import annotations

import torch

from ctp_eval.prompt.format import PromptError

LAYOUTS = ("prompt-first", "after-bos")


def tokenizer_adds_bos(tokenizer, add_bos_token: bool | None = None) -> bool:
    """Whether real inputs start with BOS: `add_bos_token` when given (lm-eval's HFLM arg), else what the
    tokenizer itself does to a plain text."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if add_bos_token is not None:
        return bool(add_bos_token)
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def layout_for(tokenizer, add_bos_token: bool | None = None) -> str:
    """The layout a prompt trained or applied with this tokenizer uses: after BOS where inputs start with one."""
    return "after-bos" if tokenizer_adds_bos(tokenizer, add_bos_token) else "prompt-first"


def combined_layout(tokenizer, hard_prompt: bool, learned_layout: str | None,
                    add_bos_token: bool | None = None) -> str:
    """Where a prefix of hard-prompt tokens and/or a learned prompt sits: after BOS when the learned prompt was
    trained there, or when a hard prompt leads and real inputs start with BOS (hard tokens go where text would);
    else first."""
    if learned_layout is not None and check_layout(learned_layout) == "after-bos":
        return "after-bos"
    return layout_for(tokenizer, add_bos_token) if hard_prompt else "prompt-first"


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise PromptError(f"unknown prompt layout {layout!r} (this ctp-eval knows {LAYOUTS})")
    return layout


def prefix_embeds(model, tokenizer, prompt: torch.Tensor, layout: str) -> torch.Tensor:
    """(P, d) what goes in front of the text: `prompt` (k, d) itself, or [BOS vector; prompt] for "after-bos"
    (P = k + 1). Differentiable in `prompt` (training builds its prefix here too); the BOS row is the model's own
    embedding of the token, as any real token's."""
    if check_layout(layout) == "prompt-first":
        return prompt
    bos = token_vectors(model, torch.tensor([tokenizer.bos_token_id]))  # (1, d)
    return torch.cat([bos.to(device=prompt.device, dtype=prompt.dtype), prompt])


def token_vectors(model, ids: torch.Tensor) -> torch.Tensor:
    """(n, d) float32 prompt vectors of token ids (n,): the model's own input-embedding forward, so any scale it
    applies (Gemma multiplies by sqrt(hidden_size) inside the embedding module) is included. The one way token
    ids become prompt vectors (hard prompts, text and vocabulary init); prompts live in inputs_embeds space."""
    embed = model.get_input_embeddings()
    with torch.no_grad():
        return embed(ids.to(embed.weight.device).unsqueeze(0))[0].detach().float().cpu().clone()


def forward_with_prompt(model, input_ids: torch.Tensor, prompt_embeds: torch.Tensor | None, attention_mask=None,
                        shared_prefix: bool = False):
    """Logits aligned to `input_ids` (B, T, V) with `prompt_embeds` (k, d) in front of every row.

    Default: the reference ("prepend") path, [prompt; text] as inputs_embeds; gradients flow into the prompt; the
    k prompt positions' logits are dropped so callers index logits exactly as without a prompt. Right padding
    only (positions count from 0). `shared_prefix=True`: the prompt's k positions run once for the whole batch
    and every row attends to their keys/values (`ctp_eval.eval.prefix_attention`); same logits and gradients, with
    (B-1)*k fewer decoder positions. It takes no attention_mask (right padding needs none: attention is causal).
    """
    if prompt_embeds is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    if shared_prefix:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("shared_prefix=True takes right-padded rows without an attention mask")
        from ctp_eval.eval import prefix_attention

        prefix = prefix_attention.compute_prefix(model, prompt_embeds)
        return prefix_attention.forward_text(model, input_ids, prefix).logits
    embed = model.get_input_embeddings()
    tok = embed(input_ids)  # (B, T, d)
    bsz, k = input_ids.shape[0], prompt_embeds.shape[0]
    prefix = prompt_embeds.to(device=tok.device, dtype=tok.dtype).unsqueeze(0).expand(bsz, -1, -1)  # (B, k, d)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(bsz, k), attention_mask], dim=1)
    out = model(inputs_embeds=torch.cat([prefix, tok], dim=1), attention_mask=attention_mask)
    return out.logits[:, k:]

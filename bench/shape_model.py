"""Save a random-weight model of a given shape with a given tokenizer: a stand-in for speed benchmarks.

Timings depend on a model's shape and dtype, not on its weights, so a machine that can't receive the real
checkpoint (the device machine takes 64 MiB; no hub there) can still time it. Never use one for quality figures.

    python bench/shape_model.py --like .gpu/smol --out /tmp/smol-shape                   # SmolLM2-135M's shape
    python bench/shape_model.py --like .gpu/smol --out /tmp/1b-shape --set hidden_size=2048 \\
        --set intermediate_size=8192 --set num_hidden_layers=16 --set num_attention_heads=32 \\
        --set num_key_value_heads=8 --set head_dim=64                                    # Llama-3.2-1B's shape

--like: a folder with config.json and the tokenizer's files (`--set` overrides config fields, JSON values).
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", required=True, help="folder with config.json and tokenizer files")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the weights are drawn (a GPU draws a 1B model in a second)")
    args = p.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(args.like)
    for item in args.set:
        field, _, value = item.partition("=")
        if not hasattr(config, field):
            p.error(f"{type(config).__name__} has no field {field!r}")
        setattr(config, field, json.loads(value))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.like).save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {type(model).__name__}, {n / 1e6:.0f}M parameters, {args.dtype}, random weights")


if __name__ == "__main__":
    main()

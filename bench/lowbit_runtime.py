"""A compressed model with its soft prompt, run with its weights kept as 4-bit codes (torch's CPU int4 matmul,
`ctp_eval.compress.int4cpu`) vs the same weights fake-quantized in floats vs the dense model.

    CTP_DATA_DIR=../shared/data python bench/lowbit_runtime.py                       # gptq:w4g64, first shard
    python bench/lowbit_runtime.py --variants fq-fp32,int4 --limit-windows 4         # quick

Variants, each in its own subprocess (so peak RSS is its own):
  dense-bf16   the base model in bf16 (the byte reference; its PPL is not compared: the prompt is the compressed one's)
  fq-fp32      the compressed checkpoint as saved: fake-quantized fp32 weights
  fq-bf16      the same weights cast to bf16
  int4         Linears as Int4Linear (packed codes, bf16 scales/zeros, bf16 compute, the kernel's fast path);
               embeddings, norms, LM head fp32; loaded holding one float Linear weight at a time, never the model
  int4-bf16    the same with the other weights in bf16 too

Each variant, in this order: Linear weight bytes held (every Linear but the LM head, which stays dense); peak RSS
(VmHWM) after decoding (transformers maps an fp32 checkpoint's file and reads the weights in at the first forward,
so the RSS right after loading undercounts it) and at the end; decode tokens/s: greedy generation of 64 tokens after
[prompt; 32 WikiText-2 tokens] fed as inputs_embeds (the time of 64 new tokens minus that of 1, best of
--decode-repeats); prefill tokens/s: `ctp_eval.eval.ppl`'s scoring loop (the prompt's keys/values once, then batch-1
1024-token windows with full logits) on the first --prefill-windows windows; WikiText-2 token PPL with the prompt
(`ctp_eval.eval.ppl.perplexity`) on the first of the ctp_wikitext2 task's 10 shards, for --ppl-variants only (bf16
matmuls are slow on a CPU without native bf16). Then ratio lines and the targets: int4 PPL within 1% of fq-fp32's,
int4 Linear bytes <= 0.35x dense bf16's. The peaks whole-run include the scoring's (1024, vocab) float logits and
their log-softmax, the same for every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchutil import (  # bench/benchutil.py: run as python bench/<script>.py
    load,
    machine,
)

VARIANTS = ("dense-bf16", "fq-fp32", "fq-bf16", "int4", "int4-bf16")
PROMPT = "prompts/smollm2-135m/gptq-w4-k100-ce-lr3e-2.safetensors"  # trained on gptq:w4; runs on any w4 build
N_SHARDS = 10  # the ctp_wikitext2 task's default sharding


def _status() -> dict:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def _load(variant: str, folder: str):
    """(model, tokenizer, bytes of the decoder blocks' Linear weights as held)."""
    import torch

    from ctp_eval import models
    from ctp_eval.compress.int4cpu import Int4Linear, load_int4_model

    if variant.startswith("int4"):
        model, tok, _ = load_int4_model(folder, dtype=torch.bfloat16 if variant == "int4-bf16" else torch.float32)
    else:
        dtype = torch.float32 if variant == "fq-fp32" else torch.bfloat16
        model, tok = models.load_model_and_tokenizer(None if variant == "dense-bf16" else folder, dtype=dtype)
    held, head = 0, model.get_output_embeddings()  # the LM head is never quantized: not counted
    for m in model.modules():
        if isinstance(m, Int4Linear):
            held += m.weight_bytes
        elif isinstance(m, torch.nn.Linear) and m is not head:  # a dense model's, or one the kernel left dense
            held += m.weight.numel() * m.weight.element_size()
    return model, tok, held


def worker(args) -> dict:
    import torch

    from ctp_eval import data
    from ctp_eval.eval import ppl
    from ctp_eval.prompt import SoftPrompt, prefix_embeds

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok, linear_bytes = _load(args.variant, args.folder)
    out = {"variant": args.variant, "load_s": time.perf_counter() - t0, "linear_bytes": linear_bytes,
           "model_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
           "rss_loaded": _status()["VmRSS"], "hwm_loaded": _status()["VmHWM"]}
    sp = SoftPrompt.load(args.prompt)
    prompt = prefix_embeds(model, tok, sp.embeds, sp.meta.layout)  # (k, d)

    # the decode context from the corpus' first characters: tokenizing the whole split (prefill, below) has a
    # transient of its own that would land in the load+decode peak
    text = data.corpus_text("wikitext2", "test", args.data_dir)[: 20 * args.context]
    ids = torch.tensor(data.encode(tok, text)[: args.context]).unsqueeze(0)  # (1, 32)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        x = torch.cat([prompt.to(embed.weight.dtype)[None], embed(ids)], dim=1)  # (1, k + 32, d)

        def generate(n):
            t = time.perf_counter()
            new = model.generate(inputs_embeds=x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            return time.perf_counter() - t, new[0].tolist()

        generate(2)  # warm-up
        t1 = min(generate(1)[0] for _ in range(args.decode_repeats))
        runs = [generate(args.new_tokens) for _ in range(args.decode_repeats)]
        tn, new = min(runs)[0], runs[0][1]
    out.update(decode_tok_s=(args.new_tokens - 1) / (tn - t1), generated=new, hwm_serve=_status()["VmHWM"])

    # prefill: perplexity's own loop (prompt keys/values once, then each window), timed without the tokenizing
    stream = data.token_stream(tok, "wikitext2", "test", args.data_dir)
    wins = ppl.windows(stream, args.seqlen)[: args.prefill_windows]
    t = time.perf_counter()
    ppl.protocol_nll(ppl.model_logits_fn(model, prompt), wins)
    out["prefill_tok_s"] = wins.numel() / (time.perf_counter() - t)
    if args.variant in args.ppl_variants.split(","):
        res = ppl.perplexity(model, tok, "wikitext2", "test", args.seqlen, prompt, limit_windows=args.windows,
                             data_dir=args.data_dir)
        out.update(ppl=res.ppl, n_windows=res.n_windows)
    out.update(rss_end=_status()["VmRSS"], hwm_end=_status()["VmHWM"])
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="gptq:w4g64")
    p.add_argument("--calib-nsamples", type=int, default=16, help="calibration as the leaderboard's builds")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--limit-windows", type=int, default=None, help="PPL windows; default: the first of 10 shards")
    p.add_argument("--ppl-variants", default="fq-fp32,int4", help="variants scored on those windows (bf16 matmuls "
                   "are slow on a CPU without native bf16)")
    p.add_argument("--prefill-windows", type=int, default=2, help="windows timed for prefill tokens/s")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--context", type=int, default=32, help="text tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--decode-repeats", type=int, default=3, help="generations timed per length (best is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one: steady timings on a shared machine)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # set in the worker subprocesses
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--windows", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data_dir = os.environ.get("CTP_DATA_DIR")
    if args.variant:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    from transformers import AutoTokenizer

    from ctp_eval import data
    from ctp_eval.compress import CalibConfig, ensure_compressed
    from ctp_eval.eval.ppl import shard_bounds

    folder = ensure_compressed(None, args.spec, calib=CalibConfig(nsamples=args.calib_nsamples,
                                                                  seqlen=args.calib_seqlen), data_dir=args.data_dir)
    windows = args.limit_windows
    if windows is None:
        tok = AutoTokenizer.from_pretrained(folder)
        n = data.token_stream(tok, "wikitext2", "test", args.data_dir).numel() // args.seqlen
        windows = shard_bounds(n, N_SHARDS, 0)[1]
    print(f"machine: {machine()}; workers use {args.threads} thread(s)")
    print(f"load before: {load()}; {args.spec} ({folder}), prompt {args.prompt}, {windows} windows x {args.seqlen}")
    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant, "--folder", folder, "--windows", str(windows),
               *(argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)  # a failure is reported below
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{variant}: failed\n{proc.stderr[-3000:]}")
            continue
        results[variant] = json.loads(lines[-1][len("RESULT "):])
        print(f"  {variant} done (load {load()})", flush=True)
    print(f"load after: {load()}\n")

    print("| variant | Linear weights MiB | all tensors MiB | peak RSS load+decode MiB | peak RSS whole run MiB | "
          "prefill tok/s | decode tok/s | WikiText-2 PPL (prompt) |")
    print("|---|---|---|---|---|---|---|---|")
    for v, r in results.items():
        shown = f"{r['ppl']:.4f}" if "ppl" in r else "not scored"
        print(f"| {v} | {_mib(r['linear_bytes'])} | {_mib(r['model_bytes'])} | {_mib(r['hwm_serve'])} | "
              f"{_mib(r['hwm_end'])} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {shown} |")
    print()
    ref_fq, ref_dense = results.get("fq-fp32"), results.get("dense-bf16")
    for name in ("int4", "int4-bf16", "fq-bf16"):
        r = results.get(name)
        for ref_name, ref in (("fq-fp32", ref_fq), ("dense-bf16", ref_dense)):
            if r is None or ref is None:
                continue
            line = [f"Linear bytes {r['linear_bytes'] / ref['linear_bytes']:.3f}x",
                    f"prefill {r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x",
                    f"decode {r['decode_tok_s'] / ref['decode_tok_s']:.2f}x",
                    f"peak RSS load+decode {r['hwm_serve'] / ref['hwm_serve']:.2f}x"]
            if ref_name == "dense-bf16" and name.startswith("int4"):
                ok = r["linear_bytes"] / ref["linear_bytes"] <= 0.35
                line[0] += f" (target <= 0.35x: {'met' if ok else 'MISSED'})"
            if ref_name == "fq-fp32":
                if "ppl" in r and "ppl" in ref:
                    rel = r["ppl"] / ref["ppl"] - 1
                    target = f" (target within 1%: {'met' if abs(rel) <= 0.01 else 'MISSED'})" if "int4" in name else ""
                    line.insert(0, f"PPL {rel:+.3%}{target}")
                same = next((i for i, (a, b) in enumerate(zip(r["generated"], ref["generated"])) if a != b), None)
                line.append("greedy tokens " + ("all equal" if same is None else f"equal up to token {same}"))
            print(f"{name} / {ref_name}: " + ", ".join(line))


if __name__ == "__main__":
    main()

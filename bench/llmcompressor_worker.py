"""One llm-compressor `oneshot` run for bench/vs_llmcompressor.py. Runs in the llm-compressor venv, not ours:
it imports neither ctp_eval nor anything else of this repository.

    <llmc-venv>/bin/python bench/llmcompressor_worker.py CONFIG.json
    <llmc-venv>/bin/python bench/llmcompressor_worker.py --versions

CONFIG.json (written by vs_llmcompressor.py):
  model_dir    plain HF folder (fp32 safetensors + tokenizer) to compress
  calib        safetensors file holding `input_ids` (n, seqlen) int64: the calibration both tools see
  out_dir      where the compressed model goes, as a plain dense HF folder (model_dir's files, new weights)
  result       JSON file this script writes: oneshot wall time, versions, settings
  method       "gptq" or "sparsegpt"
  threads      torch CPU threads
  batch_size   calibration batch size
  gptq:        bits, group_size (0 = per output channel), sym, actorder (null | "weight"), damp, blocksize
  sparsegpt:   sparsity, mask_structure ("0:0" unstructured or "N:M"), damp, blocksize

Only `oneshot` is timed (time.perf_counter around the call); loading and saving are not. The model is loaded
in fp32 and handed to `oneshot` as an object, so its time covers what `oneshot` does itself: batching the
(already tokenized) dataset, tracing the decoder layers, and the layer-by-layer calibration and solves with
the errors propagated to the next layer.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path


def versions() -> dict:
    return {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}


# A regex, not "lm_head": SparseGPTModifier matches `ignore` against "lm_head." (the name of a target layer that
# is itself a Linear, plus "."), so a plain "lm_head" leaves the LM head to be pruned, and with tied embeddings
# the input embeddings with it. GPTQModifier matches "lm_head" either way.
IGNORE = ["re:.*lm_head"]


def recipe(cfg: dict):
    """The llm-compressor modifier for the config; lm_head is ignored (ours compresses the decoder blocks only)."""
    if cfg["method"] == "gptq":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import GPTQModifier

        group = cfg["group_size"]
        weights = QuantizationArgs(
            num_bits=cfg["bits"], type="int", symmetric=cfg["sym"],
            strategy="group" if group else "channel", group_size=group or None,
            observer="memoryless_minmax",  # min-max of the weights, the range widened to hold 0 (as ours)
        )
        return GPTQModifier(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
            ignore=IGNORE,
            # said at the modifier level: its default ("static") would replace the scheme's None
            actorder=cfg["actorder"],
            dampening_frac=cfg["damp"], block_size=cfg["blocksize"],
        )
    if cfg["method"] == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(
            sparsity=cfg["sparsity"], mask_structure=cfg["mask_structure"], targets=["Linear"],
            ignore=IGNORE, dampening_frac=cfg["damp"], block_size=cfg["blocksize"],
        )
    raise SystemExit(f"llmcompressor_worker: unknown method {cfg['method']!r}")


def off_grid(model) -> float:
    """Largest |w - fake_quantize(w)| over the quantized Linears: 0 when every weight sits on its grid."""
    import torch
    from compressed_tensors.quantization import fake_quantize

    worst = 0.0
    for m in model.modules():
        args = getattr(getattr(m, "quantization_scheme", None), "weights", None)
        if args is None or not hasattr(m, "weight_scale"):
            continue
        with torch.no_grad():
            q = fake_quantize(m.weight, m.weight_scale, getattr(m, "weight_zero_point", None), args)
        worst = max(worst, float((m.weight - q).abs().max()))
    return worst


def save_dense(model, model_dir: Path, out_dir: Path) -> None:
    """The compressed weights under the source checkpoint's own keys (no scales, zero points or
    quantization_config) plus the source's config and tokenizer files: any transformers loads it as a plain model."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    keys: set[str] = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    state = model.state_dict()
    missing = sorted(keys - state.keys())
    if missing:
        raise SystemExit(f"llmcompressor_worker: the compressed model lacks {len(missing)} weights, e.g. {missing[:3]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: state[k].detach().to(torch.float32).contiguous() for k in sorted(keys)},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out_dir / f.name)


def main(config: str) -> None:
    cfg = json.loads(Path(config).read_text())
    import torch

    torch.set_num_threads(int(cfg["threads"]))
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(cfg["model_dir"])
    ids = load_file(cfg["calib"])["input_ids"]  # (nsamples, seqlen) int64, written by our side
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    modifier = recipe(cfg)

    t0 = time.perf_counter()
    oneshot(
        model=model, tokenizer=tok, recipe=modifier, dataset=ds, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1], batch_size=cfg["batch_size"],
        shuffle_calibration_samples=False,  # same batches as ours (the order does not change the Hessians)
        pipeline="sequential",
    )
    wall = time.perf_counter() - t0

    result = {"wall_s": wall, "versions": versions(), "torch_threads": torch.get_num_threads(),
              "max_off_grid": off_grid(model) if cfg["method"] == "gptq" else None, "modifier": repr(modifier)}
    save_dense(model, model_dir, Path(cfg["out_dir"]))
    Path(cfg["result"]).write_text(json.dumps(result, indent=1))
    print("LLMC_RESULT " + json.dumps({k: result[k] for k in ("wall_s", "torch_threads", "max_off_grid")}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--versions"]:
        print(json.dumps(versions()))
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        raise SystemExit(__doc__)

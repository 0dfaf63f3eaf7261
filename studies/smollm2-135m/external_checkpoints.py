"""Make SmolLM2-135M checkpoints the way other tools' users do, for "Prompts on other tools' compressions".

Each tool quantizes the dense embedded SmolLM2 with its own code and saves a folder transformers loads through that
tool. Calibration (where the tool takes any) is our own GPTQ calibration: 16 C4-train crops of 512 tokens, seed 0.

  python studies/smollm2-135m/external_checkpoints.py bnb-nf4 OUT          # bitsandbytes, this venv
  LLMC_PY=/path/to/llmc-venv/bin/python \
  python studies/smollm2-135m/external_checkpoints.py llmc-w4a16 OUT       # llm-compressor GPTQ, per channel
  (llmc-w4a16g64: groups of 64; llmc-w3a16g128: 3 bits in groups of 128, the grid of our gptq:w3g128)

llm-compressor pins its own transformers, so it runs in its own venv (`pip install torch==2.13.0 llmcompressor`,
then `pip install --no-deps -e .` of this project); the command re-runs itself there when LLMC_PY is set.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

CALIB_NSAMPLES, CALIB_SEQLEN = 16, 512


def dense_dir() -> str:
    from ctp_eval.models import resolve_pretrained

    return resolve_pretrained("smollm2")


def bnb_nf4(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(dense_dir(), quantization_config=config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(dense_dir()).save_pretrained(out)


def llmc_gptq(out: Path, bits: int, group_size: int | None = None) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctp_eval.compress.io import CalibConfig, calibration_ids

    tokenizer = AutoTokenizer.from_pretrained(dense_dir())
    model = AutoModelForCausalLM.from_pretrained(dense_dir(), dtype=torch.float32)
    ids = calibration_ids(tokenizer, CalibConfig(nsamples=CALIB_NSAMPLES, seqlen=CALIB_SEQLEN))
    calib = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": bits, "type": "int", "symmetric": True,
               "strategy": "group" if group_size else "channel", "group_size": group_size}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"])
    oneshot(model=model, dataset=calib, recipe=recipe, max_seq_length=CALIB_SEQLEN,
            num_calibration_samples=CALIB_NSAMPLES)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


MAKERS = {"bnb-nf4": bnb_nf4, "llmc-w4a16": lambda out: llmc_gptq(out, 4), "llmc-w4a16g64": lambda out: llmc_gptq(out, 4, 64),
          "llmc-w3a16g128": lambda out: llmc_gptq(out, 3, 128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tool", choices=sorted(MAKERS))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.tool.startswith("llmc") and os.environ.get("LLMC_PY") and Path(sys.executable) != Path(os.environ["LLMC_PY"]):
        sys.exit(subprocess.call([os.environ["LLMC_PY"], *sys.argv]))
    if (args.out / "config.json").is_file():
        print(f"{args.out} exists: skipped")
        return
    MAKERS[args.tool](args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

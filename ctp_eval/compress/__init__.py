"""Compression for "Compress, Then Prompt": GPTQ, SparseGPT, joint sparse+quant, and RTN/magnitude baselines.

Why our own implementation rather than a library: the compressed model must stay an ordinary dense torch
module (fake-quantized / masked float weights) so that soft-prompt gradients flow through it on CPU and GPU,
and it must cover the paper's grid (2/3/4-bit, 50-75% sparsity, 50% + 4-bit jointly). llm-compressor 0.14
runs on CPU but refuses group size 128 on SmolLM2's 576-wide layers, and its SparseGPT-then-GPTQ pipeline
re-fills pruned weights, so it has no true joint mode. AutoGPTQ is archived, and GPTQModel targets packed
kernels. The reference algorithms are ~200 lines of plain PyTorch (`solvers.py`), tested against a
brute-force least-squares reference.

Layout: `spec` (the one spec syntax), `quant` (grids), `solvers` (pure W, H -> W'), `apply` (layer-by-layer
traversal of any HF decoder), `io` (checkpoints and the on-disk cache), `export` (deployable compressed-tensors export).
Submodules load lazily so that `parse_spec` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CompressSpec": "spec",
    "QuantSpec": "spec",
    "SparseSpec": "spec",
    "SpecError": "spec",
    "parse_spec": "spec",
    "canonical_spec": "spec",
    "gptq_solve": "solvers",
    "sparsegpt_solve": "solvers",
    "magnitude_prune": "solvers",
    "rtn_solve": "solvers",
    "CompressOptions": "apply",
    "compress_model": "apply",
    "CalibConfig": "io",
    "ensure_compressed": "io",
    "save_compressed": "io",
    "read_compression_info": "io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

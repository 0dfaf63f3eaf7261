"""Tiny random decoder-only LMs of every architecture family we test, built in-process (no downloads).

Each one keeps what makes its family different from Llama and is small enough to run in milliseconds:
sliding windows (8 tokens) shorter than the test sequences, mixed sliding/full layers, Gemma's scaled
embeddings, two rotary bases and logit soft-capping, Phi-3's fused projections, OPT's learned positions,
GPT-NeoX's partial rotary and parallel residual.
"""

from __future__ import annotations

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "opt", "gpt_neox")
WINDOW = 8  # sliding window, shorter than every calibration / scoring sequence in the tests

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               bos_token_id=0, eos_token_id=0, pad_token_id=1)


def _config(arch: str, vocab_size: int, max_pos: int, window: int = WINDOW):
    import transformers as tf

    common = dict(_COMMON, vocab_size=vocab_size, max_position_embeddings=max_pos)
    if arch == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "mistral":  # every layer slides
        return tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=window)
    if arch == "qwen2":  # layer 0 full, layers 1-2 sliding
        return tf.Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=True, sliding_window=window,
                              max_window_layers=1)
    if arch == "qwen3":  # q/k norms; layer 0 full, layers 1-2 sliding
        return tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                              sliding_window=window, max_window_layers=1)
    if arch == "gemma2":  # scaled embeddings, sliding/full/sliding, attention and final logit soft-capping
        # caps scaled to a tiny random model's logits (|x| < 1), so that capping visibly changes them
        return tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=window,
                               query_pre_attn_scalar=16, attn_logit_softcapping=1.0, final_logit_softcapping=0.5)
    if arch == "gemma3":  # scaled embeddings, sliding/full/sliding layers with two rotary bases (1e4 / 1e6)
        return tf.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=window,
                                   query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**common, num_key_value_heads=2, original_max_position_embeddings=max_pos)
    if arch == "opt":  # learned absolute positions, LayerNorm, biases
        c = {k: v for k, v in common.items() if k != "intermediate_size"}
        return tf.OPTConfig(**c, ffn_dim=128, word_embed_proj_dim=64)
    if arch == "gpt_neox":  # partial rotary, parallel residual, fused qkv
        return tf.GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True)
    raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")


def build_arch(arch: str, vocab_size: int = 300, seed: int = 0, max_pos: int = 128, window: int = WINDOW):
    """A tiny random causal LM of `arch` in eval mode, fp32, eager-free defaults (sdpa where supported);
    `window`: the sliding window of the sliding-window families (same weights whatever the window)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, vocab_size, max_pos, window))
    return model.eval()

"""Evaluation: the `ctp` lm-eval model (`lm`), prompt-aware attention (`prefix_attention`) and the perplexity
protocol (`ppl`). Nothing is imported here: `ctp_eval.eval.lm` loads torch and lm-eval."""

"""ctp-eval: Compress, Then Prompt (Xu, Liu et al., ICML 2024) as measurable software.

Importing this package is cheap on purpose: it loads neither torch nor lm_eval.
"""

__version__ = "0.1.0"

PAPER_HARD_PROMPT = (
    "Please carefully examine the weight matrix within the model, as it may contain errors. "
    "It is crucial to verify its accuracy and make any necessary adjustments to ensure optimal performance."
)

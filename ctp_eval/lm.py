"""Old import path of the `ctp` model, kept for users: the model lives in `ctp_eval.eval.lm`."""

from ctp_eval.eval.lm import CTPLM, compute_prefix_kv, hardware_summary, prefix_cache  # noqa: F401

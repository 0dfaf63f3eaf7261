"""One compression per host under data parallelism (`accelerate launch`, `torchrun`).

Every process of a data-parallel run needs the same compressed model. Local rank 0 of each host compresses it
(on its own GPU) and writes the cache entry; the other local ranks poll the cache until it appears. Polling
rather than a collective: a 7B solve takes longer than any process-group timeout, and lm-eval's HFLM builds
its process group only after the model is loaded.
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(requested):
    """Where this process compresses: `requested` (checked as HFLM does), but each rank's own GPU when several
    processes run (lm-eval's default `cuda:0` would put every rank's solve on GPU 0)."""
    import torch

    from ctp_eval.models import resolve_device

    device = resolve_device(requested, fallback=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def compress_once_per_host(path, spec: str, poll_seconds: float = 10.0, **kwargs) -> str:
    """`ensure_compressed(path, spec, **kwargs)` on local rank 0; elsewhere, wait for its cache entry."""
    from ctp_eval.compress.io import ensure_compressed

    if local_rank() == 0:
        return str(ensure_compressed(path, spec, **kwargs))
    logger.info("rank %s waits for local rank 0 to compress %s", os.environ.get("RANK", "?"), spec)
    while (found := ensure_compressed(path, spec, lookup_only=True, **kwargs)) is None:
        time.sleep(poll_seconds)
    return str(found)

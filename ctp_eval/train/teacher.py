"""The distillation teacher of `ctp-train --loss kd|ce+kd`: the uncompressed model's next-token distribution.

On the fly (default), the teacher runs on every training batch without grad and its log-probs are formed chunk
by chunk inside the loss (`ctp_eval.train.losses`), so its (B, T, V) fp32 logits never exist either. That costs one
extra forward per step (about a third of a training step).

With a cache folder (`--teacher-cache DIR --teacher-topk K`), each training window's top-K teacher log-probs are
computed once, written as `w<window>.safetensors` (fp16 log-probs + int32 ids, (T-1, K) each), and reused by
every later step, run and spec that trains on the same windows: the windows depend only on the tokenized corpus
and the window length, not on the batch order, the seed or the compression. `cache.json` names the teacher,
tokenizer, corpus (with a hash of its token stream), window length and K; a folder made for anything else is
refused. Full-vocabulary caching is not offered: at V = 49k that is 25 MB per 256-token window.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ctp_eval import files
from ctp_eval.train.losses import TeacherTargets, decoder_hidden, split_head
from ctp_eval.train.schedule import stream_hash

logger = logging.getLogger(__name__)

CACHE_META = "cache.json"


class Teacher:
    def __init__(self, model, chunk: int = 1024, topk: int = 0, cache_dir: str | os.PathLike | None = None,
                 identity: dict | None = None):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.split = split_head(model) if chunk > 0 else None
        self.chunk, self.topk = chunk, topk
        self.cache = Path(cache_dir) if cache_dir else None
        self.identity = identity or {}
        self.hits = self.misses = 0
        if self.cache is not None and topk < 1:
            raise ValueError("a teacher cache stores top-k log-probs: set --teacher-topk >= 1")

    def check_cache(self, wins: torch.Tensor, rank: int = 0) -> None:
        """Create the cache's cache.json, or refuse a folder made for another teacher/corpus/window length."""
        if self.cache is None:
            return
        meta = dict(self.identity, topk=self.topk, seqlen=int(wins.shape[1]), windows=int(wins.shape[0]),
                    stream_sha256=stream_hash(wins))
        path = self.cache / CACHE_META
        if path.is_file():
            have = json.loads(path.read_text())
            if have != meta:
                diff = ", ".join(f"{k}={meta.get(k)!r} (cache: {have.get(k)!r})" for k in sorted(set(meta) | set(have))
                                 if meta.get(k) != have.get(k))
                raise ValueError(f"teacher cache {self.cache} was made for other settings: {diff}; use another folder")
        elif rank == 0:
            files.write_text(path, json.dumps(meta, indent=1, sort_keys=True))

    @torch.no_grad()
    def _topk(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, T-1, K) fp16 log-probs and int32 ids of the teacher's top-K next tokens for ids (n, T)."""
        full = self._full(ids)
        vals, idx = [], []
        for s in range(0, ids.shape[0] * (ids.shape[1] - 1), max(self.chunk, 1)):
            logp = full.chunk_logprobs(s, s + max(self.chunk, 1))
            v, i = logp.topk(self.topk, dim=-1)
            vals.append(v.half().cpu())
            idx.append(i.int().cpu())
        shape = (ids.shape[0], ids.shape[1] - 1, self.topk)
        return torch.cat(vals).view(shape), torch.cat(idx).view(shape)

    @torch.no_grad()
    def _full(self, ids: torch.Tensor) -> TeacherTargets:
        if self.split is not None:
            h = decoder_hidden(self.split, ids, None)[:, :-1]
            return TeacherTargets(hidden=h.reshape(-1, h.shape[-1]), head=self.split[2])
        logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1]
        return TeacherTargets(logits=logits.reshape(-1, logits.shape[-1]))

    def targets(self, ids: torch.Tensor, rows: torch.Tensor | None = None) -> TeacherTargets:
        """Teacher targets for the batch ids (B, T) whose training-window indices are `rows` (B,)."""
        if self.cache is None:
            return self._full(ids)
        if rows is None:
            raise ValueError("the teacher cache needs the windows' indices")
        from safetensors.torch import load_file, save_file

        vals, idx = [], []
        for r, row_ids in zip(rows.tolist(), ids):
            f = self.cache / f"w{r:07d}.safetensors"
            if f.is_file():
                d = load_file(str(f))
                self.hits += 1
            else:
                v, i = self._topk(row_ids.unsqueeze(0))
                d = {"logprobs": v[0].contiguous(), "ids": i[0].contiguous()}
                with files.atomic_path(f) as tmp:
                    save_file(d, str(tmp))
                self.misses += 1
            vals.append(d["logprobs"])
            idx.append(d["ids"])
        device = ids.device
        return TeacherTargets(topk_logprobs=torch.stack(vals).flatten(0, 1).to(device),
                              topk_ids=torch.stack(idx).flatten(0, 1).to(device))

"""lm-eval glue for the perplexity tasks ctp_wikitext2, ctp_ptb and ctp_c4 (protocol: ctp_eval/ppl.py).

How a number gets from the corpus into the results JSON:

* Docs. `CTPPerplexityTask.download` reads the corpus split through `ctp_eval.data` (local dir first, then
  the hub) and cuts its rows into `ppl_shards` contiguous shards (default 10), one doc each. A doc holds the
  shard's text (doc["text"]) and a spec, doc["ctp_ppl"] = {corpus, split, data_dir, source, seqlen, shard,
  n_shards}. Sharding exists so that `--limit n` scores the first n/n_shards of the data; all shards together
  are exactly the whole protocol.
* Requests. Every doc emits two `loglikelihood_rolling` requests:
  0. the *protocol* request: its doc carries "ctp_ppl", so `CTPLM.loglikelihood_rolling` routes it to
     `ctp_eval.ppl.score_protocol_requests`, which tokenizes the *whole* corpus once (so windows never depend
     on sharding), takes this shard's share of the seqlen windows and returns (loglikelihood, scored tokens).
     Its argument is a short descriptor, not the text: it keys lm-eval's request cache (--use_cache) apart
     from request 1, and with `--model hf` it costs nothing before `process_results` fails clearly;
  1. an ordinary rolling request over doc["text"] (doc without the marker), scored by HFLM's own rolling
     windows, for lm-eval's standard word_perplexity / byte_perplexity / bits_per_byte on the same data.
  Request 1 doubles the cost of a run; `ppl_standard: false` (task metadata) drops it, and with it the three
  standard metrics, for budget runs that only need token_perplexity.
* Metrics. token_perplexity = exp(sum NLL / sum scored tokens) over docs (weighted_perplexity), plus
  scored_tokens (summed) so a run shows how much it scored; the standard three as in lm-eval's wikitext task.
* Source. The data's name ("wikitext2-test", "c4-train1000[900:]", "c4-val1100", ...) goes into the task
  alias (results JSON `results.<task>.alias`, and the printed table) and `configs.<task>.metadata.source`.

Knobs (task metadata, e.g. `--metadata '{"ppl_seqlen": 2048}'`, or environment): ppl_seqlen / $CTP_PPL_SEQLEN
(default 1024), ppl_shards (default 10), ppl_standard (default true), data_dir / $CTP_DATA_DIR.
"""

from __future__ import annotations

import hashlib
import logging
import os

from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask, Task

logger = logging.getLogger(__name__)

SEQLEN_ENV = "CTP_PPL_SEQLEN"
DEFAULT_SHARDS = 10

NEEDS_CTP = (
    "The ctp_* perplexity tasks use the paper's token-level protocol, which only `--model ctp` implements "
    "(got a plain float from the model's loglikelihood_rolling). Run them with `lm_eval --model ctp ...` "
    "(an empty prompt gives the dense model's numbers), or use lm-eval's own `wikitext` task with --model hf."
)


def build_docs(corpus: str, split: str, data_dir=None, seqlen: int = 1024, n_shards: int = DEFAULT_SHARDS):
    """Docs for one perplexity task (see module docstring); pure Python so tests can call it without lm-eval."""
    from ctp_eval import data
    from ctp_eval.eval.ppl import shard_bounds

    rows = data.load_texts(corpus, split, data_dir)
    root = data.resolve_data_dir(data_dir)
    source = data.corpus_source(corpus, split, data_dir)
    joiner = data.JOINERS.get(corpus, "\n\n")
    n_shards = max(1, min(int(n_shards), len(rows)))
    docs = []
    for shard in range(n_shards):
        lo, hi = shard_bounds(len(rows), n_shards, shard)
        spec = {
            "corpus": corpus, "split": split, "data_dir": str(root) if root else "", "source": source,
            "seqlen": int(seqlen), "shard": shard, "n_shards": n_shards,
        }
        docs.append({"text": joiner.join(rows[lo:hi]), "source": source, "ctp_ppl": spec})
    return docs


class CTPPerplexityTask(ConfigurableTask):
    """A ConfigurableTask whose docs come from ctp_eval.data and that emits the two requests described above."""

    def __init__(self, config: dict | None = None) -> None:
        # lm-eval passes the YAML's `class` key along; TaskConfig has no such field.
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"})

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        import datasets

        meta = self.config.metadata or {}
        seqlen = int(meta.get("ppl_seqlen") or os.environ.get(SEQLEN_ENV) or 1024)
        docs = build_docs(
            meta["corpus"], meta["split"], meta.get("data_dir"), seqlen, meta.get("ppl_shards", DEFAULT_SHARDS)
        )
        source = docs[0]["source"]
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
        # Make the data's identity part of every result (see module docstring).
        self.config.metadata = {**meta, "source": source, "ppl_seqlen": seqlen}
        self.config.task_alias = f"{self.config.task} [{source}, seqlen {seqlen}]"
        logger.info("%s: %s, seqlen %d, %d shards", self.config.task, source, seqlen, len(docs))

    def construct_requests(self, doc: dict, ctx, **kwargs) -> list[Instance]:
        kwargs.pop("apply_chat_template", None)
        kwargs.pop("chat_template", None)
        spec = doc["ctp_ppl"]
        digest = hashlib.sha1(doc["text"].encode("utf-8")).hexdigest()[:12]
        descriptor = (
            f"[ctp_ppl protocol request {spec['source']} seqlen={spec['seqlen']} "
            f"shard={spec['shard']}/{spec['n_shards']} sha1={digest}]"
        )
        reqs = [Instance(request_type="loglikelihood_rolling", doc=doc, arguments=(descriptor,), idx=0, **kwargs)]
        if standard_requested(self.config.metadata):
            plain = {k: v for k, v in doc.items() if k != "ctp_ppl"}
            reqs.append(Instance(request_type="loglikelihood_rolling", doc=plain, arguments=(doc["text"],), idx=1, **kwargs))
        return reqs


def standard_requested(meta: dict | None) -> bool:
    """Task metadata `ppl_standard` (default true): also emit request 1 for the standard metrics."""
    value = (meta or {}).get("ppl_standard", True)
    if isinstance(value, str):
        value = value.strip().lower() not in ("0", "false", "no", "off")
    return bool(value)


def process_results(doc: dict, results: list) -> dict:
    protocol = results[0]
    if not (isinstance(protocol, (tuple, list)) and len(protocol) == 2):
        raise RuntimeError(NEEDS_CTP)
    loglik, n_tokens = protocol
    metrics = {"token_perplexity": (float(loglik), int(n_tokens)), "scored_tokens": int(n_tokens)}
    if len(results) < 2:  # ppl_standard: false
        return metrics
    standard, text = results[1], doc["text"]
    words, n_bytes = Task.count_words(text), Task.count_bytes(text)  # lm-eval's own counts, as its wikitext task
    return {
        **metrics,
        "word_perplexity": (standard, words),
        "byte_perplexity": (standard, n_bytes),
        "bits_per_byte": (standard, n_bytes),
    }


def total(items: list) -> int:
    """Aggregation for scored_tokens: a count, not a mean."""
    return int(sum(items))

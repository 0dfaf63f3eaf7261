"""`accelerate launch -m lm_eval --model ctp` with two real processes on the CPU.

Each child process gets the environment a launcher gives it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and
builds `CTPLM(compression=...)`: local rank 0 must compress, rank 1 must wait for that cache entry and load it.
HFLM's own Accelerator then sets up the gloo process group from that environment. HFLM enters data-parallel mode
only with several GPUs, so the children set its rank and world size from that Accelerator themselves; everything
else (`all_gather` -> `accelerator.gather`, `barrier`) is the real code. Rank 1 holds only paper-protocol
perplexity requests while rank 0 also holds standard rolling ones, whose pass all-gathers window counts: if rank 1
skipped that pass, rank 0 would wait forever, so the parent gives the children a deadline.

This file is also the children's entry point: `python test_data_parallel_lm.py WORKDIR`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = "gptq:w4"
CALIB = dict(calib_nsamples=4, calib_seqlen=16)
SEQLEN = 32  # protocol windows (the tiny model's window is 128)
N_SHARDS = 4
DEADLINE_S = 180  # both children, start to finish; a normal run takes a fraction of this


def _lm_kwargs(model_dir: str, data_dir: str) -> dict:
    return dict(pretrained=model_dir, compression=SPEC, data_dir=data_dir, device="cpu", dtype="float32",
                batch_size=2, **CALIB)


def _docs(data_dir: str) -> list[dict]:
    """The perplexity task's own docs (tasks/ppl_tasks.py) for the tiny PTB test split."""
    sys.path.insert(0, str(REPO / "tasks"))
    try:
        import ppl_tasks
    finally:
        sys.path.pop(0)
    return ppl_tasks.build_docs("ptb", "test", data_dir, seqlen=SEQLEN, n_shards=N_SHARDS)


def _requests(docs: list[dict], plan: list[list]) -> list:
    """Instances as the ctp_ptb task emits them: per doc, the protocol request and the standard rolling one.

    plan: [[doc index, which]], which 0 = protocol, 1 = standard."""
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "tasks"))
    try:
        import ppl_tasks
    finally:
        sys.path.pop(0)
    task = SimpleNamespace(config=SimpleNamespace(metadata={}))  # default metadata: both requests
    per_doc = [ppl_tasks.CTPPerplexityTask.construct_requests(task, doc, "") for doc in docs]
    return [per_doc[i][which] for i, which in plan]


# ---------------------------------------------------------------- child process


def _child(work: Path) -> None:
    import torch

    torch.set_num_threads(1)  # two processes on a small machine
    rank = int(os.environ["RANK"])
    cfg = json.loads((work / "config.json").read_text())
    record: dict = {"compress_calls": 0, "lookups": []}
    missed = work / "rank1-missed"  # rank 1 looked the entry up before it existed

    import functools

    from ctp_eval.compress import host
    from ctp_eval.compress import io as cio

    real_ensure, real_compress = cio.ensure_compressed, cio.compress_model

    def ensure(*args, **kwargs):
        found = real_ensure(*args, **kwargs)
        if kwargs.get("lookup_only"):
            record["lookups"].append(found)
            if found is None:
                missed.touch()
        return found

    def compress(*args, **kwargs):
        record["compress_calls"] += 1
        # Compress only once rank 1 has missed the cache: it must really wait, whichever process starts first.
        # (Bounded: if rank 1 never looks the entry up, the parent's assertions say so.)
        for _ in range(600):
            if missed.exists() or rank != 0:
                break
            time.sleep(0.1)
        return real_compress(*args, **kwargs)

    cio.ensure_compressed, cio.compress_model = ensure, compress
    # the real waiting loop, polling faster than its 10 s default
    host.compress_once_per_host = functools.partial(host.compress_once_per_host, poll_seconds=0.1)

    from ctp_eval.eval.lm import CTPLM

    lm = CTPLM(**_lm_kwargs(cfg["model_dir"], cfg["data_dir"]))
    record["build"] = lm.compression_build
    acc = getattr(lm, "accelerator", None)
    if acc is None or acc.num_processes != 2 or acc.process_index != rank:
        raise RuntimeError(f"HFLM's Accelerator did not join the two-process group: {acc and acc.state}")
    lm._rank, lm._world_size = acc.local_process_index, acc.num_processes  # what HFLM does with several GPUs

    requests = _requests(_docs(cfg["data_dir"]), cfg["plans"][rank])
    record["results"] = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    lm.barrier()  # as lm-eval's evaluator does after each request type
    (work / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))


# ---------------------------------------------------------------- the test (parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_data_dir(root: Path) -> Path:
    """C4 train for calibration and PTB test for the perplexity requests, laid out like shared/data."""
    from conftest import _CORPUS

    (root / "c4").mkdir(parents=True)
    docs = [" ".join(_CORPUS[i : i + 8]) for i in range(20)]
    (root / "c4" / "c4_en_train_shard00000_first1000.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "ptb").mkdir()
    lines = [f"sentence {i} {_CORPUS[i % len(_CORPUS)].lower()}" for i in range(48)]
    (root / "ptb" / "ptb.test.txt").write_text("".join(f" {line} \n" for line in lines))
    return root


def _run_children(work: Path, env: dict) -> None:
    """Both ranks, each with its own RANK/LOCAL_RANK; killed (and the test failed) past DEADLINE_S."""
    procs = []
    for rank in range(2):
        with open(work / f"rank{rank}.err", "w") as err:  # the child keeps its own descriptor
            procs.append(subprocess.Popen([sys.executable, __file__, str(work)], cwd=str(REPO), env={
                **env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.DEVNULL, stderr=err))

    def tails() -> str:
        return "".join(f"\n--- rank {r} stderr ---\n{(work / f'rank{r}.err').read_text()[-1500:]}" for r in range(2))

    end = time.monotonic() + DEADLINE_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        raise AssertionError(f"the two ranks did not finish within {DEADLINE_S} s: a collective that one rank "
                             f"never joined?{tails()}") from None
    assert [p.returncode for p in procs] == [0, 0], tails()


def test_two_ranks_compress_once_and_score_a_protocol_only_rank(tiny_llama_dir, tmp_path, monkeypatch):
    data_dir = str(_tiny_data_dir(tmp_path / "data"))
    cache = tmp_path / "cache"
    work = tmp_path / "work"
    work.mkdir()
    # rank 0: protocol and standard requests of docs 0-1; rank 1: only the protocol requests of docs 2-3
    plans = [[[0, 0], [0, 1], [1, 0], [1, 1]], [[2, 0], [3, 0]]]
    (work / "config.json").write_text(json.dumps(
        {"model_dir": str(tiny_llama_dir), "data_dir": data_dir, "plans": plans}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    # what `accelerate launch --cpu --num_processes 2` gives each process (ACCELERATE_USE_CPU: gloo on the CPU)
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", CTP_CACHE_DIR=str(cache),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    _run_children(work, env)
    r0, r1 = (json.loads((work / f"rank{r}.json").read_text()) for r in range(2))

    # compressed once, by local rank 0; rank 1 missed the cache at least once, then found rank 0's entry
    (entry,) = (cache / "compressed").iterdir()
    assert (r0["compress_calls"], r1["compress_calls"]) == (1, 0)
    assert r1["lookups"] and r1["lookups"][0] is None and Path(r1["lookups"][-1]) == entry
    assert r0["build"] and r0["build"] == r1["build"]

    # every request's result equals one process scoring all of them (loaded from the same cache entry)
    from ctp_eval.eval.lm import CTPLM

    monkeypatch.setenv("CTP_CACHE_DIR", str(cache))
    single = CTPLM(**_lm_kwargs(str(tiny_llama_dir), data_dir))
    assert single.world_size == 1 and single.compression_build == r0["build"]
    docs = _docs(data_dir)
    expected = single.loglikelihood_rolling(_requests(docs, plans[0] + plans[1]), disable_tqdm=True)
    got = r0["results"] + r1["results"]
    assert len(got) == len(expected) == 6
    for (doc, which), g, e in zip(plans[0] + plans[1], got, expected):
        if which == 0:  # protocol: (loglikelihood, scored tokens)
            assert g[1] == e[1] > 0, (doc, g, e)
            assert g[0] == pytest.approx(e[0], rel=1e-5), (doc, g, e)
        else:  # standard: the summed loglikelihood of the text's rolling windows
            assert isinstance(g, float) and g == pytest.approx(e, rel=1e-5), (doc, g, e)

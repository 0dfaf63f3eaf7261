"""The CUDA paths users run, on tiny random models of every architecture family (tests/archs.py).

Skipped where there is no GPU (CI, this project's CPU machines); run where one is: `pytest -m gpu`. The CPU
fp32 results are the reference, computed in the same test:
  - `ctp` on cuda (fp32) scores loglikelihood / loglikelihood_rolling like `ctp` on the CPU, for every family,
    with prompt-aware attention running on the GPU (same layers split / plain as on the CPU); bf16 on cuda stays
    within bf16 rounding of the fp32 scores;
  - the block offload: a bf16 model on the host, each block solved on the GPU and sent back; every weight ends on
    the host in bf16, nothing stays on the GPU, and the result matches the CPU solve up to rounding chaos;
  - `compression=` through `ctp` on cuda (compress on the GPU, cache, reload) and ctp-train on cuda in fp32 and
    bf16 (autocast); the compressed-tensors export, loaded on the GPU, scores like its fake-quant source.
"""

from __future__ import annotations

import copy

import pytest
import torch
from archs import ARCHS, build_arch
from conftest import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

K = 12
CONTEXTS = ["The quick brown fox", "Paris is the capital", "one two three four five six", "A"]
CONTINUATIONS = [" jumps over the lazy dog.", " of France.", " seven eight", " soft prompt"]
LONG_TEXT = " ".join(CONTEXTS + CONTINUATIONS) * 3  # ~270 tokens: several rolling windows of the 128-token model
# layers on prompt-aware attention's plain path, as tests/test_arch_matrix.py states them for the CPU
PLAIN_LAYERS = {"mistral": {0, 1, 2}, "qwen2": {1, 2}, "qwen3": {1, 2}, "gemma2": {0, 1, 2}, "gemma3": {0, 2}}


@pytest.fixture(scope="module", params=ARCHS)
def arch_dir(request, tiny_tokenizer, tmp_path_factory):
    from ctp_eval.prompt import SoftPrompt

    path = tmp_path_factory.mktemp(f"cuda-{request.param}")
    model = build_arch(request.param, vocab_size=len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    with torch.no_grad():
        scale = model.get_input_embeddings()(torch.arange(len(tiny_tokenizer))).std().item()
    emb = torch.randn(K, 64, generator=torch.Generator().manual_seed(1)) * scale
    SoftPrompt.for_model(emb, model, tiny_tokenizer).save(path / "p.safetensors")
    return request.param, path


def _scores(lm) -> tuple[list[float], float]:
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(zip(CONTEXTS, CONTINUATIONS))]
    ll = [v for v, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (LONG_TEXT,), 0)], disable_tqdm=True)
    return ll, rolling[0]


def test_ctp_on_cuda_scores_like_the_cpu(arch_dir):
    from ctp_eval.eval.lm import CTPLM

    arch, path = arch_dir
    kw = dict(pretrained=str(path), prompt=str(path / "p.safetensors"), batch_size=2)
    cpu = _scores(CTPLM(device="cpu", dtype="float32", **kw))
    gpu32 = CTPLM(device="cuda", dtype="float32", **kw)
    assert gpu32.model.device.type == "cuda" and gpu32.prompt_embeds.device.type == "cuda"
    got = _scores(gpu32)
    assert got[0] == pytest.approx(cpu[0], abs=1e-3)
    assert got[1] == pytest.approx(cpu[1], abs=1e-2)  # a sum over ~270 tokens
    assert gpu32.prefix.read == {0, 1, 2}  # prompt-aware attention ran on the GPU, on every layer
    assert set(gpu32.prefix.plain_layers) == PLAIN_LAYERS.get(arch, set())
    bf16 = _scores(CTPLM(device="cuda", dtype="bfloat16", **kw))
    assert bf16[0] == pytest.approx(cpu[0], rel=0.05, abs=0.1)  # bf16 keeps ~3 significant digits
    assert bf16[1] == pytest.approx(cpu[1], rel=0.02)


def _calib_ids():
    return torch.randint(2, 300, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", ["gptq:w4", "sparsegpt:0.5", "sparsegpt:0.5+gptq:w4"])
def test_block_offload_solves_on_the_gpu_and_returns_to_the_host(spec):
    from ctp_eval.compress.apply import block_linears, compress_model, find_blocks

    host = build_model("llama", vocab_size=300).to(torch.bfloat16)
    on_cpu = copy.deepcopy(host)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    stats = compress_model(host, spec, _calib_ids(), device="cuda", progress=False)
    assert {p.device.type for p in host.parameters()} == {"cpu"}
    assert {p.dtype for p in host.parameters()} == {torch.bfloat16}
    assert torch.cuda.max_memory_allocated() > before  # the solves did run on the GPU ...
    assert torch.cuda.memory_allocated() == before  # ... and nothing was left there
    ref = compress_model(on_cpu, spec, _calib_ids(), device="cpu", progress=False)
    for a, b in zip(find_blocks(host)[1], find_blocks(on_cpu)[1]):
        for (name, la), lb in zip(block_linears(a).items(), block_linears(b).values()):
            wa, wb = la.weight.float(), lb.weight.float()
            if "gptq" in spec:  # GPTQ's rounding chaos flips a few grid points, not many
                same = (wa == wb).float().mean().item()
                assert same > 0.9, (name, same)
            else:  # pruned weights keep continuous (updated) values: compare the mask and the values' distance
                mask = ((wa == 0) == (wb == 0)).float().mean().item()
                assert mask > 0.95, (name, mask)
                assert ((wa - wb).norm() / wb.norm()).item() < 0.1, name
    for name, st in stats["layers"].items():
        assert st["rel_err"] == pytest.approx(ref["layers"][name]["rel_err"], rel=0.1, abs=1e-3), name
    if "sparsegpt" in spec:
        assert stats["zeros"] == pytest.approx(ref["zeros"], abs=0.01)


def test_compression_spec_compresses_on_the_gpu_and_reloads(tiny_llama_dir, calib, tmp_path, monkeypatch):
    from ctp_eval.eval.lm import CTPLM

    monkeypatch.setenv("CTP_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(pretrained=str(tiny_llama_dir), compression="gptq:w2", calib_data=calib.dataset,
              calib_nsamples=calib.nsamples, calib_seqlen=calib.seqlen, device="cuda", dtype="bfloat16")
    lm = CTPLM(**kw)
    w = lm.model.model.layers[0].mlp.down_proj.weight
    assert (w.device.type, w.dtype) == ("cuda", torch.bfloat16)
    assert max(len(torch.unique(row)) for row in w) <= 4  # 2 bits per output row
    again = CTPLM(**kw)  # from the cache, not compressed again
    assert torch.equal(again.model.model.layers[0].mlp.down_proj.weight, w)
    assert len(list((tmp_path / "cache" / "compressed").iterdir())) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ctp_train_on_cuda(tiny_llama_dir, tmp_path, dtype):
    from ctp_eval import train as T
    from ctp_eval.prompt import SoftPrompt

    words = "the quick brown fox jumps over lazy dog soft prompt model capital of France Paris".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(3000))
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "val.txt").write_text(text[:2000])
    cfg = T.TrainConfig(out=str(tmp_path / "out"), model=str(tiny_llama_dir), data=str(tmp_path / "train.txt"),
                        val_data=str(tmp_path / "val.txt"), k=4, seqlen=32, val_seqlen=32, batch_size=2, steps=12,
                        eval_every=4, val_windows=4, lr=0.1, device="cuda", dtype=dtype, progress=False)
    res = T.train(cfg)
    assert res.steps_done == 12 and res.best_val_ppl < res.val_ppl_before  # validation improved over the init
    prompt = SoftPrompt.load(tmp_path / "out" / "prompt.safetensors")
    assert prompt.embeds.shape == (4, 64) and torch.isfinite(prompt.embeds).all()


def test_export_loads_and_scores_on_the_gpu(tiny_llama_dir, calib, tmp_path):
    from lm_eval.api.instance import Instance

    from ctp_eval.compress.export import export_compressed
    from ctp_eval.compress.io import ensure_compressed
    from ctp_eval.eval.lm import CTPLM

    src = ensure_compressed(str(tiny_llama_dir), "gptq:w4g16", calib=calib, cache_dir=tmp_path, progress=False)
    export_compressed(src, tmp_path / "export")
    req = [Instance("loglikelihood_rolling", {}, (LONG_TEXT,), 0)]
    got = [CTPLM(pretrained=str(p), device="cuda", dtype="float32", batch_size=2).loglikelihood_rolling(req)[0]
           for p in (src, tmp_path / "export")]
    assert got[0] == pytest.approx(got[1], abs=1e-2) and got[0] < 0

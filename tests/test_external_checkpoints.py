"""Checkpoints other tools quantized: their label, `ctp` on them, and `ctp-train` on them (tiny in-process Llamas).

The compressed-tensors W4A16 folder is what llm-compressor writes: our own export of a `gptq:w4g16-sym` build, with
our `ctp_compression.json` and our load hints (`dequantize`, `run_compressed`) taken out, so nothing of ours tells
what it is. bitsandbytes (NF4) and torchao (int8 weight-only) quantize the tiny model while loading it on the CPU,
then save it; their tests are skipped, saying why, where the library cannot be imported.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from ctp_eval import external, models
from ctp_eval.external import ExternalCheckpointError, describe_quantization, is_external_label

pytestmark = pytest.mark.usefixtures("one_thread")

# ----- labels (pure) -----------------------------------------------------------------------------------------------
W4A16 = {  # shaped like llm-compressor's W4A16 preset with group 64, as written to config.json
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "version": "0.12.2", "ignore": ["lm_head"], "sparsity_config": {}, "transform_config": {}, "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64,
                    "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}}},
}


def _ct(weights: dict, acts: dict | None = None, **top) -> dict:
    group = {"targets": ["Linear"], "weights": {"type": "int", "symmetric": True, **weights}, "input_activations": acts}
    return {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}, **top}


LABELS = [
    (W4A16, "compressed-tensors/w4a16g64-sym"),
    (_ct({"num_bits": 4, "strategy": "group", "group_size": 128, "symmetric": False, "actorder": "static"}),
     "compressed-tensors/w4a16g128-asym-act"),
    (_ct({"num_bits": 8, "strategy": "channel"}, {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
     "compressed-tensors/w8a8-sym-dyn"),
    (_ct({"num_bits": 8, "type": "float", "strategy": "channel"},
         {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}), "compressed-tensors/wfp8afp8-dyn"),
    (_ct({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]},
         kv_cache_scheme={"num_bits": 8, "type": "float"}), "compressed-tensors/wfp8a16b128x128+kvfp8"),
    ({"quant_method": "compressed-tensors", "config_groups": {"W8A16": ["Linear"]}}, "compressed-tensors/w8a16"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True, "checkpoint_format": "gptq",
      "meta": {"quantizer": ["gptqmodel:2.2.0"]}}, "gptq/w4g128-sym-act"),
    ({"quant_method": "gptq", "bits": 3, "group_size": -1, "desc_act": False}, "gptq/w3-sym"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, "awq/w4g128-asym"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
      "bnb_4bit_use_double_quant": True}, "bitsandbytes/nf4-dq"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}, "bitsandbytes/int8"),
    ({"quant_method": "torchao",
      "quant_type": {"default": {"_type": "Int4WeightOnlyConfig", "_data": {"group_size": 128}}}},
     "torchao/int4-weight-only-g128"),
    ({"quant_method": "torchao", "quant_type": "int8_weight_only", "quant_type_kwargs": {}},
     "torchao/int8-weight-only"),
    ({"quant_method": "hqq", "quant_config": {"weight_quant_params": {"nbits": 4, "group_size": 64}}}, "hqq/w4g64"),
    ({"quant_method": "quanto", "weights": "int4", "activations": None}, "quanto/w4a16"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, "fp8/b128x128-dynamic"),
    ({"quant_method": "vptq", "config_for_layers": {}}, "vptq/custom"),
]


@pytest.mark.parametrize("config, label", LABELS, ids=[label for _, label in LABELS])
def test_label_of_each_library(config, label):
    from ctp_eval.compress.spec import SpecError, parse_spec

    quant = describe_quantization({"quantization_config": config, "model_type": "llama"})
    assert quant.label == label and quant.details["label"] == label and quant.details["config"] == config
    assert is_external_label(label)
    with pytest.raises(SpecError):  # never mistaken for one of our specs ("gptq:w4g128-sym")
        parse_spec(label)


def test_details_record_the_scheme_and_the_library():
    d = describe_quantization(W4A16).details
    assert (d["bits"], d["group_size"], d["symmetric"], d["format"]) == (4, 64, True, "pack-quantized")
    assert d["library"] == "compressed-tensors" and d["library_version"]  # installed here: a project dependency
    assert d["written_by"] == "compressed-tensors 0.12.2" and d["ignore"] == ["lm_head"]
    assert d["schemes"]["group_0"]["weights"]["observer"] == "minmax"
    assert describe_quantization({"model_type": "llama"}) is None
    assert not is_external_label("gptq:w4g128-sym") and not is_external_label("none")


def test_leaderboard_rows_sort_and_label_external_checkpoints():
    from ctp_eval.study.runs import Run, label, spec_sort_key

    order = sorted(["compressed-tensors/w4a16g64-sym", "gptq:w4", "none", "sparsegpt:0.5"], key=spec_sort_key)
    assert order == ["none", "gptq:w4", "sparsegpt:0.5", "compressed-tensors/w4a16g64-sym"]
    run = Run(model="m", compression="bitsandbytes/nf4", kind="learned", k=4, trained_on="bitsandbytes/nf4",
              train_data="c4", recipe="paper")
    assert label(run) == "bitsandbytes/nf4, learned prompt (k=4, c4)"


# ----- checkpoints ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_w4a16(tiny_llama_dir, calib, tmp_path_factory):
    """compressed-tensors W4A16 g16 symmetric, pack-quantized, as llm-compressor writes it (no file of ours)."""
    from ctp_eval.compress.export import export_compressed
    from ctp_eval.compress.io import INFO_FILE, ensure_compressed

    tmp = tmp_path_factory.mktemp("ct")
    src = ensure_compressed(str(tiny_llama_dir), "gptq:w4g16-sym", calib=calib, cache_dir=tmp / "cache", progress=False)
    out = tmp / "smollm-w4a16"
    export_compressed(src, out)
    (out / INFO_FILE).unlink()
    cfg = json.loads((out / "config.json").read_text())
    for hint in ("dequantize", "run_compressed"):  # our export's load hints; llm-compressor writes neither
        cfg["quantization_config"].pop(hint, None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _quantize_on_load(tiny_llama_dir, out, quantization_config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32,
                                                 quantization_config=quantization_config, device_map="cpu")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_llama_dir)).save_pretrained(out)
    return out


def _require(module: str, what: str):
    try:
        __import__(module)
    except Exception as err:  # ImportError, or a library that fails while importing on this machine
        pytest.skip(f"{module} cannot be imported here ({type(err).__name__}: {err}); {what} not tested")


@pytest.fixture(scope="module")
def bnb_nf4(tiny_llama_dir, tmp_path_factory):
    """bitsandbytes NF4 (fp32 compute), quantized on the CPU by bitsandbytes' CPU backend."""
    _require("bitsandbytes", "bitsandbytes NF4 checkpoints")
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return _quantize_on_load(tiny_llama_dir, tmp_path_factory.mktemp("bnb") / "nf4", qc)


@pytest.fixture(scope="module")
def torchao_int8(tiny_llama_dir, tmp_path_factory):
    """torchao int8 weight-only (its int4 configs need CUDA or FBGEMM kernels, absent on this CPU)."""
    _require("torchao", "torchao checkpoints")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return _quantize_on_load(tiny_llama_dir, tmp_path_factory.mktemp("torchao") / "int8",
                             TorchAoConfig(Int8WeightOnlyConfig()))


# (fixture, label, what stays in memory while a prompt trains)
CHECKPOINTS = [
    ("ct_w4a16", "compressed-tensors/w4a16g16-sym", "dequantized"),
    ("bnb_nf4", "bitsandbytes/nf4", "quantized"),
    ("torchao_int8", "torchao/int8-weight-only", "quantized"),
]
IDS = [c[0] for c in CHECKPOINTS]


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `t` (a tensor subclass such as torchao's Int8Tensor holds several)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _plain(getattr(t, n))]
    return [t.detach().clone()]


def _snapshot(model) -> dict[str, list[torch.Tensor]]:
    return {k: _plain(v) for k, v in model.state_dict().items()}


def _dense_copy(model):
    """The same model with every quantized weight replaced by its dequantized float weight (a reference)."""
    import copy

    dense = copy.deepcopy(model)
    for mod in dense.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear) and w is not None and type(w) not in (torch.Tensor, torch.nn.Parameter):
            if hasattr(w, "quant_state"):  # bitsandbytes Params4bit
                import bitsandbytes.functional as F

                deq = F.dequantize_4bit(w.data, w.quant_state)
            else:
                deq = w.dequantize()
            mod.__class__ = torch.nn.Linear  # plain matmul on the dequantized weight
            mod.weight = torch.nn.Parameter(deq.float(), requires_grad=False)
    return dense


@pytest.mark.parametrize("name, label, in_memory", CHECKPOINTS, ids=IDS)
def test_ctp_loglikelihood_equals_the_models_own_forward(name, label, in_memory, request):
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM

    from ctp_eval.eval.lm import CTPLM

    path = request.getfixturevalue(name)
    lm = CTPLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=2)
    info = lm.get_model_info()
    assert info["ctp_compression"] == label and info["ctp_base_model"] == path.name
    assert info["ctp_checkpoint_quantization"]["label"] == label
    assert info["ctp_checkpoint_quantization"]["in_memory"] == in_memory

    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()  # the checkpoint's own forward
    pairs = [("Paris is the capital", " of France."), ("one two three", " four five six seven")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    text = "The quick brown fox jumps over the lazy dog. A soft prompt recovers the accuracy."
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    with torch.no_grad():
        for (ctx, cont), (ll, _) in zip(pairs, got):
            whole, n_ctx = lm.tok_encode(ctx + cont), len(lm.tok_encode(ctx))
            logp = torch.log_softmax(ref(torch.tensor([whole[:-1]])).logits[0].float(), -1)
            want = sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))
            assert ll == pytest.approx(want, abs=1e-4)
        ids = [lm.prefix_token_id] + lm.tok_encode(text)
        logp = torch.log_softmax(ref(torch.tensor([ids[:-1]])).logits[0].float(), -1)
        assert rolling == pytest.approx(sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids))), abs=1e-4)


@pytest.mark.parametrize("name, label, in_memory", CHECKPOINTS, ids=IDS)
def test_prompt_gradient_flows_through_the_frozen_quantized_model(name, label, in_memory, request):
    path = request.getfixturevalue(name)
    model, tok = models.load_model_and_tokenizer(str(path), input_grad=True)
    quant = models.external_quantization(model)
    assert quant.label == label and quant.details["in_memory"] == in_memory
    assert bool(external.quantized_linears(model)) == (in_memory == "quantized")
    if name == "ct_w4a16":  # loaded packed, as llm-compressor's folders are; unpacked by us at load
        assert quant.details["dequantized_because"] == "compressed-tensors unpacks its weights on the first forward"
    assert external.input_grad_problem(model) is None
    ids = torch.randint(0, len(tok), (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (model, _dense_copy(model)):  # the kernels' input gradient equals the dequantized model's
        x = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        m(inputs_embeds=x).logits.float().pow(2).mean().backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ext-data")
    words = "the quick brown fox jumps over lazy dog soft prompt model capital of France Paris one two".split()
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(8)) + "." for _ in range(12)]
    (root / "train.txt").write_text(" ".join(rng.choice(sentences) for _ in range(120)))
    (root / "val.txt").write_text(" ".join(rng.choice(sentences) for _ in range(30)))
    return root


@pytest.mark.parametrize("name, label, in_memory", CHECKPOINTS, ids=IDS)
def test_ctp_train_on_the_checkpoint_records_its_quantization(name, label, in_memory, request, corpus, tmp_path,
                                                              monkeypatch):
    from ctp_eval import train as T
    from ctp_eval.eval.lm import CTPLM
    from ctp_eval.prompt import SoftPrompt
    from ctp_eval.train import runlog
    from ctp_eval.train import setup as trainsetup

    path = request.getfixturevalue(name)
    loaded = {}
    load = trainsetup.load_model

    def spy(cfg, device):
        model, tok, spec = load(cfg, device)
        loaded.update(model=model, before=_snapshot(model))
        return model, tok, spec

    monkeypatch.setattr(trainsetup, "load_model", spy)
    cfg = T.TrainConfig(out=str(tmp_path / "out"), model=str(path), data=str(corpus / "train.txt"),
                        val_data=str(corpus / "val.txt"), k=4, seqlen=32, batch_size=2, steps=3, eval_every=3,
                        save_every=100, val_windows=4, val_seqlen=32, lr=0.1, progress=False)
    assert trainsetup.target_identity(cfg)["compression"] == label  # --resume compares it
    result = T.train(cfg)

    assert result.steps_done == 3 and result.best_val_ppl < result.val_ppl_before
    assert len([r for r in runlog.read_run_log(tmp_path / "out" / "train_log.jsonl") if "loss" in r]) == 3
    after = _snapshot(loaded["model"])  # the frozen model's weights, quantized or not, are bit-identical
    assert after.keys() == loaded["before"].keys()
    for key, tensors in loaded["before"].items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[key], strict=True)), key

    meta = SoftPrompt.load(tmp_path / "out" / "prompt.safetensors").meta
    assert meta.compression == label and meta.base_model == path.name
    recorded = meta.extra["checkpoint_quantization"]
    assert recorded["label"] == label and recorded["in_memory"] == in_memory and recorded["library_version"]
    assert recorded["config"] == json.loads((path / "config.json").read_text())["quantization_config"]

    lm = CTPLM(pretrained=str(path), prompt=str(tmp_path / "out" / "prompt.safetensors"), device="cpu",
               dtype="float32", batch_size=2)
    info = lm.get_model_info()
    assert info["ctp_compression"] == info["ctp_prompt_trained_on"] == label and info["ctp_prompt_k"] == 4


# ----- refusals ------------------------------------------------------------------------------------------------------
@pytest.fixture
def gptq_folder(tiny_llama_dir, tmp_path):
    """A folder whose config declares GPTQ (GPTQModel's fields); its weights are never read."""
    out = tmp_path / "gptq-w4g128"
    shutil.copytree(tiny_llama_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_missing_library_is_one_line_naming_it(gptq_folder, corpus, tmp_path, monkeypatch):
    from ctp_eval import train as T
    from ctp_eval.eval.lm import CTPLM
    from ctp_eval.train.config import TrainError

    monkeypatch.setitem(external.LOADERS, "gptq", (("gptqmodel", "optimum"), ("ctp_no_such_module", "json")))
    with pytest.raises(ExternalCheckpointError) as err:
        models.load_model_and_tokenizer(str(gptq_folder))
    assert str(err.value) == (f"{gptq_folder} is a gptq/w4g128-sym checkpoint; loading it needs gptqmodel, which is "
                              "not installed here: pip install gptqmodel")
    with pytest.raises(ExternalCheckpointError, match="needs gptqmodel"):
        CTPLM(pretrained=str(gptq_folder), device="cpu")
    cfg = T.TrainConfig(out=str(tmp_path / "out"), model=str(gptq_folder), data=str(corpus / "train.txt"),
                        val_data=str(corpus / "val.txt"), k=4, seqlen=32, batch_size=2, steps=1, progress=False)
    with pytest.raises(TrainError, match="needs gptqmodel") as err:
        T.train(cfg)
    assert "\n" not in str(err.value)


def test_kernel_failure_is_one_line(ct_w4a16, monkeypatch):
    from transformers import AutoModelForCausalLM

    def fail(*args, **kwargs):
        raise RuntimeError("We encountered some issues during automatic conversion of the weights.\nFor details ...")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(ExternalCheckpointError) as err:
        models.load_model_and_tokenizer(str(ct_w4a16))
    assert "\n" not in str(err.value) and "w4a16g16-sym checkpoint and compressed-tensors 0." in str(err.value)
    assert str(err.value).endswith("RuntimeError: We encountered some issues during automatic conversion of the "
                                   "weights.")


def test_kernel_without_input_gradient_is_dequantized_on_load(bnb_nf4, monkeypatch, caplog):
    monkeypatch.setattr(external, "input_grad_problem", lambda model: "NotImplementedError: no backward")
    with caplog.at_level("WARNING", logger="ctp_eval.external"):
        model, _ = models.load_model_and_tokenizer(str(bnb_nf4), input_grad=True)
    details = models.external_quantization(model).details
    assert details["in_memory"] == "dequantized"
    assert "NotImplementedError: no backward" in details["dequantized_because"]
    assert details["label"] == "bitsandbytes/nf4" and not external.quantized_linears(model)
    assert [r.message for r in caplog.records if r.name == "ctp_eval.external"] == [
        ("bitsandbytes/nf4: dequantized on load, because its kernels give the prompt no gradient "
         "(NotImplementedError: no backward)")]
    model, _ = models.load_model_and_tokenizer(str(bnb_nf4))  # evaluation needs no gradient: kept quantized
    assert models.external_quantization(model).details["in_memory"] == "quantized"


def test_distillation_needs_the_base_model_named(ct_w4a16, tmp_path):
    from ctp_eval import train as T
    from ctp_eval.train import setup as trainsetup
    from ctp_eval.train.config import TrainError

    cfg = T.TrainConfig(out=str(tmp_path / "out"), model=str(ct_w4a16), loss="kd", progress=False)
    with pytest.raises(TrainError, match="pass that model with --teacher"):
        trainsetup.teacher_path(cfg)

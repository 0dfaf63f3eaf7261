"""`ctp`: lm-eval's HFLM with a (compressed) model and a soft prompt prepended to every input.

Only what changes is overridden (pattern of lm-eval's `hf_steered.py`):
  * `max_length`  - the model window minus k, so prompt + text always fits; lm-eval's own truncation and
                    rolling windows then work unchanged.
  * `_model_call` - logits aligned to `inps` exactly as without a prompt (text tokens only are scored).
  * `_model_generate` - prefix cache + k mask ones + ids that start with the context, as HFLM expects.
  * `loglikelihood_rolling` - only to route the paper-protocol perplexity tasks (`ctp_*`) to `ctp_eval.eval.ppl`.

The prompt is the same for every request, so its key/value states are computed once and every batch attends to
them instead of re-encoding k extra positions per sequence. Scoring (`prompt_mode=cache`, the default) runs
prompt-aware attention (`ctp_eval.eval.prefix_attention`): each layer splits attention into the text part (causal,
SDPA's fast path) and a small unmasked part over the k prompt keys, merged exactly by log-sum-exp; the prompt's
states are read by every row without copies. Two plain paths are kept as references (tests check all three
agree): `prompt_mode=cache-plain` hands the prompt's transformers cache to the model (each layer concatenates the
prompt's keys with the text's under an explicit (T, k+T) mask), `prompt_mode=prepend` concatenates embeddings.
Generation always uses the transformers cache (`prefix_kv`): decoding steps have one query, nothing to split.

Left padding in generation: the cache sits physically before the pads, but the pads are masked and
transformers derives positions from the mask's cumsum, so each row sees [prompt][text] at positions
0..k-1, k.. - the same as unpadded one-at-a-time generation (the bug of peft issue #1093 does not arise).
Sliding-window layers (Mistral, Gemma 2/3, Qwen2/3 with sliding layers) are the exception: their window
counts slots, pads included, so a padded batch of such a model is generated through the prepend path,
which puts each row's pads before the prompt, as HF pads plain text.
"""

from __future__ import annotations

import logging
import os

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import stop_sequences_criteria

from ctp_eval import __version__, external, models
from ctp_eval.prompt import PromptMetadata, SoftPrompt

logger = logging.getLogger(__name__)

WEIGHT_RUNTIMES = ("stored", "int4")  # the checkpoint's float weights as stored / 4-bit codes (CPU int4 kernel)
PROMPT_MODES = ("cache", "cache-plain", "prepend")


@register_model("ctp")
class CTPLM(HFLM):
    def __init__(
        self,
        pretrained: str | None = None,
        prompt: str | None = None,
        hard_prompt: str | None = None,
        compression: str | None = None,
        calib_data: str | None = None,
        calib_nsamples: int | None = None,
        calib_seqlen: int | None = None,
        data_dir: str | None = None,
        prompt_mode: str = "cache",
        compress_dtype: str | None = None,
        weights: str = "stored",
        **kwargs,
    ) -> None:
        if weights not in WEIGHT_RUNTIMES:
            raise ValueError(f"weights must be one of {WEIGHT_RUNTIMES}, got {weights!r}")
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
        if not isinstance(pretrained, str) and pretrained is not None:
            raise TypeError("ctp takes pretrained= as a model id or folder (string)")
        self.base_model_id = models.model_id(pretrained)
        path = models.resolve_pretrained(pretrained)
        self.compression = str(compression) if compression not in (None, "", "none") else "none"
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        if compress_dtype and self.compression == "none":
            raise ValueError("compress_dtype= is the dtype compression=SPEC runs and caches in; set compression= too")
        quant = None  # a checkpoint another tool quantized: its own quantization (ctp_eval.external)
        if self.compression != "none":
            from ctp_eval.compress import CalibConfig
            from ctp_eval.compress.host import (  # once per host, then cached
                compress_once_per_host,
                rank_device,
            )

            calib = {k: v for k, v in (("dataset", calib_data), ("nsamples", calib_nsamples), ("seqlen", calib_seqlen))
                     if v is not None}
            # data_dir (also read by the ctp_* tasks from the merged model args) is ours, never HFLM's.
            # HFLM's own device / dtype (default "auto": the checkpoint's) say where and in what to compress;
            # a device this machine lacks falls back as in HFLM (lm-eval's CLI sends cuda:0 even without a GPU).
            # compress_dtype compresses (and caches) in another dtype than the evaluation's, e.g. scoring an fp32
            # build in bf16: HFLM then casts the loaded build, and results keep that build's fingerprint.
            # Data parallel (`accelerate launch -m lm_eval`): local rank 0 compresses on its own GPU, the others wait.
            path = compress_once_per_host(path, self.compression, calib=CalibConfig(**calib), data_dir=data_dir,
                                          device=rank_device(kwargs["device"]),
                                          dtype=compress_dtype or kwargs.get("dtype", "auto"))
        else:  # a saved compressed checkpoint passed as pretrained= records its own spec
            from ctp_eval.compress import read_compression_info

            info = read_compression_info(path) if os.path.isdir(path) else None
            if info:
                self.compression = info.get("spec", "none")
            elif (quant := external.read_quantization(path)) is not None:  # quantized by another tool
                external.check_installed(path, quant)  # one line naming a missing library, before HFLM loads
        from ctp_eval.compress.io import build_id

        self.compression_build = build_id(path) if os.path.isdir(path) else ""  # which build of the spec
        try:
            super().__init__(pretrained=path, **kwargs)
        except Exception as err:  # another tool's checkpoint whose kernel this device lacks: one line, named
            if quant is None:
                raise
            raise external.load_failure(path, quant, err) from err
        self.checkpoint_quantization = None  # full record of a checkpoint's own quantization (ctp_eval.external)
        if self.compression == "none" and (quant := external.prepare_for_prompt(self.model, quant)) is not None:
            self.compression, self.checkpoint_quantization = quant.label, quant.details
        if self.backend != "causal":
            raise ValueError("ctp supports decoder-only (causal) models only")
        self.int4_stats = None  # what weights=int4 packed (recorded in the results)
        if weights == "int4":  # before anything is computed from the model: the prompt's cache runs on int4 too
            self.int4_stats = self._to_int4(path)

        self.prompt_mode = prompt_mode
        self.prompt_path = prompt
        self.hard_prompt = hard_prompt
        self.peft_path = kwargs.get("peft")  # a LoRA baseline adapter, loaded by HFLM itself
        self.soft_prompt = self._build_prompt(prompt, hard_prompt)
        self.prompt_embeds = None  # (P, d) the whole prefix ([BOS] + prompt) on the model's device/dtype
        self.absorb_id = None  # "after-bos": a text's own leading BOS is the prefix's (dropped from the text)
        if self.soft_prompt is not None:
            from ctp_eval.prompt import prefix_embeds

            emb = self.model.get_input_embeddings().weight
            embeds = prefix_embeds(self.model, self.tokenizer, self.soft_prompt.embeds, self.layout)
            self.prompt_embeds = embeds.to(device=emb.device, dtype=emb.dtype)
            if self.layout == "after-bos":
                self.absorb_id = self.tokenizer.bos_token_id
        window = super().max_length
        if self.prefix_len >= window:
            raise ValueError(
                f"the prompt takes {self.prefix_len} positions but the model window is {window} tokens: nothing "
                "would be left for text (use a shorter prompt or a larger max_length)"
            )
        self.prefix_kv = None  # the prompt's transformers Cache (batch 1), copied for every generation batch
        self.prefix = None  # the prompt's per-layer keys/values for prompt-aware attention (prompt_mode=cache)
        self.prefix_logits = None  # (1, V) the prediction after the whole prefix: for texts whose BOS it absorbs
        if self.prompt_embeds is not None:
            if prompt_mode != "prepend":
                self.prefix_kv = compute_prefix_kv(self.model, self.prompt_embeds)
            if prompt_mode == "cache":
                from ctp_eval.eval import prefix_attention

                with torch.no_grad():
                    self.prefix = prefix_attention.compute_prefix(self.model, self.prompt_embeds)
            if self.absorb_id is not None:
                with torch.no_grad(), self._autocast():
                    self.prefix_logits = self.model(inputs_embeds=self.prompt_embeds.unsqueeze(0)).logits[:, -1]

    def _to_int4(self, path: str) -> dict:
        """Swap the quantized Linears for Int4Linear (`ctp_eval.compress.int4cpu`): 4-bit codes kept packed,
        torch's CPU int4 matmul in bf16. The grids come from our compressed folder (`ctp_qparams.safetensors`) or
        from a compressed-tensors pack-quantized folder (`ctp-compress --export`, llm-compressor's W4A16); each
        weight is re-encoded on its grid and checked exact."""
        from ctp_eval.compress.int4cpu import Int4Error, compressed_tensors_grids, convert_model, kernel_available
        from ctp_eval.compress.io import QPARAMS_FILE

        if self.device.type != "cpu" or not kernel_available():
            raise ValueError(f"weights=int4 is torch's CPU int4 kernel; it does not run on {self.device} here "
                             "(on GPUs, serve the export with vLLM: docs/inference.md)")
        ours = os.path.join(path, QPARAMS_FILE)
        try:
            if self.compression != "none" and os.path.isfile(ours):
                grids, spec = ours, self.compression
            elif os.path.isfile(os.path.join(path, "config.json")):
                grids, spec = compressed_tensors_grids(path)
            else:
                raise Int4Error(f"{path} is not a local folder")
            stats = convert_model(self.model, grids, spec)
        except Int4Error as err:
            raise ValueError(f"weights=int4 runs our compressed checkpoints (compression=SPEC, a ctp-compress folder "
                             f"or its --export) and compressed-tensors W4A16 folders: {err}") from err
        logger.info("weights=int4: %d Linears packed (%.3fx their bf16 bytes), %d left dense%s", stats["n_int4"],
                    stats["linear_bytes"]["ratio_bf16"], len(stats["left_dense"]),
                    f" ({'; '.join(f'{k}: {v}' for k, v in list(stats['left_dense'].items())[:3])})"
                    if stats["left_dense"] else "")
        return stats

    # ----- prompt ---------------------------------------------------------------------------------------
    def _build_prompt(self, prompt: str | None, hard_prompt: str | None) -> SoftPrompt | None:
        """The prompt's rows (hard tokens, then the learned prompt) and `self.layout`, where they sit: the
        learned prompt's recorded layout; a hard prompt alone goes where real text would (after BOS when
        requests start with one)."""
        from ctp_eval.prompt.layout import combined_layout

        self._learned_prompt_params = 0  # only the loaded prompt is learned; hard-prompt rows are token embeddings
        parts, soft = [], None
        if hard_prompt:  # real tokens, as embeddings: identical to prepending the tokens themselves
            parts.append(SoftPrompt.from_text(hard_prompt, self.model, self.tokenizer))
        if prompt:
            soft = SoftPrompt.load(prompt)
            soft.check_compatible(self.model, self.tokenizer)
            if soft.meta.compression not in ("", "none", self.compression):
                logger.info(
                    "prompt was trained on compression %s, applied to %s (transfer)", soft.meta.compression, self.compression
                )
            parts.append(soft)
            self._learned_prompt_params = soft.embeds.numel()
        self.layout = combined_layout(self.tokenizer, bool(hard_prompt), soft.meta.layout if soft else None,
                                      self.add_bos_token)
        if soft and hard_prompt and self.layout == "after-bos" and soft.meta.layout != "after-bos":
            logger.info("hard prompt after BOS, then the learned prompt (recorded layout: prompt-first)")
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return SoftPrompt(torch.cat([p.embeds for p in parts]), parts[-1].meta)

    @property
    def k(self) -> int:
        """Prompt rows (hard and learned): what results report as the prompt length."""
        return 0 if self.soft_prompt is None else self.soft_prompt.k

    @property
    def prefix_len(self) -> int:
        """Positions in front of the text: the prompt, plus BOS in the "after-bos" layout."""
        return 0 if self.soft_prompt is None else self.k + (self.layout == "after-bos")

    @property
    def max_length(self) -> int:
        return super().max_length - self.prefix_len

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    # ----- forward paths --------------------------------------------------------------------------------
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.k == 0:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad(), self._autocast():
            if self.absorb_id is None:
                return self._prefixed_logits(inps)
            # "after-bos": a row that starts with BOS is [prefix][rest]; its first prediction is the one after
            # the whole prefix (the same for every row). A row without BOS (truncated) gets the prefix's.
            lead = inps[:, 0] == self.absorb_id
            if not bool(lead.any()):
                return self._prefixed_logits(inps)
            rest = inps[lead, 1:]
            parts = [self.prefix_logits.unsqueeze(1).expand(rest.shape[0], 1, -1)]  # (b, 1, V)
            if rest.shape[1]:
                parts.append(self._prefixed_logits(rest))
            absorbed = torch.cat([x.to(parts[-1].dtype) for x in parts], dim=1)
            if bool(lead.all()):
                return absorbed
            out = absorbed.new_empty(*inps.shape, absorbed.shape[-1])
            out[lead] = absorbed
            out[~lead] = self._prefixed_logits(inps[~lead]).to(out.dtype)
            return out

    def _prefixed_logits(self, inps: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits of the rows with the whole prefix in front, aligned to `inps` (prefix never scored)."""
        # HFLM right-pads and passes no mask: causal attention keeps pads from affecting real tokens.
        if self.prefix is not None:
            from ctp_eval.eval import prefix_attention

            return prefix_attention.forward_text(self.model, inps, self.prefix).logits
        if self.prefix_kv is None:
            from ctp_eval.prompt import forward_with_prompt

            return forward_with_prompt(self.model, inps, self.prompt_embeds)
        cache = prefix_cache(self.prefix_kv, inps.shape[0])  # prompt_mode=cache-plain
        return self.model(input_ids=inps, past_key_values=cache, use_cache=True).logits

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        if self.k == 0:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        bsz, k = context.shape[0], self.prefix_len
        mask = generation_kwargs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones_like(context)
        if self.absorb_id is not None:  # "after-bos": each row's own leading BOS is the prefix's; mask it out
            first = torch.argmax(mask, dim=1, keepdim=True)  # (B, 1) left padding: the first real slot
            mask = mask.scatter(1, first, (context.gather(1, first) != self.absorb_id).to(mask.dtype))
        padded = bool((mask == 0).any())
        mask = torch.cat([mask.new_ones(bsz, k), mask], dim=1)  # the prompt is always attended
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        # A sliding window counts cache slots, not positions: pads between the cached prompt and the text would
        # push prompt positions out of the window. Such batches take the prepend path, which pads before the prompt.
        if self.prefix_kv is not None and not (padded and has_sliding_layers(self.prefix_kv)):
            placeholder = context.new_full((bsz, k), pad_id)
            # HFLM's own generate (sampling defaults, stop strings, autocast) on [k placeholder ids][context]:
            # transformers expects input_ids to cover the cached positions too but only embeds the uncached
            # tail, so the placeholders are never looked up; stop strings are searched after them.
            out = super()._model_generate(
                torch.cat([placeholder, context], dim=1), max_length + k, stop, attention_mask=mask,
                past_key_values=prefix_cache(self.prefix_kv, bsz), **generation_kwargs,
            )
            return out[:, k:]
        # prompt_mode=prepend (the reference path): generate from inputs_embeds, which HFLM's method cannot pass.
        # Same decoding defaults as HFLM: greedy unless a temperature > 0 or do_sample is given.
        if generation_kwargs.get("temperature", 0.0) == 0.0 and not generation_kwargs.get("do_sample"):
            generation_kwargs.pop("temperature", None)
            generation_kwargs["do_sample"] = False
        stopping = stop_sequences_criteria(self.tokenizer, stop, k + context.shape[1], bsz)
        embeds = self.model.get_input_embeddings()(context)
        prefix = self.prompt_embeds.to(embeds.dtype).unsqueeze(0).expand(bsz, -1, -1)
        embeds = torch.cat([prefix, embeds], dim=1)  # (B, k + L, d): [prompt][pads][text]
        # Move each row's left pads in front of the prompt ([pads][prompt][text]), as HF left-pads plain text:
        # every real position then shifts alike, which sliding-window layers need (positions come from the mask).
        order = torch.argsort(mask, dim=1, stable=True)  # (B, k + L): masked slots first, the rest in order
        embeds = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        mask = mask.gather(1, order)
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            # With inputs_embeds, generate returns only new ids; prepend the context as HFLM slices it off.
            new = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_length=max_length + k,
                stopping_criteria=stopping,
                pad_token_id=pad_id,
                use_cache=True,
                **generation_kwargs,
            )
        return torch.cat([context, new], dim=1)

    # ----- requests -------------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        # The ctp_* perplexity tasks' requests get the paper protocol (ctp_eval.eval.ppl), others lm-eval's own.
        from ctp_eval.eval import ppl

        def standard(reqs):  # a rank with no such request still joins HFLM's all-gather, with a throwaway one
            out = super(CTPLM, self).loglikelihood_rolling(reqs or [Instance("loglikelihood_rolling", {}, ("ctp",), 0)],
                                                          disable_tqdm)
            return out[: len(reqs)]

        return ppl.route_rolling(requests, lambda reqs: ppl.score_protocol_requests(self, reqs), standard,
                                 join_rest=self.world_size > 1)

    def trainable_params(self) -> int:
        """What the recovery method trains: learned prompt entries, or LoRA weights (a hard prompt trains 0)."""
        n = self._learned_prompt_params
        if self.peft_path:
            n += sum(p.numel() for name, p in self.model.named_parameters() if "lora_" in name)
        return n

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update(
            ctp_eval_version=__version__,
            ctp_hardware=hardware_summary(self.device),
            ctp_base_model=self.base_model_id,
            ctp_compression=self.compression,
            ctp_compression_build=self.compression_build,
            ctp_prompt=self.prompt_path,
            ctp_hard_prompt=self.hard_prompt,
            ctp_peft=self.peft_path,
            ctp_prompt_k=self.k,
            ctp_trainable_params=self.trainable_params(),
        )
        if self.int4_stats is not None:
            info.update(ctp_weights="int4", ctp_int4=dict(self.int4_stats, group_sizes=dict(self.int4_stats["group_sizes"])))
        if self.checkpoint_quantization is not None:  # quantized by another tool; ctp_compression is its label
            info.update(ctp_checkpoint_quantization=self.checkpoint_quantization)
        meta = self.soft_prompt.meta if self.soft_prompt is not None else None
        if meta is None and self.peft_path and os.path.isfile(os.path.join(self.peft_path, "ctp_train.json")):
            import json  # a LoRA adapter ctp-train wrote carries the same metadata beside it

            with open(os.path.join(self.peft_path, "ctp_train.json")) as f:
                meta = PromptMetadata.from_dict(json.load(f))
        if meta is not None:
            info.update(ctp_prompt_trained_on=meta.compression, ctp_prompt_train_data=meta.train_data,
                        ctp_prompt_steps=meta.steps, ctp_prompt_recipe=meta.extra.get("recipe_name") or "paper",
                        ctp_prompt_recipe_args=meta.extra.get("recipe"))
        return info


def hardware_summary(device) -> str:
    """One line naming the machine a result came from (for leaderboards)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:  # Linux: the marketing name is more useful than "x86_64"
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def compute_prefix_kv(model, prompt_embeds: torch.Tensor):
    """Run the k prompt embeddings once; return the model's own cache of their key/value states (batch 1).

    The transformers Cache object is kept whole rather than as raw tensors: a sliding-window layer (Mistral,
    Gemma 2/3, Qwen2/3 with sliding layers) stores only the last window-1 positions and counts the k it has
    seen, and its masks and positions need that count.
    """
    with torch.no_grad():
        out = model(inputs_embeds=prompt_embeds.unsqueeze(0), use_cache=True)
    return out.past_key_values


def has_sliding_layers(cache) -> bool:
    """Whether any layer of a transformers Cache keeps a sliding window (its own layer classes say so)."""
    return any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", []))


def prefix_cache(prefix_kv, batch_size: int):
    """A fresh copy of the prompt's cache for `batch_size` rows; the stored one is never handed to the model."""
    import copy

    cache = copy.deepcopy(prefix_kv)
    cache.batch_repeat_interleave(batch_size)  # transformers' own batch expansion, every layer type alike
    return cache

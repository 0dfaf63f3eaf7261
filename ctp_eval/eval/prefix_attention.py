"""Prompt-aware attention: the soft prompt is the same for every row, so attention is split into two parts.

A text query at position k+i attends to two key sets: the k prompt keys (identical for every row and every query:
a small unmasked attention) and the text keys 0..i (plain causal attention, which keeps SDPA's causal fast path:
no (T, k+T) mask, no work above the diagonal). Each part returns its output o and the log-sum-exp l of its
scores, and the exact attention over [prompt][text] is

    o = (e^l_p o_p + e^l_t o_t) / (e^l_p + e^l_t) = o_p + sigmoid(l_t - l_p) (o_t - o_p)

(the merge of cascade / prefix attention in vLLM and FlashInfer). The prompt's keys and values are computed once
per prompt (`compute_prefix`, batch 1, with gradient when training) and read by every row through broadcasting:
never copied B times, never concatenated with the text keys.

How it reaches the model, with no change to model code: transformers' `AttentionInterface`. `install(model)` (done
by `compute_prefix` / `forward_text`) makes the model's config name our registered function ("ctp_prefix_sdpa", or
"ctp_prefix_eager" for models that run eager attention); the prompt's states travel as an attention kwarg
(`ctp_prefix`), which transformers passes from `model(...)` to every attention call. Without one, the function is
the model's own attention (sdpa or the model's eager function), so everything else runs unchanged. It stays
installed (rather than being swapped in for one call): gradient checkpointing re-runs the layers during backward,
after any such call has returned, and must find the same attention.

Kernels for the split (`PromptPrefix.kernel`):
  * "lse" (CPU): torch's fused CPU flash-attention op, which also returns the log-sum-exp
    (aten._scaled_dot_product_flash_attention_for_cpu, a private op), for both parts; its backward op gives exact
    gradients when handed the merged output and log-sum-exp (FlashAttention's split-KV backward). The prompt part
    runs with the batch folded into the query axis: (1, H, B*T, D) queries against the (1, Hkv, k, D) prompt keys.
  * "concat" (public fallback, any device): one SDPA call with is_causal=True over [prompt keys][text keys], with k
    dummy query rows in front so that SDPA's upper-left causal diagonal lines up (row k+i sees keys 0..k+i).
    Exact and causal, but it copies q, k and v once per layer.
  * "auto" (default): "lse" where the private op exists, applies (CPU, fp32/bf16, equal head dims) and passes its
    self-check, else "concat".
  * "plain": every layer through the plain path below (the reference inside this machinery).
Compiled flex_attention is not used: on CPU (torch 2.13) it supports inference only and returns no log-sum-exp, so
it can neither train nor split.

The private op's semantics (log-sum-exp base and layout, argument order, return values, grouped-query head
indexing) are not a public contract, and older CPU kernels index K/V by query head. So before "lse" runs for a new
(op, device, dtype, heads, kv heads, head dim), a tiny forward and backward of it is compared with public SDPA over
[prompt keys][text keys] with an explicit mask (`_lse_verdict`); on any mismatch or exception "auto" uses "concat"
(an explicit "lse" raises). The verdict is logged once and cached; forward and backward run the very ops it
approved.

Plain path, per layer (reported in `PromptPrefix.plain_layers` and logged once): [prompt keys][text keys]
concatenated, with an explicit mask over absolute positions, through the model's own attention function. Used
where the split would not be exact or the fused kernel cannot express the layer: attention logit soft-capping
(Gemma 2), sliding-window layers whose window does not cover prompt + text, models in eager attention (their
masks are additive floats; Gemma 2), an explicit text mask (padding), attention dropout, and attention arguments
this module does not know.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

KERNELS = ("auto", "lse", "concat", "plain")
_NAME = "ctp_prefix_"  # + the model's own implementation: "sdpa" or "eager"
# Attention kwargs that do not change the attention math (the handled ones - sliding_window, softcap - are checked
# separately); any other non-None kwarg sends the layer to the plain path.
_NEUTRAL = {"position_ids", "use_cache", "cache_position", "sliding_window", "softcap", "is_causal",
            "output_attentions"}
_LOGGED: set = set()


@dataclass
class PromptPrefix:
    """The prompt's key/value states at every attention layer, batch 1: layer index -> (1, Hkv, k, D)."""

    length: int  # k
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    kernel: str = "auto"
    plain_layers: dict[int, str] = field(default_factory=dict)  # layer -> why it ran the plain path (last forward)
    read: set[int] = field(default_factory=set)  # layers that read their states (last forward)

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")

    def with_kernel(self, kernel: str) -> PromptPrefix:
        """The same states (not copied) run through another kernel."""
        return dataclasses.replace(self, kernel=kernel, plain_layers={}, read=set())


# ---------------------------------------------------------------- public entry points


def compute_prefix(model, prompt_embeds: torch.Tensor, kernel: str = "auto") -> PromptPrefix:
    """Run the k prompt embeddings (k, d) once through the decoder and keep every layer's keys/values (batch 1).

    Gradients flow back to `prompt_embeds` when grad is enabled (training); under no_grad it is the prefix cache.
    """
    prefix = PromptPrefix(prompt_embeds.shape[0], kernel=kernel)
    decoder = _decoder(model)
    weight = model.get_input_embeddings().weight
    x = prompt_embeds.to(device=weight.device, dtype=weight.dtype).unsqueeze(0)  # (1, k, d)
    install(model)
    decoder(inputs_embeds=x, use_cache=False, ctp_capture=prefix)
    if not prefix.keys:
        raise RuntimeError(f"{type(model).__name__}: no attention layer reported its keys/values; this architecture "
                           "does not pass attention kwargs through (use prompt_mode=prepend)")
    return prefix


def forward_text(model, input_ids: torch.Tensor, prefix: PromptPrefix, **kwargs):
    """`model(input_ids)` (B, T) with the prompt in front of every row: text at positions k..k+T-1, every layer
    attending to `prefix`. Right padding only (no mask: causal attention keeps pads out of real positions)."""
    k, n = prefix.length, input_ids.shape[1]
    positions = torch.arange(k, k + n, device=input_ids.device).unsqueeze(0)  # (1, T)
    prefix.read.clear()
    prefix.plain_layers.clear()
    install(model)
    out = model(input_ids=input_ids, position_ids=positions, use_cache=False, ctp_prefix=prefix, **kwargs)
    missing = sorted(set(prefix.keys) - prefix.read)
    if missing:  # a layer ran without the prompt: its output would be silently wrong
        raise RuntimeError(f"{type(model).__name__}: attention layers {missing} did not read the prompt's states "
                           "(the model does not pass attention kwargs through); use prompt_mode=prepend")
    if prefix.plain_layers:
        key = (type(model).__name__, tuple(sorted(prefix.plain_layers.items())))
        if key not in _LOGGED:
            _LOGGED.add(key)
            reasons = {}
            for layer, why in sorted(prefix.plain_layers.items()):
                reasons.setdefault(why, []).append(layer)
            logger.info("prompt-aware attention: %s runs the plain path on %s", type(model).__name__,
                        "; ".join(f"layers {ls} ({why})" for why, ls in reasons.items()))
    return out


def install(model) -> str:
    """Make `model` run our registered attention function (the model's own attention whenever no prompt is
    passed); idempotent. Other implementations (flash, flex) are replaced by sdpa. Returns the name."""
    config = model.config
    base = config._attn_implementation
    if isinstance(base, str) and base.startswith(_NAME):
        return base
    name = _register("eager" if base == "eager" else "sdpa")
    config._attn_implementation = name
    return name


# ---------------------------------------------------------------- the attention function


@functools.cache
def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    name = _NAME + base
    AttentionInterface.register(name, functools.partial(_attention, base=base))
    AttentionMaskInterface.register(name, eager_mask if base == "eager" else sdpa_mask)  # masks of the text part
    return name


def _base_function(module, base: str):
    return _base_function_of(type(module).__module__, base)


@functools.cache
def _base_function_of(modeling: str, base: str):
    """The model's own attention: transformers' sdpa, or the eager function of the module's modeling file."""
    if base == "eager":
        fn = getattr(importlib.import_module(modeling), "eager_attention_forward", None)
        if fn is not None:
            return fn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *, base: str,
               ctp_prefix: PromptPrefix | None = None, ctp_capture: PromptPrefix | None = None, **kwargs):
    """transformers' attention signature: query (B, H, T, D), key/value (B, Hkv, T, D) -> ((B, T, H, D), None)."""
    base_fn = _base_function(module, base)
    if ctp_capture is not None:  # the prompt's own forward: keep this layer's states, attend as usual
        ctp_capture.keys[module.layer_idx] = key
        ctp_capture.values[module.layer_idx] = value
    if ctp_prefix is None:
        return base_fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = module.layer_idx
    ctp_prefix.read.add(layer)
    pk = ctp_prefix.keys[layer].to(key.dtype)  # (1, Hkv, k, D): autocast may run the text in another dtype
    pv = ctp_prefix.values[layer].to(value.dtype)
    k = ctp_prefix.length
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    why = _plain_reason(base, query, key, value, attention_mask, k, window, dropout, causal, kwargs)
    kernel = ctp_prefix.kernel
    if why is None and kernel == "plain":
        why = "kernel=plain"
    if why is not None:
        ctp_prefix.plain_layers[layer] = why
        return _plain(module, base_fn, base, query, key, value, pk, pv, k, attention_mask, window, causal,
                      dropout, scaling, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kernel in ("auto", "lse"):
        ops = _private_flash()  # fetched once: the verdict and both passes of _LSEMerge see these very ops
        usable, why_not = _lse_verdict(ops, query, key, value)
        if not usable and kernel == "lse":
            raise RuntimeError(f"kernel='lse' cannot run here: {why_not}")
        if usable:
            return _LSEMerge.apply(query, key, value, pk, pv, scale, ops), None
    return _concat_causal(query, key, value, pk, pv, scale), None


def _plain_reason(base, query, key, value, text_mask, k, window, dropout, causal, kwargs) -> str | None:
    """Why this layer cannot take the split (None: it can)."""
    if kwargs.get("softcap"):
        return "attention logit soft-capping"
    if window is not None and window < k + query.shape[2]:
        return f"sliding window {window} < prompt + text {k + query.shape[2]}"
    if base == "eager":
        return "eager attention"
    if text_mask is not None:
        return "explicit text mask"
    if dropout:
        return "attention dropout"
    if not causal:
        return "non-causal attention"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if query.shape[-1] != value.shape[-1] or query.shape[-1] != key.shape[-1]:
        return "value head dim differs from query head dim"
    unknown = sorted(n for n, v in kwargs.items() if n not in _NEUTRAL and v is not None)
    if unknown:
        return f"attention arguments {unknown}"
    return None


def _plain(module, base_fn, base, query, key, value, pk, pv, k, text_mask, window, causal, dropout, scaling, kwargs):
    """[prompt keys][text keys] with an explicit mask over absolute positions, through the model's own attention."""
    b, t = query.shape[0], query.shape[2]
    # A sliding window of w lets the query at absolute position k+i see keys > k+i-w: no text query sees a prompt
    # key before k-w+1 (the transformers cache keeps the same last w-1 prompt positions).
    start = 0 if window is None else max(0, k - window + 1)
    pk, pv = pk[:, :, start:], pv[:, :, start:]
    keys = torch.cat([pk.expand(b, -1, -1, -1), key], dim=2)  # (B, Hkv, n + T, D)
    values = torch.cat([pv.expand(b, -1, -1, -1), value], dim=2)
    dev = query.device
    q_pos = torch.arange(k, k + t, device=dev)[:, None]  # (T, 1) absolute query positions
    see_prompt = torch.ones(t, k - start, dtype=torch.bool, device=dev)
    if window is not None:
        see_prompt = q_pos - torch.arange(start, k, device=dev)[None, :] < window  # (T, n)
    if text_mask is None:
        text = torch.ones(t, t, dtype=torch.bool, device=dev)
        text = (text.tril() if causal else text)[None, None]  # (1, 1, T, T)
    elif text_mask.dtype == torch.bool:
        text = text_mask
    else:  # additive (eager): 0 attended, the dtype's minimum masked
        text = text_mask > torch.finfo(text_mask.dtype).min / 2
    text = text[..., -t:, -t:]
    mask = torch.cat([see_prompt.expand(*text.shape[:-2], t, k - start), text], dim=-1)  # (b, 1, T, n + T)
    if base == "eager":
        dtype = text_mask.dtype if text_mask is not None and text_mask.is_floating_point() else query.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=dev).masked_fill(~mask, torch.finfo(dtype).min)
    return base_fn(module, query, keys, values, mask, dropout=dropout, scaling=scaling, **kwargs)


# ---------------------------------------------------------------- kernels


@functools.cache
def _private_flash():
    """(forward, backward) of torch's CPU flash attention, which return / take the log-sum-exp; None if absent."""
    try:
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    except (AttributeError, RuntimeError):
        return None


def shared_prefix_pays(device) -> bool:
    """Whether training should share the prompt's positions across rows on `device` (PromptTuner's default).

    Only where the fused "lse" kernel can run (CPU): it saves the prompt's B-fold work. The "concat" fallback
    re-copies q/k/v every layer and adds a batch-1 prompt pass, which costs more than prepending the prompt."""
    return torch.device(device).type == "cpu" and _private_flash() is not None


# (ops, device, dtype, heads, kv heads, head dim) -> (the fused kernel may run, why / why not)
_VERDICTS: dict = {}


def _lse_verdict(ops, query, key, value) -> tuple[bool, str]:
    """Whether `ops` (torch's fused forward/backward) compute this layer's split exactly, and why (not).

    Cached per key, so the self-check runs once per op, device, dtype and head layout; these fix the op's
    semantics, the sequence lengths do not."""
    if ops is None:
        return False, "torch has no fused CPU flash-attention op"
    if query.device.type != "cpu" or query.dtype not in (torch.float32, torch.bfloat16):
        return False, f"the fused op runs fp32/bf16 on CPU only, not {query.dtype} on {query.device.type}"
    h, hkv, d = query.shape[1], key.shape[1], query.shape[-1]
    if d != key.shape[-1] or d != value.shape[-1] or h % hkv:
        return False, "head dims differ or heads are not a multiple of kv heads"
    cache_key = (ops, query.device, query.dtype, h, hkv, d)
    verdict = _VERDICTS.get(cache_key)
    if verdict is None:
        verdict = _VERDICTS[cache_key] = _self_check(ops, query.device, query.dtype, h, hkv, d)
        layout = f"{query.dtype} on {query.device}, {h} heads / {hkv} kv heads of dim {d}"
        log = logger.info if verdict[0] else logger.warning
        log("prompt-aware attention: %s kernel for %s (%s)", "fused 'lse'" if verdict[0] else "public 'concat'",
            layout, verdict[1])
    return verdict


def _self_check(ops, device, dtype, h, hkv, d) -> tuple[bool, str]:
    """A tiny forward + backward of `_LSEMerge` through `ops` against public SDPA on the same inputs."""
    b, t, k, scale = 2, 5, 3, d ** -0.5
    gen = torch.Generator().manual_seed(0)  # private RNG: the check must not move the caller's

    def rand(*shape, transpose=True):  # transformers' layout: (B, T, H, D) memory viewed as (B, H, T, D)
        x = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
        return x.transpose(1, 2) if transpose else x

    # the real call may run under no_grad / inference_mode / autocast; the check needs grad and its own dtype
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        inputs = [rand(b, t, h, d), rand(b, t, hkv, d), rand(b, t, hkv, d), rand(1, k, hkv, d), rand(1, k, hkv, d)]
        inputs = [x.requires_grad_() for x in inputs]
        grad_out = rand(b, t, h, d, transpose=False)  # (B, T, H, D)
        try:
            got = _LSEMerge.apply(*inputs, scale, ops)
            got_grads = torch.autograd.grad(got, inputs, grad_out)
        except Exception as e:  # a missing overload, a changed signature or return tuple, a kernel error
            return False, f"fused op raised {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        ref = [x.detach().float().requires_grad_() for x in inputs]
        want = _masked_reference(*ref, scale)
        want_grads = torch.autograd.grad(want, ref, grad_out.float())
    # relative to each tensor's largest entry: bf16 rounding stays near 1e-2, while a semantic slip (a wrong head,
    # log-sum-exp base or layout) errs by a tenth of the values or more
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, g, w in zip(("output", "dq", "dk_text", "dv_text", "dk_prompt", "dv_prompt"),
                          (got, *got_grads), (want, *want_grads)):
        if g is None or g.shape != w.shape:
            shape = None if g is None else tuple(g.shape)
            return False, f"self-check: {name} has shape {shape}, want {tuple(w.shape)}"
        err = ((g.float() - w).abs().max() / w.abs().max().clamp_min(1e-6)).item()
        if not err <= tol:  # also catches NaN
            return False, f"self-check: {name} differs from public SDPA by {err:.2g} of its scale (tolerance {tol:g})"
    return True, "self-check against public SDPA passed"


def _masked_reference(q, kt, vt, kp, vp, scale) -> torch.Tensor:
    """Public SDPA over [prompt keys][text keys] with the explicit (T, k+T) mask, kv heads repeated: (B, T, H, D)."""
    b, h, t, _ = q.shape
    k, rep = kp.shape[2], h // kt.shape[1]
    keys = torch.cat([kp.expand(b, -1, -1, -1), kt], 2).repeat_interleave(rep, 1)
    values = torch.cat([vp.expand(b, -1, -1, -1), vt], 2).repeat_interleave(rep, 1)
    mask = torch.ones(t, k + t, dtype=torch.bool, device=q.device).tril(k)  # text row i: the prompt and text 0..i
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale).transpose(1, 2)


def _fold(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (1, H, B*T, D): the batch as more queries of one row (a view for transformers' layouts)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[3]).unsqueeze(0)


def _unfold(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(1, H, B*T, D) -> (B, H, T, D), a view."""
    return x[0].unflatten(1, (batch, -1)).transpose(0, 1)


class _LSEMerge(torch.autograd.Function):
    """Causal attention over the text + unmasked attention over the prompt, merged by log-sum-exp ("lse" kernel)."""

    @staticmethod
    def forward(ctx, q, kt, vt, kp, vp, scale, ops):
        # q (B, H, T, D); kt, vt (B, Hkv, T, D); kp, vp (1, Hkv, k, D); ops: the (forward, backward) fused ops
        fwd, _ = ops
        b, h, t, d = q.shape
        o_t, l_t = fwd(q, kt, vt, 0.0, True, scale=scale)  # (B, H, T, D), (B, H, T) fp32
        o_p, l_p = fwd(_fold(q), kp, vp, 0.0, False, scale=scale)  # (1, H, B*T, D), (1, H, B*T)
        o_p, l_p = _unfold(o_p, b), l_p[0].unflatten(1, (b, t)).transpose(0, 1)  # (B, H, T, D), (B, H, T)
        w = torch.sigmoid(l_t - l_p).unsqueeze(-1)  # (B, H, T, 1): the text part's share of the softmax mass
        out = q.new_empty(b, t, h, d)  # the layout transformers wants back
        if q.dtype == torch.float32:
            torch.lerp(o_p, o_t, w, out=out.transpose(1, 2))
        else:  # bf16: merge in fp32, round once
            out.transpose(1, 2).copy_(torch.lerp(o_p.float(), o_t.float(), w))
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(q, kt, vt, kp, vp, out, torch.logaddexp(l_t, l_p))
        ctx.scale, ctx.ops = scale, ops  # backward runs the ops the forward ran, whatever _private_flash says by then
        return out  # (B, T, H, D)

    @staticmethod
    def backward(ctx, grad_out):
        # The flash backward of each part, given the *merged* output and log-sum-exp, yields that part's exact
        # share of the gradient (its probabilities are exp(s - lse) of the full softmax); dq is their sum.
        q, kt, vt, kp, vp, out, lse = ctx.saved_tensors
        _, bwd = ctx.ops
        b, h, t, _d = q.shape
        do, o = grad_out.transpose(1, 2), out.transpose(1, 2)  # (B, H, T, D)
        dq = dkt = dvt = dkp = dvp = None
        if any(ctx.needs_input_grad[:3]):  # not at the first layer, whose text states do not depend on the prompt
            dq, dkt, dvt = bwd(do, q, kt, vt, o, lse, 0.0, True, scale=ctx.scale)
        if any(ctx.needs_input_grad[3:5]) or ctx.needs_input_grad[0]:
            lse1 = lse.transpose(0, 1).reshape(1, h, b * t)
            dq1, dkp, dvp = bwd(_fold(do), _fold(q), kp, vp, _fold(o), lse1, 0.0, False, scale=ctx.scale)
            dq = _unfold(dq1, b) if dq is None else dq + _unfold(dq1, b)
        return dq, dkt, dvt, dkp, dvp, None, None


def _concat_causal(q, kt, vt, kp, vp, scale) -> torch.Tensor:
    """Public-API split ("concat" kernel): (B, T, H, D)."""
    b, h, t, d = q.shape
    k = kp.shape[2]
    # k dummy query rows in front: SDPA's causal mask is upper-left aligned, so row k+i then sees keys 0..k+i,
    # i.e. the whole prompt and text 0..i. The dummy rows attend to prompt keys only and are dropped.
    queries = torch.cat([q.new_zeros(b, h, k, d), q], dim=2)
    keys = torch.cat([kp.expand(b, -1, -1, -1), kt], dim=2)
    values = torch.cat([vp.expand(b, -1, -1, -1), vt], dim=2)
    if keys.shape[1] != h:
        try:
            out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        except TypeError:  # torch < 2.5: no enable_gqa
            rep = h // keys.shape[1]
            out = F.scaled_dot_product_attention(queries, keys.repeat_interleave(rep, 1),
                                                 values.repeat_interleave(rep, 1), is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale)
    return out[:, :, k:].transpose(1, 2).contiguous()


def _decoder(model):
    """The module that maps inputs_embeds to hidden states (no LM head: the prompt positions are never scored)."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if get is not None else None
    except Exception:  # transformers raises for models it cannot find a decoder in
        decoder = None
    return decoder if decoder is not None else model

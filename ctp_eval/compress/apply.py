"""One layer-by-layer traversal for any Hugging Face decoder-only LM.

The model's repeated decoder blocks are found generically (the ModuleList of `num_hidden_layers` identical
blocks: `model.layers` for Llama/Mistral/Qwen, `model.decoder.layers` for OPT, ...). One forward of the model
per calibration batch, with every block stood in for by a recorder, captures block 0's hidden states and what
the model passes *each* block besides them (attention mask, positions, rotary cos/sin), so blocks of another
attention type (sliding vs full window, another rotary base: Gemma 2/3, Qwen2/3 with `max_window_layers`, ...)
are calibrated on their own inputs, built by the model itself. Then, one block at a time: forward hooks
accumulate each Linear's Hessian H = 2 X^T X / N, the pure solver returns new weights, the weights are
written, and the block is re-run *compressed* to give the next block its inputs, so later layers calibrate
against the errors of earlier ones (as GPTQ/SparseGPT do). A Linear that never runs during calibration (an
unrouted expert) has no Hessian: it is named in a warning and left unchanged.

Block offload: the model stays where it was loaded (the host, in its own dtype); with `device=` each block in
turn moves there for Hessian accumulation and the solves, then goes back. The calibration activations and
every block's other inputs (masks, rotary tables) live on that device too (`activations_on_host=True` keeps
them on the host and moves one batch at a time). Hessians are float32 and the solves work on float32 copies
whatever the model's dtype; weights are written back in the model's dtype. Peak memory on the device: one
block + its Hessians + the activations; on the host: the model. CPU work uses torch's thread count (all cores
by default); `threads=` or $CTP_COMPRESS_THREADS sets it for the call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .solvers import (
    DEFAULT_BLOCKSIZE,
    DEFAULT_DAMP,
    gptq_solve,
    magnitude_prune,
    rtn_solve,
    sparsegpt_solve,
)
from .spec import CompressSpec, parse_spec

logger = logging.getLogger(__name__)

THREADS_ENV = "CTP_COMPRESS_THREADS"


@dataclass(frozen=True)
class CompressOptions:
    """Solver settings that are not part of the spec string (they do enter the on-disk cache key)."""

    damp: float = field(default=DEFAULT_DAMP, metadata={"help": "dampening, fraction of mean(diag H)"})
    blocksize: int = field(default=DEFAULT_BLOCKSIZE, metadata={"help": "columns per lazy-update block"})
    true_sequential: bool = field(
        default=False,
        metadata={"help": "re-run the block after each group of Linears sharing an input (q/k/v, o, up/gate, "
                          "down) so later groups see compressed earlier ones; ~2.5x the forward passes"},
    )

    def __post_init__(self):
        if not self.damp >= 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")

    def key(self) -> dict:
        return asdict(self)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks: the list of `num_hidden_layers` same-type modules.

    Refuses, naming them, blocks whose weights are not all in torch.nn.Linear (GPT-2's Conv1D, the fused
    3-D expert tensors of transformers' MoE models): the solvers would leave those weights uncompressed.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():  # pre-order: the outermost matching list comes first
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if n is not None and len(mod) != n:
            continue
        if not all(type(b) is type(mod[0]) for b in mod):
            continue
        others = _non_linear_weights(mod[0])
        if others:
            raise ValueError(
                f"cannot compress {type(model).__name__}: its decoder blocks ({name}) hold weights outside "
                f"torch.nn.Linear ({'; '.join(others)}); the GPTQ/SparseGPT solvers here handle nn.Linear "
                "(out, in) weights only and would leave these uncompressed"
            )
        if any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            return name, mod
    raise ValueError(
        f"cannot compress {type(model).__name__}: no list of num_hidden_layers={n} identical decoder blocks "
        "holding torch.nn.Linear layers was found"
    )


def _non_linear_weights(block: nn.Module) -> list[str]:
    """'name: Type (shapes)' for each module of `block` owning a weight matrix (>= 2-D) that is not a Linear."""
    out = []
    for name, m in block.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            continue
        shapes = [tuple(p.shape) for p in m.parameters(recurse=False) if p.dim() >= 2]
        if shapes:
            out.append(f"{name}: {type(m).__name__} {', '.join(map(str, shapes))}")
    return out


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def solve_layer(
    W: torch.Tensor, H: torch.Tensor | None, spec: CompressSpec, options: CompressOptions = CompressOptions()
) -> tuple[torch.Tensor, dict]:
    """Dispatch one Linear weight (out, in) to the solver(s) the spec names. Pure."""
    q, s = spec.quant, spec.sparse
    if s is not None and s.method == "sparsegpt":
        return sparsegpt_solve(
            W, H, sparsity=s.sparsity if not s.structured else 0.0, n=s.n, m=s.m,
            bits=q.bits if q else 0, group_size=q.group_size if q else 0, sym=q.sym if q else False,
            damp=options.damp, blocksize=options.blocksize,
        )
    stats: dict = {}
    if s is not None:  # magnitude
        W, stats = magnitude_prune(W, sparsity=s.sparsity if not s.structured else 0.0, n=s.n, m=s.m)
    if q is not None and q.method == "gptq":
        return gptq_solve(
            W, H, bits=q.bits, group_size=q.group_size, sym=q.sym, act_order=q.act_order,
            damp=options.damp, blocksize=options.blocksize,
        )
    if q is not None:  # rtn; the grid contains 0, so a magnitude mask survives rounding
        mask = stats.get("mask")
        W, qstats = rtn_solve(W, bits=q.bits, group_size=q.group_size, sym=q.sym)
        stats.update(qstats)
        if mask is not None:
            W = W.masked_fill(mask, 0)
    return W, stats


def _to(obj, device, memo: dict | None = None):
    """Move tensors nested in tuples/lists/dicts to `device` (block kwargs: masks, rotary (cos, sin), ...).

    `memo` (id -> moved tensor) moves a tensor shared by several blocks once, so it stays shared there.
    """
    if torch.is_tensor(obj):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _move_block(block: nn.Module, device: torch.device) -> None:
    """Move one decoder block (its weights keep their dtype). A single seam, so tests can watch the offload."""
    block.to(device)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """torch's CPU thread count set to `n` for the block (None: $CTP_COMPRESS_THREADS, else left as is, which is
    every core torch sees). On a machine shared with other jobs one thread can be faster: extra threads wait;
    bench/README.md ("Scale") has the measurements."""
    if n is None and os.environ.get(THREADS_ENV):
        n = int(os.environ[THREADS_ENV])
    if n is not None and n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Captured(Exception):
    """Raised by the last block's recorder: the final norm and LM head need not run during capture."""


@dataclass
class CalibBatch:
    """One calibration batch on its way through the blocks."""

    hidden: torch.Tensor  # (B, T, d): input of the block being compressed
    calls: list  # per block i: (args, kwargs) the model passes block i besides the hidden states


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor, batch_size: int, to=None
) -> list:
    """One model forward per calibration batch -> [CalibBatch]: block 0's hidden states and every block's other inputs.

    Each block's `forward` is swapped for a recorder that stores its arguments and returns the hidden states
    unchanged, so no block computes (hidden states past block 0 are never used) and the last one stops the
    forward. Masks and rotary tables are built by the model and shared between blocks of one attention type,
    so holding them per block costs no memory beyond what the model itself allocates. `to`: a device each
    batch moves to as soon as it is captured (shared tensors stay shared), so the host never holds them all.
    """
    captured: list[CalibBatch] = []
    last = len(blocks) - 1

    def recorder(i):
        def forward(*args, **kwargs):
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            if i == 0:
                captured.append(CalibBatch(hidden.detach(), []))
            calls = captured[-1].calls
            if len(calls) != i:
                raise RuntimeError(f"{type(model).__name__} did not call its decoder blocks once each, in order")
            calls.append((rest, dict(kwargs)))
            if i == last:
                raise _Captured
            return hidden

        return forward

    device = next(model.parameters()).device
    saved = [b.__dict__.get("forward") for b in blocks]  # an instance-level forward (accelerate hooks) is kept
    try:
        for i, b in enumerate(blocks):
            b.forward = recorder(i)
        with torch.no_grad():
            for s in range(0, calib_ids.shape[0], batch_size):
                try:
                    model(input_ids=calib_ids[s : s + batch_size].to(device), use_cache=False)
                except _Captured:
                    if to is not None:
                        memo: dict = {}
                        b = captured[-1]
                        b.hidden, b.calls = _to(b.hidden, to, memo), _to(b.calls, to, memo)
                    continue
                raise RuntimeError(f"{type(model).__name__}'s forward never reached its last decoder block")
    finally:
        for b, fwd in zip(blocks, saved):
            del b.forward
            if fwd is not None:
                b.forward = fwd
    return captured


def calibrated_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    calib_ids: torch.Tensor | None,
    batch_size: int = 8,
    device=None,
    activations_on_host: bool = False,
) -> Iterator[tuple[int, nn.Module, torch.device, list | None]]:
    """Yield (i, block, work device, inputs) for each block in order; `inputs` is [[hidden, args, kwargs]] per
    calibration batch, block i's own inputs (None without calib_ids). The block sits on the work device
    (`device`, default: where it lives) while the caller changes it; on resumption the block, as the caller
    left it, is run on its inputs to make the next block's inputs (the last block's output is not needed),
    then moved back. A caller that changes nothing sees exactly the model's own `output_hidden_states`.

    The inputs are captured where the model lives and each batch moves to the work device right away (shared
    masks and rotary tables stay shared) unless `activations_on_host`. Each batch's input is dropped as soon
    as its output exists, so the activations are held once, not twice.
    """
    target = torch.device(device) if device is not None else None
    to = target if not activations_on_host else None
    batches = capture_block_inputs(model, blocks, calib_ids, batch_size, to) if calib_ids is not None else None
    for i, block in enumerate(blocks):
        home = next(block.parameters()).device
        work = target or home
        _move_block(block, work)
        inputs = None if batches is None else [[b.hidden, *b.calls[i]] for b in batches]
        yield i, block, work, inputs
        if batches is not None and i < len(blocks) - 1:
            for j, b in enumerate(batches):
                out = _run_block(block, [inputs[j]], work)[0]
                inputs[j] = None  # the caller's list too: the old hidden states are freed batch by batch
                b.hidden, b.calls[i] = out, None  # the block's inputs are spent
        _move_block(block, home)


def _run_block(block: nn.Module, batches: list, device) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for hidden, args, kwargs in batches:
            out = block(_to(hidden, device), *_to(args, device), **_to(kwargs, device))
            out = out[0] if isinstance(out, (tuple, list)) else out  # older HF blocks return tuples
            outs.append(out.to(hidden.device))
    return outs


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()))


def _sequential_groups(block: nn.Module, linears: dict[str, nn.Linear], batch, device) -> list[list[str]]:
    """Linears in call order, grouped by shared input tensor (q/k/v; o; gate/up; down for Llama)."""
    order: list[tuple[str, tuple, torch.Tensor]] = []  # the tensor is held so its address stays unique
    hooks = [
        lin.register_forward_hook(lambda _m, inp, _o, name=name: order.append((name, _tensor_key(inp[0]), inp[0])))
        for name, lin in linears.items()
    ]
    try:
        _run_block(block, [batch], device)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, key, _ in order:
        if name in (n for g in groups for n in g):
            continue
        if key != last:
            groups.append([])
        groups[-1].append(name)
        last = key
    seen = {n for g in groups for n in g}
    unseen = [n for n in linears if n not in seen]  # e.g. an expert batch 0 did not route to: other batches may
    return groups + ([unseen] if unseen else [])


def _hessians(block, linears: dict[str, nn.Linear], names: list[str], batches: list, device) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / N (in, in) float32 for each named Linear that ran, over all calibration tokens."""
    H = {n: torch.zeros(linears[n].in_features, linears[n].in_features, device=device) for n in names}
    count = {n: 0 for n in names}
    memo: dict = {}  # q/k/v (and gate/up) read the same tensor: compute X^T X once per batch

    def hook(_mod, inp, _out, name):
        x = inp[0].detach()
        key = _tensor_key(x)
        if key not in memo:
            x2 = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
            # Keep x alive in the memo: a freed input's address could be reused by a later, different input.
            memo[key] = (x, x2.T @ x2, x2.shape[0])
        _, prod, n_tok = memo[key]
        H[name] += prod
        count[name] += n_tok

    hooks = [linears[n].register_forward_hook(lambda m, i, o, name=n: hook(m, i, o, name)) for n in names]
    try:
        for batch in batches:
            memo.clear()
            _run_block(block, [batch], device)
    finally:
        memo.clear()
        for h in hooks:
            h.remove()
    # A Linear that never ran has no Hessian at all (H = 0 would zero its weights): leave it out.
    return {n: H[n] * (2.0 / count[n]) for n in names if count[n] > 0}


def baseline_spec(spec: CompressSpec) -> CompressSpec:
    """The calibration-free counterpart of a spec: gptq -> rtn, sparsegpt -> magnitude (same grid / fraction)."""
    q, s = spec.quant, spec.sparse
    if q is not None and q.method == "gptq":
        q = replace(q, method="rtn", act_order=False)
    if s is not None and s.method == "sparsegpt":
        s = replace(s, method="magnitude")
    return CompressSpec(sparse=s, quant=q)


def _rel_err(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """Relative layer output error ||(W - W') X||^2 / ||W X||^2: comparable across layers and methods."""
    W, D, H = W.float(), W.float() - W_new.float(), H.float()
    return float(torch.sum((D @ H) * D) / torch.sum((W @ H) * W).clamp_min(1e-30))


def _layer_stats(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor | None, st: dict, spec: CompressSpec) -> dict:
    out = {"zeros": float((W_new == 0).float().mean())}
    if "loss" in st:
        out["loss"] = float(st["loss"])
    if H is not None:
        out["rel_err"] = _rel_err(W, W_new, H)
        # The same error for RTN / magnitude on the same weights and H: the sanity check that the
        # calibrated solver earns its cost, for one extra matmul per layer.
        out["rel_err_baseline"] = _rel_err(W, solve_layer(W, None, baseline_spec(spec))[0], H)
    return out


def compress_model(
    model: nn.Module,
    spec: str | CompressSpec,
    calib_ids: torch.Tensor | None = None,
    *,
    options: CompressOptions = CompressOptions(),
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
    qparams_out: dict | None = None,
    activations_on_host: bool = False,
    threads: int | None = None,
) -> dict:
    """Compress every Linear inside the decoder blocks of `model` in place, layer by layer.

    calib_ids: LongTensor (n, seqlen) of calibration tokens; required when the spec needs calibration
    (GPTQ/SparseGPT), ignored for RTN/magnitude. device: where each block is solved (moved there one at a
    time and back, see the module docstring); default: where the model is. activations_on_host: keep the
    calibration activations where the model is rather than on `device`. threads: CPU threads (`cpu_threads`).
    qparams_out: if a dict, receives {"<linear name>": {"scale", "zero"[, "g_idx"]}} for packed export.
    Returns JSON-able stats: spec, wall time, overall zero fraction, and per-layer zeros/loss/rel_err.
    """
    spec = parse_spec(spec)
    t0 = time.perf_counter()
    stats: dict = {"spec": str(spec), "layers": {}}
    if spec.is_none:
        stats["time_s"] = 0.0
        return stats
    prefix, blocks = find_blocks(model)
    calibrated = spec.needs_calibration
    if calibrated and (calib_ids is None or calib_ids.ndim != 2):
        raise ValueError(f"{spec} needs calibration data: calib_ids LongTensor (n, seqlen)")
    walk = calibrated_blocks(model, blocks, calib_ids if calibrated else None, batch_size, device, activations_on_host)
    with cpu_threads(threads):
        unused = _compress_blocks(walk, len(blocks), prefix, spec, options, stats, qparams_out, progress)
    if unused:
        logger.warning(
            "%d Linear layer(s) never ran on the calibration data and were left uncompressed: %s",
            len(unused), ", ".join(unused),
        )
        stats["unused"] = unused
    stats["time_s"] = time.perf_counter() - t0
    stats["zeros"] = stats.pop("_zeros") / max(stats.pop("_total"), 1)
    stats["n_linear"] = len(stats["layers"])
    for k in ("rel_err", "rel_err_baseline"):
        vals = [v[k] for v in stats["layers"].values() if k in v]
        if vals:
            stats[f"{k}_mean"] = sum(vals) / len(vals)
    logger.info("compressed %d Linear layers with %s in %.1fs", stats["n_linear"], spec, stats["time_s"])
    return stats


def _compress_blocks(walk, n_blocks: int, prefix: str, spec: CompressSpec, options: CompressOptions, stats: dict,
                     qparams_out: dict | None, progress: bool) -> list[str]:
    """The per-block loop of `compress_model`: fills stats["layers"] (and zero counts), returns unused Linears."""
    from tqdm.auto import tqdm

    calibrated = spec.needs_calibration
    stats["_zeros"] = stats["_total"] = 0
    unused: list[str] = []
    bar = tqdm(walk, total=n_blocks, desc=f"compress {spec}", unit="block", disable=not progress)
    for i, block, work, inputs in bar:
        linears = block_linears(block)
        if calibrated and options.true_sequential:
            groups = _sequential_groups(block, linears, inputs[0], work)
        else:
            groups = [list(linears)]
        for group in groups:
            bar.set_postfix_str(f"Hessians {', '.join(group)}" if calibrated else "")
            H = _hessians(block, linears, group, inputs, work) if calibrated else {}
            for name in group:
                full = f"{prefix}.{i}.{name}"
                if calibrated and name not in H:
                    unused.append(full)
                    continue
                bar.set_postfix_str(f"solve {name}")
                h = H.pop(name, None)  # freed once used: a 7B down_proj Hessian alone is 0.45 GiB
                st = _solve_into(linears[name], h, spec, options, stats, full)
                if qparams_out is not None and "scale" in st:
                    qparams_out[full] = {k: st[k].cpu() for k in ("scale", "zero", "g_idx") if k in st}
    return unused


def _solve_into(lin: nn.Linear, H: torch.Tensor | None, spec: CompressSpec, options: CompressOptions, stats: dict,
                full: str) -> dict:
    """Solve one Linear on a float32 copy of its weight (whatever the model's dtype), write the result back in
    the weight's own dtype, and record the layer's stats on the weights as stored. Returns the solver stats."""
    W = lin.weight.data
    W32 = W.to(torch.promote_types(W.dtype, torch.float32))  # the weight itself for an fp32 model: read before writing
    W_new, st = solve_layer(W32, H, spec, options)
    stored = W_new.to(W.dtype)  # what the checkpoint will hold (bf16 rounding of the grid included)
    stats["layers"][full] = _layer_stats(W32, stored, H, st, spec)
    stats["_zeros"] += int((stored == 0).sum())
    stats["_total"] += stored.numel()
    W.copy_(stored)
    return st

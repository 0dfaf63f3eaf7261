"""Pure layer solvers: GPTQ, SparseGPT (optionally joint with quantization), and the weight-only baselines.

Every function takes a weight `W` (out, in) and, for the calibrated ones, the layer Hessian
`H = 2 X^T X / N` (in, in) of its inputs, and returns new dense weights plus stats. Nothing here touches a
module, a device global or a progress bar.

GPTQ (Frantar et al. 2023) and SparseGPT (Frantar & Alistarh 2023) share one sweep: columns are visited left
to right, each column is quantized and/or pruned, and its error is spread onto the columns not yet visited
through the upper Cholesky factor of H^-1 (the OBS update), lazily in column blocks. Joint sparse+quant is
the SparseGPT paper's mode: the quantizer runs inside the same sweep on the already-masked column, so
pruned weights stay exactly zero (the grid always contains 0) and quantization error is compensated too.

Departure from the reference code, deliberate:
- Unstructured masks are chosen per column block as in SparseGPT, but with an exact count per block (the
  reference thresholds with `<=`, so ties and rounding drift): a layer ends up with exactly
  round(sparsity * numel) zeros.

Group grids (group size < number of columns) follow the reference: a group's grid is fitted on the weights
as they stood when the lazy block holding its first column began, i.e. updated by every earlier block but
not yet by the earlier columns of its own block (IST-DASLab `gptq.py` slices the outer `W`, which is written
only at block ends). Fitting grids on the fully error-updated weights instead is no better on SmolLM2-135M's
layers and worse at 2 bits; `tests/test_gptq_reference.py` checks parity with a port of the reference.
"""

from __future__ import annotations

import torch

from .quant import find_params, quantize, rtn_quantize

DEFAULT_DAMP = 0.01  # fraction of mean(diag H) added to the diagonal, as in both reference implementations
DEFAULT_BLOCKSIZE = 128


def _inverse_hessian_factor(W: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero dead inputs in W (in place) and return (upper Cholesky factor of (H + damp)^-1, dead mask)."""
    H = H.to(torch.float64, copy=True)  # float64 only for the (in, in) factorization: fp32 loses rank on big layers
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    if H.device.type != "cpu":  # out-of-place: in-place aliasing is verified on CPU (LAPACK) only
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        return U.to(W.dtype), dead
    # On the host, all three steps in place (LAPACK works in place; same bits as out-of-place): one float64
    # (in, in) matrix instead of four, i.e. 0.9 GiB rather than 3.6 GiB for a 7B model's 11008-wide down_proj.
    torch.linalg.cholesky(H, out=H)  # L
    torch.cholesky_inverse(H, out=H)  # H^-1
    torch.linalg.cholesky(H, upper=True, out=H)  # U
    return H.to(W.dtype), dead


def _work_copy(W: torch.Tensor) -> torch.Tensor:
    """fp32 working copy (fp16/bf16 weights would accumulate rounding in the sweep); fp64 stays fp64."""
    return W.detach().to(torch.promote_types(W.dtype, torch.float32)).clone()


def _block_prune_counts(rows: int, cols: int, sparsity: float, blocksize: int) -> list[int]:
    """How many weights to prune in each column block so the whole layer totals round(sparsity*numel)."""
    counts, done = [], 0
    for i2 in range(blocksize, cols + blocksize, blocksize):
        target = int(round(sparsity * rows * min(i2, cols)))
        counts.append(target - done)
        done = target
    return counts


def _sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    *,
    blocksize: int,
    bits: int = 0,
    group_size: int = 0,
    sym: bool = False,
    sparsity: float = 0.0,
    prune_n: int = 0,
    prune_m: int = 0,
) -> dict:
    """The shared OBS sweep over W (out, in), in place on a float copy. `bits=0` means no quantization.

    `U` is the upper Cholesky factor of H^-1 (in, in): row i of U, divided by U[i, i], is the OBS update
    direction for the remaining columns when column i is fixed.
    """
    rows, cols = W.shape
    Q = torch.zeros_like(W)
    losses = torch.zeros(rows, dtype=W.dtype, device=W.device)
    mask = torch.zeros_like(W, dtype=torch.bool) if (sparsity > 0 or prune_n) else None
    grouped = bool(bits) and 0 < group_size < cols
    prune_counts = _block_prune_counts(rows, cols, sparsity, blocksize) if (mask is not None and not prune_n) else None
    scales, zeros = [], []
    scale = zero = None
    if bits and not grouped:
        scale, zero = find_params(W, bits, sym)
        scales.append(scale)
        zeros.append(zero)

    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (out, bs)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)  # (bs,)
        mask1 = None
        if prune_counts is not None:
            # OBS saliency w^2 / [H^-1]_ii. Given the earlier columns fixed, [H^-1]_ii is U_ii^2, hence the square.
            score = W1**2 / d1.reshape(1, -1) ** 2
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            k = prune_counts[b]
            if k > 0:
                idx = torch.topk(score.flatten(), k, largest=False, sorted=False).indices
                mask1.view(-1)[idx] = True
        elif prune_n:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(i2 - i1):
            w = W1[:, i]
            d = U1[i, i]
            if prune_n and i % prune_m == 0:
                # n:m groups run along the input dimension starting at column 0; blocks are multiples of m.
                seg = W1[:, i : i + prune_m] ** 2 / d1[i : i + prune_m].reshape(1, -1) ** 2
                idx = torch.topk(seg, prune_n, dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            if grouped and (i1 + i) % group_size == 0:
                # The outer W still holds this block's start state (see the module docstring), not W1's updates.
                g = W[:, i1 + i : i1 + i + group_size]  # (out, <= group_size); may reach past this block's end
                if mask1 is not None and prune_counts is not None:
                    inside = mask1[:, i : i + group_size]  # unstructured masks are known for this block only
                    g = torch.cat([g[:, : inside.shape[1]].masked_fill(inside, 0.0), g[:, inside.shape[1] :]], 1)
                scale, zero = find_params(g, bits, sym)
                scales.append(scale)
                zeros.append(zero)
            q = w if mask1 is None else w.masked_fill(mask1[:, i], 0.0)
            if bits:
                q = quantize(q.unsqueeze(1), scale, zero, bits).flatten()
                if mask1 is not None:
                    q = q.masked_fill(mask1[:, i], 0.0)  # already exact (0 is on the grid); kept as a guarantee
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)  # OBS update of the block's remaining columns
            Err1[:, i] = err

        Q[:, i1:i2] = Q1
        losses += (Err1**2).sum(dim=1) / 2  # (w - q)^2 / U_ii^2 / 2 per fixed weight
        if mask is not None:
            mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    out = {"Q": Q, "loss": float(losses.sum()), "mask": mask}
    if bits:
        out["scale"] = torch.cat(scales, dim=1)
        out["zero"] = torch.cat(zeros, dim=1)
    return out


def gptq_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int = 0,
    sym: bool = False,
    act_order: bool = False,
    damp: float = DEFAULT_DAMP,
    blocksize: int = DEFAULT_BLOCKSIZE,
) -> tuple[torch.Tensor, dict]:
    """GPTQ: quantize W (out, in) column by column with Hessian error feedback.

    Returns (W_q, stats): W_q (out, in) in W's dtype, fake-quantized (at most 2**bits values per row and
    group); stats has `loss` (the OBS objective sum), `scale`/`zero` (out, n_groups) and `g_idx` (in,), the
    group of each input column (non-contiguous under act-order), for packed export.
    """
    dtype = W.dtype
    Wf = _work_copy(W)
    Hf = H.to(Wf.device)
    perm = None
    if act_order:
        # Permute before factorizing: the sweep order is what the Cholesky factor encodes.
        perm = torch.argsort(torch.diag(Hf), descending=True)
        Wf = Wf[:, perm]
        Hf = Hf[perm][:, perm]
    U, _ = _inverse_hessian_factor(Wf, Hf, damp)
    res = _sweep(Wf, U, blocksize=blocksize, bits=bits, group_size=group_size, sym=sym)
    Q = res["Q"]
    cols = W.shape[1]
    g_idx = torch.zeros(cols, dtype=torch.int32) if not (0 < group_size < cols) else torch.arange(cols) // group_size
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        g_idx = g_idx[inv.cpu()]
    stats = {"loss": res["loss"], "scale": res["scale"], "zero": res["zero"], "g_idx": g_idx.to(torch.int32)}
    return Q.to(dtype), stats


def sparsegpt_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    sparsity: float = 0.0,
    n: int = 0,
    m: int = 0,
    bits: int = 0,
    group_size: int = 0,
    sym: bool = False,
    damp: float = DEFAULT_DAMP,
    blocksize: int = DEFAULT_BLOCKSIZE,
) -> tuple[torch.Tensor, dict]:
    """SparseGPT: prune W (out, in) to `sparsity` (unstructured) or n:m, with OBS error compensation.

    With `bits > 0` the surviving weights are quantized inside the same sweep (joint mode). Returns
    (W_new, stats): stats has `loss`, `mask` (out, in) bool, True where pruned, and in joint mode
    `scale`/`zero`.
    """
    if not (sparsity > 0 or n):
        raise ValueError("sparsegpt_solve needs sparsity > 0 or an n:m pattern")
    if n:
        if not 0 < n < m:
            raise ValueError(f"n:m needs 0 < n < m, got {n}:{m}")
        blocksize = m * max(1, blocksize // m)  # n:m groups must not straddle blocks
        if W.shape[1] % m:
            raise ValueError(f"in_features {W.shape[1]} not divisible by m={m}")
        if bits and group_size % m:
            raise ValueError(f"group_size {group_size} must be a multiple of m={m}")
    dtype = W.dtype
    Wf = _work_copy(W)
    U, _ = _inverse_hessian_factor(Wf, H.to(Wf.device), damp)
    res = _sweep(
        Wf, U, blocksize=blocksize, bits=bits, group_size=group_size, sym=sym,
        sparsity=0.0 if n else sparsity, prune_n=n, prune_m=m,
    )
    stats = {"loss": res["loss"], "mask": res["mask"]}
    if bits:
        stats["scale"], stats["zero"] = res["scale"], res["zero"]
    return res["Q"].to(dtype), stats


def magnitude_prune(W: torch.Tensor, *, sparsity: float = 0.0, n: int = 0, m: int = 0) -> tuple[torch.Tensor, dict]:
    """Magnitude pruning baseline: zero the smallest |w|, exactly round(sparsity*numel) per layer or n per m."""
    Wf = W.detach().clone()
    if n:
        rows, cols = W.shape
        if cols % m:
            raise ValueError(f"in_features {cols} not divisible by m={m}")
        seg = Wf.abs().reshape(rows, cols // m, m)
        idx = torch.topk(seg, n, dim=2, largest=False).indices
        mask = torch.zeros_like(seg, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)
    else:
        k = int(round(sparsity * W.numel()))
        mask = torch.zeros(W.numel(), dtype=torch.bool, device=W.device)
        if k:
            mask[torch.topk(Wf.abs().flatten(), k, largest=False, sorted=False).indices] = True
        mask = mask.reshape(W.shape)
    Wf[mask] = 0
    return Wf, {"mask": mask}


def rtn_solve(W: torch.Tensor, *, bits: int, group_size: int = 0, sym: bool = False) -> tuple[torch.Tensor, dict]:
    """Round-to-nearest baseline on the same grids as GPTQ (0 stays 0, so it composes with a mask)."""
    Q, scale, zero = rtn_quantize(W, bits, group_size, sym)
    return Q.to(W.dtype), {"scale": scale, "zero": zero}


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """Layer output error tr((W - W') H (W - W')^T) = ||W X - W' X||^2 * 2/N for the H used above."""
    D = (W - W_new).double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))

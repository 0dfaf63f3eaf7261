"""Pure solver tests on small random W / H, checked against a brute-force sequential least-squares reference."""

import pytest
import torch

from ctp_eval.compress.quant import find_params, group_slices, quantize, rtn_quantize
from ctp_eval.compress.solvers import (
    gptq_solve,
    magnitude_prune,
    reconstruction_error,
    rtn_solve,
    sparsegpt_solve,
)


def _problem(rows=16, cols=24, n_tok=256, seed=0, correlated=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    X = torch.randn(n_tok, cols, generator=g, dtype=dtype)
    if correlated:  # real activations are strongly correlated; that is where error feedback pays off
        X = X @ torch.randn(cols, cols, generator=g, dtype=dtype) + 0.1 * X
    H = 2 * X.T @ X / n_tok
    return W, H


def _naive_sweep(W, H, fix):
    """Brute force: fix column j with `fix(j, current)`, then re-solve all later columns by least squares."""
    W, H = W.double(), H.double()
    V = W.clone()
    n = W.shape[1]
    for j in range(n):
        V[:, j] = fix(j, V[:, j])
        F, R = slice(0, j + 1), slice(j + 1, n)
        if j + 1 < n:
            V[:, R] = W[:, R] - (V[:, F] - W[:, F]) @ H[F, R] @ torch.linalg.inv(H[R, R])
    return V


@pytest.mark.parametrize("blocksize", [4, 128])
def test_gptq_matches_bruteforce(blocksize):
    W, H = _problem(rows=8, cols=12)
    scale, zero = find_params(W, 3)
    ref = _naive_sweep(W, H, lambda j, w: quantize(w[:, None], scale, zero, 3).flatten())
    Q, stats = gptq_solve(W, H, bits=3, damp=0.0, blocksize=blocksize)
    torch.testing.assert_close(Q, ref, rtol=1e-8, atol=1e-8)
    assert stats["loss"] > 0


def test_gptq_without_error_feedback_is_rtn():
    # A diagonal H means inputs are uncorrelated: no column can compensate another, so GPTQ == RTN.
    W, _ = _problem()
    H = torch.diag(torch.rand(W.shape[1], dtype=W.dtype) + 0.5)
    for gs in (0, 8):
        Q, _ = gptq_solve(W, H, bits=4, group_size=gs)
        R, _ = rtn_solve(W, bits=4, group_size=gs)
        torch.testing.assert_close(Q, R)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    W, H = _problem(rows=32, cols=64, dtype=torch.float32)
    Q, _ = gptq_solve(W, H, bits=bits, group_size=16)
    R, _ = rtn_solve(W, bits=bits, group_size=16)
    assert reconstruction_error(W, Q, H) < reconstruction_error(W, R, H)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("gs", [0, 8, 10])  # 10 does not divide 24: last group is short
def test_gptq_grid_values_per_group(act_order, gs):
    W, H = _problem(dtype=torch.float32)
    bits = 2
    Q, stats = gptq_solve(W, H, bits=bits, group_size=gs, act_order=act_order, blocksize=7)
    g_idx = stats["g_idx"]
    assert g_idx.shape == (W.shape[1],)
    for g in g_idx.unique():
        cols = (g_idx == g).nonzero().flatten()
        for row in Q[:, cols]:
            assert row.unique().numel() <= 2**bits
    # the returned grid reproduces the weights (packed export relies on this)
    scale, zero = stats["scale"][:, g_idx.long()], stats["zero"][:, g_idx.long()]
    q_int = torch.round(Q / scale + zero)
    assert q_int.min() >= 0 and q_int.max() <= 2**bits - 1
    torch.testing.assert_close(scale * (q_int - zero), Q, rtol=0, atol=1e-5)


def test_gptq_dead_inputs_and_dtype():
    W, H = _problem(dtype=torch.float32)
    H[3, :] = 0
    H[:, 3] = 0
    Q, _ = gptq_solve(W.half(), H, bits=4)
    assert Q.dtype == torch.float16
    assert torch.all(Q[:, 3] == 0)


@pytest.mark.parametrize("sparsity", [0.5, 0.625, 0.75, 0.3])
@pytest.mark.parametrize("cols", [24, 37])
def test_sparsegpt_exact_fraction(sparsity, cols):
    W, H = _problem(rows=10, cols=cols, dtype=torch.float32)
    Wn, stats = sparsegpt_solve(W, H, sparsity=sparsity, blocksize=8)
    mask = stats["mask"]
    assert int(mask.sum()) == round(sparsity * W.numel())
    assert torch.all(Wn[mask] == 0)
    assert torch.all(Wn[~mask] != 0)


def test_sparsegpt_matches_bruteforce_given_its_mask():
    W, H = _problem(rows=8, cols=12)
    Wn, stats = sparsegpt_solve(W, H, sparsity=0.5, damp=0.0, blocksize=4)
    mask = stats["mask"]
    ref = _naive_sweep(W, H, lambda j, w: w.masked_fill(mask[:, j], 0.0))
    torch.testing.assert_close(Wn, ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_sparsegpt_n_m_structure(nm):
    n, m = nm
    W, H = _problem(rows=12, cols=32, dtype=torch.float32)
    Wn, stats = sparsegpt_solve(W, H, n=n, m=m, blocksize=6)  # blocksize gets rounded to a multiple of m
    zeros = (Wn == 0).reshape(12, 32 // m, m).sum(-1)
    assert torch.all(zeros == n)
    assert torch.equal(stats["mask"], Wn == 0)


def test_sparsegpt_beats_magnitude():
    W, H = _problem(rows=32, cols=64, dtype=torch.float32)
    for kw in ({"sparsity": 0.5}, {"n": 2, "m": 4}):
        S, _ = sparsegpt_solve(W, H, **kw)
        M, _ = magnitude_prune(W, **kw)
        assert reconstruction_error(W, S, H) < reconstruction_error(W, M, H)


@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
@pytest.mark.parametrize("gs", [0, 8])
def test_joint_sparse_quant(kw, gs):
    W, H = _problem(rows=12, cols=32, dtype=torch.float32)
    bits = 3
    Wn, stats = sparsegpt_solve(W, H, bits=bits, group_size=gs, **kw)
    mask = stats["mask"]
    assert int(mask.sum()) == W.numel() // 2
    assert torch.all(Wn[mask] == 0)
    for sl in group_slices(W.shape[1], gs):
        for row in Wn[:, sl]:
            assert row.unique().numel() <= 2**bits  # 0 is on the grid, so zeros add no value
    # joint compensation beats pruning then rounding on the same mask
    R = rtn_quantize(W.masked_fill(mask, 0), bits, gs)[0]
    assert reconstruction_error(W, Wn, H) < reconstruction_error(W, R, H)


def test_joint_matches_bruteforce():
    W, H = _problem(rows=8, cols=12)
    Wn, stats = sparsegpt_solve(W, H, sparsity=0.5, bits=4, damp=0.0, blocksize=4)
    mask = stats["mask"]
    scale, zero = find_params(W, 4)
    ref = _naive_sweep(W, H, lambda j, w: quantize(w.masked_fill(mask[:, j], 0.0)[:, None], scale, zero, 4).flatten())
    torch.testing.assert_close(Wn, ref, rtol=1e-8, atol=1e-8)


def test_solvers_deterministic():
    W, H = _problem(dtype=torch.float32)
    a = gptq_solve(W, H, bits=3, group_size=8, act_order=True)[0]
    b = gptq_solve(W, H, bits=3, group_size=8, act_order=True)[0]
    assert torch.equal(a, b)
    a = sparsegpt_solve(W, H, sparsity=0.5, bits=4)[0]
    b = sparsegpt_solve(W, H, sparsity=0.5, bits=4)[0]
    assert torch.equal(a, b)


def test_magnitude_exact():
    W, _ = _problem(rows=10, cols=37, dtype=torch.float32)
    P, stats = magnitude_prune(W, sparsity=0.625)
    assert int((P == 0).sum()) == round(0.625 * W.numel())
    kept = P[P != 0].abs().min()
    assert torch.all(W[stats["mask"]].abs() <= kept)
    P, _ = magnitude_prune(W[:, :36], n=2, m=4)
    assert torch.all((P == 0).reshape(10, 9, 4).sum(-1) == 2)


def test_rtn_values_and_zero_on_grid():
    W, _ = _problem(dtype=torch.float32)
    W[0, :5] = 0
    Q, scale, zero = rtn_quantize(W, 2, 8)
    assert scale.shape == (W.shape[0], 3)
    assert torch.all(Q[0, :5] == 0)
    for sl in group_slices(W.shape[1], 8):
        for row in Q[:, sl]:
            assert row.unique().numel() <= 4

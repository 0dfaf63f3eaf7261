"""Pure uniform-grid helpers: per-row or per-group min-max scale/zero and fake quantization.

The grid follows GPTQ's reference quantizer: asymmetric min-max with the range widened to contain 0 and an
integer zero point, so 0.0 is always exactly representable. That property is what lets a joint
sparse+quantized weight keep its pruned entries at exactly zero.
"""

from __future__ import annotations

import torch


def find_params(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid for each row of `w` (rows, cols) -> (scale, zero), both (rows, 1) float.

    Dequantized values are `scale * (q - zero)` for integer q in [0, 2**bits - 1].
    """
    maxq = 2**bits - 1
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    # An all-zero row would give scale 0; any positive range works since every value is 0.
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize `w` (rows, cols) onto the grid (scale, zero) of shape (rows, 1): returns dense floats."""
    maxq = 2**bits - 1
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def group_slices(cols: int, group_size: int) -> list[slice]:
    """Column ranges sharing one grid; the last group may be shorter (576 is not a multiple of 128)."""
    if group_size <= 0 or group_size >= cols:
        return [slice(0, cols)]
    return [slice(i, min(i + group_size, cols)) for i in range(0, cols, group_size)]


def rtn_quantize(
    w: torch.Tensor, bits: int, group_size: int = 0, sym: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest fake quantization of `w` (rows, cols).

    Returns (w_q, scale, zero) with scale/zero of shape (rows, n_groups).
    """
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    out = torch.empty_like(w)
    scales, zeros = [], []
    for sl in group_slices(w.shape[1], group_size):
        scale, zero = find_params(w[:, sl], bits, sym)
        out[:, sl] = quantize(w[:, sl], scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    return out, torch.cat(scales, dim=1), torch.cat(zeros, dim=1)

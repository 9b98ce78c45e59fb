"""Batched mixed-rank LoRA, torch implementation (the CPU path and the reference for Triton).

The batch is sorted so that each adapter's tokens form one contiguous segment. Adapter weights
live in the unified pool (a flat tensor); each segment names where its A and B^T start:

    A  of a module: row-major [r, in]  at pool[a_off : a_off + r * in]
    B^T of a module: row-major [r, out] at pool[b_off : b_off + r * out]   (scale folded in)

    shrink: h[t, :r]             = x[t] @ A[seg(t)]^T
    expand: y[t, y0 : y0 + out] += h[t, h0 : h0 + r] @ B^T[seg(t)]

Tokens outside every segment (no adapter) are left alone. A fused group such as q/k/v stores the
three A matrices one after another, so one shrink of rank rq + rk + rv feeds three expands with
h0 = 0, rq, rq + rk. Nothing is padded to a maximum rank: each segment costs its own rank.
"""

from __future__ import annotations

import torch


def lora_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    seg_start: list[int],
    seg_len: list[int],
    a_off: list[int],
    rank: list[int],
    max_rank: int,
) -> torch.Tensor:
    """h = zeros(T, max_rank); h[seg, :r] = x[seg] @ A^T for every segment."""
    T, in_features = x.shape
    h = x.new_zeros(T, max_rank)
    for s0, n, off, r in zip(seg_start, seg_len, a_off, rank, strict=True):
        if n and r:
            a = pool[off : off + r * in_features].view(r, in_features)
            torch.mm(x[s0 : s0 + n], a.t(), out=h[s0 : s0 + n, :r])
    return h


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    pool: torch.Tensor,
    seg_start: list[int],
    seg_len: list[int],
    b_off: list[int],
    h_off: list[int],
    rank: list[int],
    y_off: int,
    out_features: int,
) -> torch.Tensor:
    """y[seg, y_off:y_off+out] += h[seg, h0:h0+r] @ B^T for every segment (in place)."""
    for s0, n, off, h0, r in zip(seg_start, seg_len, b_off, h_off, rank, strict=True):
        if n and r:
            bt = pool[off : off + r * out_features].view(r, out_features)
            y[s0 : s0 + n, y_off : y_off + out_features].addmm_(h[s0 : s0 + n, h0 : h0 + r], bt)
    return y


def apply_lora(
    y: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int, tuple | None]]
) -> None:
    """The model's hot path: the same math with views prepared once per adapter residency.

    segments: (start, end, weights) with weights = (A [R, in], [(BT [r, out], h0, y0), ...]) or
    None when the adapter does not target this group.
    """
    for s0, s1, w in segments:
        if w is None:
            continue
        a, expands = w
        h = torch.mm(x[s0:s1], a.t())
        for bt, h0, y0 in expands:
            r, out = bt.shape
            y[s0:s1, y0 : y0 + out].addmm_(h[:, h0 : h0 + r], bt)

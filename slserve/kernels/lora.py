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


# One row per (segment, layer, group) tells the op where that adapter's weights sit in the pool:
#   [a_off, rank, in, num_expands, then (b_off, r, out, h0, y0) for each expand]
# rank 0 means the adapter does not target the group. kernels/csrc/lora_cpu.cpp reads the same
# layout. A fused group has at most three modules (q, k, v).
MAX_EXPANDS = 3
SLOT_FIELDS = 4 + 5 * MAX_EXPANDS


def slot_row(a_off: int, rank: int, in_features: int,
             expands: list[tuple[int, int, int, int, int]]) -> list[int]:
    """A slot-table row: A [rank, in] at a_off, and (b_off, r, out, h0, y0) per expand."""
    if len(expands) > MAX_EXPANDS:
        raise ValueError(f"at most {MAX_EXPANDS} expands per group")
    row = [a_off, rank, in_features, len(expands)]
    for e in expands:
        row.extend(e)
    return row + [0] * (SLOT_FIELDS - len(row))


# One row per (segment, layer, group) of an adapter with output scales (DoRA, IA3):
#   [num_scales, then (v_off, c_off, width, y0) for each]    y[:, y0 : y0 + width] = y * v (+ c)
# c_off is -1 when the module has no shift.
SCALE_FIELDS = 1 + 4 * MAX_EXPANDS


def scale_row(scales: list[tuple[int, int, int, int]]) -> list[int]:
    """An output-scale row: (v_off, c_off, width, y0) per scaled module of the group."""
    row = [len(scales)]
    for s in scales:
        row.extend(s)
    return row + [0] * (SCALE_FIELDS - len(row))


def apply_output_scales(y: torch.Tensor, pool: torch.Tensor, bounds: list[tuple[int, int]],
                        rows: list[list[int]]) -> None:
    """y[s0:s1, y0 : y0 + width] = y * pool[v_off : v_off + width] (+ pool[c_off : ...]) for each
    segment's scale-table row (SCALE_FIELDS) of the layer and group being applied. In place."""
    for (s0, s1), row in zip(bounds, rows, strict=True):
        for e in range(row[0]):
            v_off, c_off, width, y0 = row[1 + 4 * e : 5 + 4 * e]
            ys = y[s0:s1, y0 : y0 + width]
            ys.mul_(pool[v_off : v_off + width])
            if c_off >= 0:
                ys.add_(pool[c_off : c_off + width])


def apply_lora(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, bounds: torch.Tensor,
               slots: torch.Tensor, factors: torch.Tensor | None = None) -> None:
    """The model's hot path, in torch: the C++ op (kernels/csrc/lora_cpu.cpp) has this contract.

    bounds: int64 [S, 2], each segment's (start, end) token rows; slots: int64 [S, SLOT_FIELDS],
    each segment's slot-table row for the layer and group being applied. In place on y.
    factors: float [S, MAX_EXPANDS], each expand's factor (a nested rank's scale(K) / scale(r));
    the C++ op has none: segments with factors run here.
    """
    scale = factors.tolist() if factors is not None else None
    for i, ((s0, s1), row) in enumerate(zip(bounds.tolist(), slots.tolist(), strict=True)):
        a_off, rank, in_f, n_expand = row[:4]
        if s1 <= s0 or rank == 0:
            continue
        h = torch.mm(x[s0:s1], pool[a_off : a_off + rank * in_f].view(rank, in_f).t())
        for e in range(n_expand):
            b_off, r, out, h0, y0 = row[4 + 5 * e : 9 + 5 * e]
            bt = pool[b_off : b_off + r * out].view(r, out)
            y[s0:s1, y0 : y0 + out].addmm_(h[:, h0 : h0 + r], bt, alpha=scale[i][e] if scale else 1)

"""The CPU LoRA paths (Python loop and C++ loop) against a naive per-token reference."""

from __future__ import annotations

import pytest
import torch

from slserve.config import cpu_march
from slserve.kernels.cpu_ext import cpu_isa, lora_apply_op
from slserve.kernels.lora import apply_lora, lora_expand, lora_shrink, slot_row


def _case(seed: int, seg_lens: list[int], ranks: list[int], outs: tuple[int, ...], dtype, gap_rows: int = 3,
          n_in: int = 48):
    """Segments separated by `gap_rows` tokens that use no adapter; fused modules per segment.

    The weights sit in one flat pool between NaN gaps (a read outside a matrix shows up in y), in
    the slot-table layout the engine uses. Returns x, y, the op's (pool, bounds, slots) and the
    same weights as plain matrices for the naive reference."""
    g = torch.Generator().manual_seed(seed)
    parts, cursor = [], 0

    def place(t: torch.Tensor) -> int:
        nonlocal cursor
        parts.append(torch.full((5,), float("nan"), dtype=dtype))
        parts.append(t.flatten())
        off = cursor + 5
        cursor = off + t.numel()
        return off

    bounds, rows, plain, s0 = [], [], [], 0
    for n, r in zip(seg_lens, ranks, strict=True):
        s0 += gap_rows
        a = (torch.randn(len(outs) * r, n_in, generator=g) * 0.3).to(dtype)
        a_off = place(a)
        expands, mats, y0 = [], [], 0
        for j, o in enumerate(outs):
            bt = (torch.randn(r, o, generator=g) * 0.3).to(dtype)
            expands.append((place(bt), r, o, j * r, y0))
            mats.append((bt, j * r, y0))
            y0 += o
        bounds.append([s0, s0 + n])
        rows.append(slot_row(a_off, a.shape[0], n_in, expands))
        plain.append((s0, s0 + n, a, mats))
        s0 += n
    T = s0 + gap_rows
    x = torch.randn(T, n_in, generator=g).to(dtype)
    y = torch.randn(T, sum(outs), generator=g).to(dtype)
    pool = torch.cat(parts + [torch.full((5,), float("nan"), dtype=dtype)])
    op_args = (pool, torch.tensor(bounds, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64))
    return x, y, op_args, plain


def _naive(x, y, plain):
    out = y.double().clone()
    for s0, s1, a, expands in plain:
        for t in range(s0, s1):
            h = a.double() @ x[t].double()
            for bt, h0, y0 in expands:
                r, o = bt.shape
                out[t, y0 : y0 + o] += h[h0 : h0 + r] @ bt.double()
    return out


CASES = [
    ([1], [1], (16,)),
    ([2, 1, 3], [8, 16, 64], (48, 16, 16)),  # fused q/k/v-like, decode-sized segments
    ([40, 1, 70], [64, 1, 8], (128,)),  # prefill segments past the C++ short-segment bound
    ([1] * 32, [1, 8, 16, 64] * 8, (16, 16)),  # 32 adapters, one token each
    ([5, 33, 2], [16, 16, 1], (48, 128)),
    ([7, 13, 1, 4], [3, 5, 64, 2], (20, 7, 33)),  # widths and ranks off the vector and unroll sizes
    ([2, 9, 3], [4, 7, 1], (13, 40), 43),  # in_features off the vector width too
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("path", ["python", "cpp"])
def test_cpu_lora_matches_naive(path, case, dtype):
    seg_lens, ranks, outs, *n_in = CASES[case]
    x, y, op_args, plain = _case(case, seg_lens, ranks, outs, dtype, n_in=n_in[0] if n_in else 48)
    expected = _naive(x, y, plain)
    if path == "cpp":
        op = lora_apply_op()
        assert op is not None, "the C++ helper must build on this machine"
        op(y, x, *op_args)
    else:
        apply_lora(y, x, *op_args)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.25, rtol=2e-2)
    torch.testing.assert_close(y.double(), expected, **tol)


def test_shrink_expand_reference_functions_match_naive():
    """The offset-based torch functions (what the Triton kernels are checked against)."""
    outs = (32, 16)
    x, y, (pool, bounds, slots), plain = _case(9, [3, 1, 20], [8, 1, 64], outs, torch.float32)
    expected = _naive(x, y, plain)
    starts = bounds[:, 0].tolist()
    lens = (bounds[:, 1] - bounds[:, 0]).tolist()
    rows = slots.tolist()
    a_off, ranks = [r[0] for r in rows], [r[1] for r in rows]
    h = lora_shrink(x, pool, starts, lens, a_off, ranks, max(ranks))
    for j, o in enumerate(outs):
        b_off, r_mod, _, h_off, y0 = zip(*(row[4 + 5 * j : 9 + 5 * j] for row in rows), strict=True)
        lora_expand(y, h, pool, starts, lens, list(b_off), list(h_off), list(r_mod), y0[0], o)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_loop_under_inference_mode_with_long_and_short_segments(dtype):
    """The engine calls the op inside torch.inference_mode on inference tensors; long float32
    segments use ATen matmuls and short ones run on OpenMP workers: both must work there."""
    op = lora_apply_op()
    assert op is not None
    # Long segments last, so that a naive split of the segments hands them to a worker thread.
    x, y, op_args, plain = _case(11, [2, 1, 3, 64, 40], [8, 1, 32, 16, 64], (48, 16), dtype)
    expected = _naive(x, y, plain)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        op(yi, xi, *(t.clone() for t in op_args))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.25, rtol=2e-2)
    torch.testing.assert_close(yi.double(), expected, **tol)


def test_cpp_op_rejects_slots_outside_the_pool():
    """A slot row that points past the pool is refused before any memory is read."""
    op = lora_apply_op()
    assert op is not None
    x, y, (pool, bounds, slots), _ = _case(3, [2, 1], [8, 16], (16,), torch.bfloat16)
    bad = slots.clone()
    bad[1, 4] = pool.numel()  # B^T of the second segment starts at the end of the pool
    with pytest.raises(RuntimeError, match="bad expand slot"):
        op(y, x, pool, bounds, bad)
    bad = slots.clone()
    bad[0, 2] = x.shape[1] + 1  # A's width does not match x
    with pytest.raises(RuntimeError, match="bad A slot"):
        op(y, x, pool, bounds, bad)


@pytest.mark.parametrize("seg_len", [3, 7, 8, 9, 13, 32, 33, 45])
def test_cpp_loop_gives_a_token_the_same_result_in_any_segment(seg_len):
    """bfloat16 segments of eight tokens or more run through other loops than decode's few tokens
    (the wide loops of kernels/csrc/lora_cpu.cpp), which add in the same order: with AVX512-BF16
    each token's output is bit for bit what it gets alone, whatever the segment's length. (Builds
    without those loops, for other CPUs or a portable SLSERVE_CPU_MARCH, run long bfloat16
    segments through library matmuls, which only agree within rounding.)"""
    op = lora_apply_op()
    assert op is not None
    x, y, (pool, bounds, slots), plain = _case(20 + seg_len, [seg_len, 5], [64, 7], (96, 40, 13),
                                               torch.bfloat16, n_in=72)
    together = y.clone()
    op(together, x, pool, bounds, slots)
    alone = y.clone()
    for s, (s0, s1) in enumerate(bounds.tolist()):
        for t in range(s0, s1):
            op(alone, x, pool, torch.tensor([[t, t + 1]]), slots[s : s + 1].contiguous())
    torch.testing.assert_close(together.double(), _naive(x, y, plain), atol=0.25, rtol=2e-2)
    if cpu_march() == "native" and "avx512_bf16" in cpu_isa().split():
        assert torch.equal(together, alone)
    else:
        torch.testing.assert_close(together, alone, atol=0.25, rtol=2e-2)

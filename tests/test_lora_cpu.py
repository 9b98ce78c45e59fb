"""The CPU LoRA paths (Python loop and C++ loop) against a naive per-token reference."""

from __future__ import annotations

import pytest
import torch

from slserve.kernels.cpu_ext import lora_apply_op
from slserve.kernels.lora import apply_lora, lora_expand, lora_shrink


def _case(seed: int, seg_lens: list[int], ranks: list[int], outs: tuple[int, ...], dtype, gap_rows: int = 3):
    """Segments separated by `gap_rows` tokens that use no adapter; fused modules per segment."""
    g = torch.Generator().manual_seed(seed)
    n_in = 48
    rows, segments, s0 = [], [], 0
    for n, r in zip(seg_lens, ranks, strict=True):
        s0 += gap_rows
        a = (torch.randn(len(outs) * r, n_in, generator=g) * 0.3).to(dtype)
        expands, y0 = [], 0
        for j, o in enumerate(outs):
            expands.append(((torch.randn(r, o, generator=g) * 0.3).to(dtype), j * r, y0))
            y0 += o
        segments.append((s0, s0 + n, (a, expands)))
        rows.append((s0, s0 + n))
        s0 += n
    T = s0 + gap_rows
    x = torch.randn(T, n_in, generator=g).to(dtype)
    y = torch.randn(T, sum(outs), generator=g).to(dtype)
    return x, y, segments


def _naive(x, y, segments):
    out = y.double().clone()
    for s0, s1, (a, expands) in segments:
        for t in range(s0, s1):
            h = a.double() @ x[t].double()
            for bt, h0, y0 in expands:
                r, o = bt.shape
                out[t, y0 : y0 + o] += h[h0 : h0 + r] @ bt.double()
    return out


def _packed_call(op, y, x, segments):
    starts, ends, a, n_expand, bt, h0, y0 = [], [], [], [], [], [], []
    for s0, s1, (aa, expands) in segments:
        starts.append(s0)
        ends.append(s1)
        a.append(aa)
        n_expand.append(len(expands))
        for b, hh, yy in expands:
            bt.append(b)
            h0.append(hh)
            y0.append(yy)
    op(y, x, starts, ends, a, n_expand, bt, h0, y0)


CASES = [
    ([1], [1], (16,)),
    ([2, 1, 3], [8, 16, 64], (48, 16, 16)),  # fused q/k/v-like, decode-sized segments
    ([40, 1, 70], [64, 1, 8], (128,)),  # prefill segments past the C++ short-segment bound
    ([1] * 32, [1, 8, 16, 64] * 8, (16, 16)),  # 32 adapters, one token each
    ([5, 33, 2], [16, 16, 1], (48, 128)),
    ([7, 13, 1, 4], [3, 5, 64, 2], (20, 7, 33)),  # widths and ranks off the vector and unroll sizes
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("path", ["python", "cpp"])
def test_cpu_lora_matches_naive(path, case, dtype):
    seg_lens, ranks, outs = CASES[case]
    x, y, segments = _case(case, seg_lens, ranks, outs, dtype)
    expected = _naive(x, y, segments)
    if path == "cpp":
        op = lora_apply_op()
        assert op is not None, "the C++ helper must build on this machine"
        _packed_call(op, y, x, segments)
    else:
        apply_lora(y, x, segments)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.25, rtol=2e-2)
    torch.testing.assert_close(y.double(), expected, **tol)


def test_shrink_expand_reference_functions_match_naive():
    """The offset-based torch functions (what the Triton kernels are checked against)."""
    x, y, segments = _case(9, [3, 1, 20], [8, 1, 64], (32, 16), torch.float32)
    expected = _naive(x, y, segments)
    pool_parts, a_off, b_offs, cursor = [], [], [], 7
    pool_parts.append(torch.full((7,), float("nan")))
    for _, _, (a, expands) in segments:
        a_off.append(cursor)
        pool_parts.append(a.flatten())
        cursor += a.numel()
        offs = []
        for bt, _, _ in expands:
            offs.append(cursor)
            pool_parts.append(bt.flatten())
            cursor += bt.numel()
        b_offs.append(offs)
    pool = torch.cat(pool_parts)
    starts = [s for s, _, _ in segments]
    lens = [e - s for s, e, _ in segments]
    ranks = [a.shape[0] for _, _, (a, _) in segments]
    h = lora_shrink(x, pool, starts, lens, a_off, ranks, max(ranks))
    for j, o in enumerate((32, 16)):
        r_mod = [ex[j][0].shape[0] for _, _, (_, ex) in segments]
        h_off = [ex[j][1] for _, _, (_, ex) in segments]
        lora_expand(y, h, pool, starts, lens, [b[j] for b in b_offs], h_off, r_mod, sum((32, 16)[:j]), o)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)


def test_cpp_loop_under_inference_mode_with_long_and_short_segments():
    """The engine calls the op inside torch.inference_mode on inference tensors; long segments
    use ATen matmuls and short ones run on OpenMP workers: both must work there."""
    op = lora_apply_op()
    assert op is not None
    # Long segments last, so that a naive split of the segments hands them to a worker thread.
    x, y, segments = _case(11, [2, 1, 3, 64, 40], [8, 1, 32, 16, 64], (48, 16), torch.bfloat16)
    expected = _naive(x, y, segments)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        seg_i = [(s0, s1, (a.clone(), [(b.clone(), h0, y0) for b, h0, y0 in ex]))
                 for s0, s1, (a, ex) in segments]
        _packed_call(op, yi, xi, seg_i)
    torch.testing.assert_close(yi.double(), expected, atol=0.25, rtol=2e-2)

"""Batched mixed-rank LoRA, Triton implementation (the GPU path).

Layout and semantics are those of lora.py: the batch is sorted into one contiguous token segment
per adapter, and each segment names where its weights start in the flat pool. A program serves
one (segment, token block, rank or output block); it loads its segment's start, length, offsets
and rank as integers and reads the weights straight out of the pool, so adapters are never copied
together. Work is masked and looped to each segment's own rank (rounded up to BLOCK_R), never to
the batch's maximum rank. Segments must not overlap; tokens outside every segment are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

# tl.dot needs every dimension >= 16 on GPUs; 16 is also the rank granularity of the cost.
_BLOCK_R = 16
_BLOCK_K = 64
_BLOCK_O = 64


@triton.jit
def _lora_shrink_kernel(
    # pointers
    x_ptr,
    pool_ptr,
    h_ptr,
    seg_start_ptr,
    seg_len_ptr,
    a_off_ptr,
    rank_ptr,
    # sizes
    in_features,
    max_rank,
    # strides
    stride_xt,
    stride_xk,
    stride_ht,
    stride_hr,
    # meta-parameters
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seg = tl.program_id(0)
    t_block = tl.program_id(1)
    r_block = tl.program_id(2)
    n = tl.load(seg_len_ptr + seg)
    r = tl.minimum(tl.load(rank_ptr + seg), max_rank)  # never write past h's columns
    if t_block * BLOCK_T >= n:
        return
    if r_block * BLOCK_R >= r:
        return
    s0 = tl.load(seg_start_ptr + seg).to(tl.int64)
    a_ptr = pool_ptr + tl.load(a_off_ptr + seg).to(tl.int64)  # A: [r, in] row-major

    t = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    t_valid = t < n
    rr = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    r_valid = rr < r
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k_valid = k0 + kk < in_features
        x = tl.load(
            x_ptr + (s0 + t)[:, None] * stride_xt + (k0 + kk)[None, :] * stride_xk,
            mask=t_valid[:, None] & k_valid[None, :],
            other=0.0,
        )  # [BLOCK_T, BLOCK_K]
        a_t = tl.load(
            a_ptr + rr[None, :] * in_features + (k0 + kk)[:, None],
            mask=k_valid[:, None] & r_valid[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_R], a tile of A^T
        acc += tl.dot(x, a_t.to(x.dtype), input_precision="ieee")
    tl.store(
        h_ptr + (s0 + t)[:, None] * stride_ht + rr[None, :] * stride_hr,
        acc.to(h_ptr.dtype.element_ty),
        mask=t_valid[:, None] & r_valid[None, :],
    )


@triton.jit
def _lora_expand_kernel(
    # pointers
    y_ptr,
    h_ptr,
    pool_ptr,
    seg_start_ptr,
    seg_len_ptr,
    b_off_ptr,
    h_off_ptr,
    rank_ptr,
    factor_ptr,
    # sizes
    y_off,
    out_features,
    # strides
    stride_yt,
    stride_yo,
    stride_ht,
    stride_hr,
    # meta-parameters
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_FACTOR: tl.constexpr,
):
    seg = tl.program_id(0)
    t_block = tl.program_id(1)
    o_block = tl.program_id(2)
    n = tl.load(seg_len_ptr + seg)
    r = tl.load(rank_ptr + seg)
    if t_block * BLOCK_T >= n:
        return
    if r <= 0:
        return
    s0 = tl.load(seg_start_ptr + seg).to(tl.int64)
    h0 = tl.load(h_off_ptr + seg).to(tl.int64)
    bt_ptr = pool_ptr + tl.load(b_off_ptr + seg).to(tl.int64)  # B^T: [r, out] row-major

    t = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    t_valid = t < n
    o = o_block * BLOCK_O + tl.arange(0, BLOCK_O)
    o_valid = o < out_features
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    for r0 in range(0, r, BLOCK_R):
        r_valid = r0 + rr < r
        h = tl.load(
            h_ptr + (s0 + t)[:, None] * stride_ht + (h0 + r0 + rr)[None, :] * stride_hr,
            mask=t_valid[:, None] & r_valid[None, :],
            other=0.0,
        )  # [BLOCK_T, BLOCK_R]
        bt = tl.load(
            bt_ptr + (r0 + rr)[:, None] * out_features + o[None, :],
            mask=r_valid[:, None] & o_valid[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_O]
        acc += tl.dot(h, bt.to(h.dtype), input_precision="ieee")
    if HAS_FACTOR:
        acc *= tl.load(factor_ptr + seg)
    y_ptrs = y_ptr + (s0 + t)[:, None] * stride_yt + (y_off + o)[None, :] * stride_yo
    mask = t_valid[:, None] & o_valid[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _index_tensor(values: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """Per-segment integers as a contiguous 1-D integer tensor on `device` (lists become int64)."""
    if isinstance(values, torch.Tensor):
        assert values.dim() == 1 and not values.is_floating_point(), "segment arrays are 1-D integers"
        return values.to(device).contiguous()
    return torch.tensor(list(values), dtype=torch.int64, device=device)


def _max_len(seg_len: torch.Tensor | Sequence[int], seg_len_t: torch.Tensor) -> int:
    if isinstance(seg_len, torch.Tensor):
        return int(seg_len_t.max())  # a host sync; callers that know it pass max_seg_len
    return max(seg_len)


def _block_t(max_seg_len: int) -> int:
    # Decode segments (one token) take the minimum tl.dot tile; prefill segments up to 64 rows.
    return min(64, max(16, triton.next_power_of_2(max_seg_len)))


def lora_shrink_triton(
    x: torch.Tensor,
    pool: torch.Tensor,
    seg_start: torch.Tensor | Sequence[int],
    seg_len: torch.Tensor | Sequence[int],
    a_off: torch.Tensor | Sequence[int],
    rank: torch.Tensor | Sequence[int],
    max_rank: int,
    *,
    max_seg_len: int | None = None,
) -> torch.Tensor:
    """h = x @ A^T per segment, gathered from the pool; same contract as lora.lora_shrink.

        x: [T, in]; pool: flat [N]; per-segment integer arrays of length S
        h = zeros(T, max_rank, dtype=x.dtype)
        for s in range(S):
            A = pool[a_off[s] : a_off[s] + rank[s] * in].view(rank[s], in)
            h[seg_start[s] : seg_start[s] + seg_len[s], : rank[s]] = x[seg_start[s] : ...] @ A.T

    Segment arrays may be python lists or int32/int64 tensors. max_seg_len bounds the grid; it is
    computed from seg_len (a host sync for tensors) when not given.
    """
    T, in_features = x.shape
    assert pool.dim() == 1 and pool.stride(0) == 1, "pool must be a flat contiguous tensor"
    h = x.new_zeros(T, max_rank)
    num_segments = len(seg_start)
    assert len(seg_len) == len(a_off) == len(rank) == num_segments, "segment arrays differ in length"
    if num_segments == 0 or T == 0 or max_rank == 0:
        return h
    if not isinstance(rank, torch.Tensor):
        assert max(rank) <= max_rank, f"a segment's rank exceeds max_rank={max_rank}"
    seg_start_t, seg_len_t, a_off_t, rank_t = (
        _index_tensor(v, x.device) for v in (seg_start, seg_len, a_off, rank)
    )
    if max_seg_len is None:
        max_seg_len = _max_len(seg_len, seg_len_t)
    if max_seg_len <= 0:
        return h
    block_t = _block_t(max_seg_len)
    grid = (num_segments, triton.cdiv(max_seg_len, block_t), triton.cdiv(max_rank, _BLOCK_R))
    _lora_shrink_kernel[grid](
        x,
        pool,
        h,
        seg_start_t,
        seg_len_t,
        a_off_t,
        rank_t,
        in_features,
        max_rank,
        *x.stride(),
        *h.stride(),
        BLOCK_T=block_t,
        BLOCK_R=_BLOCK_R,
        BLOCK_K=_BLOCK_K,
    )
    return h


def lora_expand_triton(
    y: torch.Tensor,
    h: torch.Tensor,
    pool: torch.Tensor,
    seg_start: torch.Tensor | Sequence[int],
    seg_len: torch.Tensor | Sequence[int],
    b_off: torch.Tensor | Sequence[int],
    h_off: torch.Tensor | Sequence[int],
    rank: torch.Tensor | Sequence[int],
    y_off: int,
    out_features: int,
    *,
    max_seg_len: int | None = None,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[seg, y_off : y_off + out] += h[seg, h0 : h0 + r] @ B^T per segment, in place; returns y.

        y: [T, >= y_off + out]; h: [T, >= h_off[s] + rank[s]]; pool: flat [N]
        for s in range(S):
            BT = pool[b_off[s] : b_off[s] + rank[s] * out].view(rank[s], out)
            rows = slice(seg_start[s], seg_start[s] + seg_len[s])
            y[rows, y_off : y_off + out] += factor[s] * h[rows, h_off[s] : h_off[s] + rank[s]] @ BT

    factor: float32 [S] on y's device (a nested rank's scale(K) / scale(r)); None: every factor 1.
    The sum is taken in fp32 and cast to y's dtype. Same argument rules as lora_shrink_triton.
    """
    T = y.shape[0]
    assert y.dim() == 2 and h.dim() == 2 and h.shape[0] == T, "y: [T, width], h: [T, max_rank]"
    assert 0 <= y_off and y_off + out_features <= y.shape[1], "output columns out of range"
    assert pool.dim() == 1 and pool.stride(0) == 1, "pool must be a flat contiguous tensor"
    num_segments = len(seg_start)
    assert len(seg_len) == len(b_off) == len(h_off) == len(rank) == num_segments, (
        "segment arrays differ in length"
    )
    if num_segments == 0 or T == 0 or out_features == 0:
        return y
    if not isinstance(rank, torch.Tensor) and not isinstance(h_off, torch.Tensor):
        assert all(h0 + r <= h.shape[1] for h0, r in zip(h_off, rank, strict=True)), "h columns out of range"
    seg_start_t, seg_len_t, b_off_t, h_off_t, rank_t = (
        _index_tensor(v, y.device) for v in (seg_start, seg_len, b_off, h_off, rank)
    )
    if max_seg_len is None:
        max_seg_len = _max_len(seg_len, seg_len_t)
    if max_seg_len <= 0:
        return y
    block_t = _block_t(max_seg_len)
    grid = (num_segments, triton.cdiv(max_seg_len, block_t), triton.cdiv(out_features, _BLOCK_O))
    _lora_expand_kernel[grid](
        y,
        h,
        pool,
        seg_start_t,
        seg_len_t,
        b_off_t,
        h_off_t,
        rank_t,
        factor if factor is not None else rank_t,  # never read without HAS_FACTOR
        y_off,
        out_features,
        *y.stride(),
        *h.stride(),
        BLOCK_T=block_t,
        BLOCK_O=_BLOCK_O,
        BLOCK_R=_BLOCK_R,
        HAS_FACTOR=factor is not None,
    )
    return y

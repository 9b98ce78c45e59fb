"""Paged attention, Triton implementation (the GPU path).

Layout and semantics are those of attention.py (paged_attention_reference is the definition).
One program handles a block of queries of one sequence against one kv head: its rows are the
(query, head) pairs of that kv head's GQA group, so every K/V block is read once per group. The
program walks the sequence's keys in blocks of BLOCK_N, looking each key's page up in the block
table (an integer gather; the cache itself may be a strided view into the pool), and keeps an
online softmax in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    # sizes
    qk_scale,
    head_dim,
    page_tokens,
    group,
    # strides
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_bs,
    stride_bb,
    # meta-parameters
    BLOCK_Q: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_begin = tl.load(query_start_ptr + seq).to(tl.int64)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int64) - q_begin
    if q_block * BLOCK_Q >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + seq).to(tl.int64)

    # Row i is query q_block * BLOCK_Q + i // GROUP_PAD of head kv_head * group + i % GROUP_PAD.
    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * group + rows % GROUP_PAD
    row_valid = (rows < BLOCK_Q * GROUP_PAD) & (rows % GROUP_PAD < group) & (tok < q_len)
    q_pos = ctx - q_len + tok  # [BLOCK_M] position of each row's query
    d = tl.arange(0, BLOCK_D)
    d_valid = d < head_dim

    q_ptrs = q_ptr + (q_begin + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    # A finite start keeps exp2(m_old - m_new) defined for rows that see no key in a block.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # The last query of this block decides how far the keys go (causal).
    kv_end = ctx - q_len + tl.minimum(q_len, (q_block + 1) * BLOCK_Q)
    for start in range(0, kv_end, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        # Slots at or past kv_end are never loaded (other=0): a reused page may hold its earlier
        # owner's NaN/inf there, which a zero softmax weight would not cancel (0 * NaN = NaN).
        k_valid = k_pos < kv_end
        page = tl.load(
            block_tables_ptr + seq * stride_bs + (k_pos // page_tokens) * stride_bb, mask=k_valid, other=0
        ).to(tl.int64)
        slot = k_pos % page_tokens
        k_rows = page * stride_kp + slot * stride_ks + kv_head * stride_kh  # [BLOCK_N]
        v_rows = page * stride_vp + slot * stride_vs + kv_head * stride_vh
        k = tl.load(
            k_ptr + k_rows[None, :] + d[:, None] * stride_kd,
            mask=d_valid[:, None] & k_valid[None, :],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k, input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + v_rows[:, None] + d[None, :] * stride_vd,
            mask=k_valid[:, None] & d_valid[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # Padding rows saw no key (l == 0); they are not stored, the guard only avoids 0 / 0.
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = (
        out_ptr + (q_begin + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float,
    *,
    max_q_len: int | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """Causal paged attention over a flat varlen batch; same contract as paged_attention_reference.

        q: [T, H, D]; k_cache, v_cache: [num_pages, P, KVH, D] (any strides)
        block_tables: [S, max_blocks] int; seq_lens: [S]; query_start: [S + 1]
        for s in range(S):
            qs, qe, ctx = query_start[s], query_start[s + 1], seq_lens[s]
            k = k_cache[block_tables[s]].flatten(0, 1)[:ctx]          # [ctx, KVH, D], same for v
            for j in range(qe - qs):
                pos = ctx - (qe - qs) + j
                for h in range(H):
                    w = softmax(k[:pos + 1, h // (H // KVH)] @ q[qs + j, h] * scale)
                    out[qs + j, h] = w @ v[:pos + 1, h // (H // KVH)]
        Rows of out outside every sequence are left unwritten.

    max_q_len: the longest query run of the batch; computed from query_start (a host sync) when
    not given. block_n: keys per inner-loop step (a power of two >= 16).
    """
    T, H, D = q.shape
    num_pages, P, KVH, Dk = k_cache.shape
    S = block_tables.shape[0]
    assert k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "k_cache/v_cache: [num_pages, P, KVH, D]"
    assert Dk == D and H % KVH == 0, f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}"
    assert block_tables.dim() == 2 and seq_lens.shape == (S,) and query_start.shape == (S + 1,)
    assert not block_tables.is_floating_point() and not seq_lens.is_floating_point()
    assert block_n >= 16 and block_n & (block_n - 1) == 0, "block_n must be a power of two >= 16"
    out = torch.empty_like(q)
    if S == 0 or T == 0:
        return out
    if max_q_len is None:
        max_q_len = int((query_start[1:] - query_start[:-1]).max())
    if max_q_len <= 0:
        return out
    seq_lens = seq_lens.contiguous()
    query_start = query_start.contiguous()

    group = H // KVH
    group_pad = triton.next_power_of_2(group)
    # About 64 (query, head) rows per program for prefill; a decode program holds one query.
    block_q = min(triton.next_power_of_2(max_q_len), max(1, 64 // group_pad))
    block_m = max(16, block_q * group_pad)
    grid = (S, triton.cdiv(max_q_len, block_q), KVH)
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start,
        scale * _LOG2E,
        D,
        P,
        group,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *out.stride(),
        *block_tables.stride(),
        BLOCK_Q=block_q,
        GROUP_PAD=group_pad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out

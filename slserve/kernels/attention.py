"""Paged attention, torch implementation (the CPU path and the reference for the Triton kernel).

Layout shared by every implementation:
    q:            [T, H, D]                 queries of the flat varlen batch
    k_cache:      [num_pages, P, KVH, D]    one layer's keys (a strided view into the pool)
    v_cache:      [num_pages, P, KVH, D]
    block_tables: [S, max_blocks] int       page ids of each sequence's context, in order
    seq_lens:     [S] int                   context length of each sequence, new tokens included
    query_start:  [S + 1] int               sequence s owns queries query_start[s]:query_start[s+1]

Query j of sequence s sits at position seq_lens[s] - q_len[s] + j and attends causally to every
key at a position <= its own. GQA: head h reads kv head h // (H // KVH).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """A plain per-sequence loop; slow, obviously correct, used only by tests."""
    T, H, D = q.shape
    P, KVH = k_cache.shape[1], k_cache.shape[2]
    group = H // KVH
    out = torch.empty_like(q)
    for s in range(block_tables.shape[0]):
        qs, qe = int(query_start[s]), int(query_start[s + 1])
        ctx = int(seq_lens[s])
        pages = block_tables[s, : (ctx + P - 1) // P].long()
        k = k_cache[pages].reshape(-1, KVH, D)[:ctx].float().repeat_interleave(group, dim=1)
        v = v_cache[pages].reshape(-1, KVH, D)[:ctx].float().repeat_interleave(group, dim=1)
        for j in range(qe - qs):
            pos = ctx - (qe - qs) + j
            scores = torch.einsum("hd,khd->hk", q[qs + j].float(), k[: pos + 1]) * scale
            out[qs + j] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[: pos + 1]).to(q.dtype)
    return out


@dataclass
class AttentionGroup:
    """Sequences attended together by one padded call.

    q_index:   [B, Qm] long   query token of each (sequence, slot); padding points at token 0
    q_valid:   [B, Qm] bool
    pages:     [B * NB] long  block tables, flattened, padded with page 0
    mask:      [B, 1, Qm, K] bool, K = NB * P, True where the key is visible
    key_outside: [B, K, 1, 1] bool, True for key slots outside the sequence (position >= ctx_len)
    any_outside: whether any key_outside is True (else the gathered K/V need no zeroing)
    q_start:   prefill groups only: when every slot is valid and the queries are the consecutive
               tokens q_start, q_start + 1, ... (equal-length prompts, in order), the slice that
               replaces the gathers
    decode:    one query per sequence
    ctx_lens:  [B] long       context length of each sequence

    The gathered pages also hold slots no sequence wrote: the tail of each last page and the
    padding pages. They are stale data of earlier owners (a freed request's K/V, a freed adapter's
    weights) and may be inf or NaN, which a 0 weight or a -inf bias does not cancel
    (0 * NaN = NaN, -inf + NaN = NaN). So masked scores are selected away, never added to, and
    K/V rows outside the sequence are zeroed before they meet a matmul.
    """

    q_index: torch.Tensor
    q_valid: torch.Tensor
    pages: torch.Tensor
    mask: torch.Tensor
    key_outside: torch.Tensor
    any_outside: bool
    q_start: int | None
    decode: bool
    all_valid: bool
    ctx_lens: torch.Tensor


def build_attention_groups(
    q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]], page_tokens: int, device
) -> list[AttentionGroup]:
    """Split a step's sequences into a decode group (one query each) and a prefill group so that
    padding stays small, and precompute everything the per-layer calls need."""
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    prefill = [i for i, n in enumerate(q_lens) if n > 1]
    return [
        _build_group(members, q_lens, ctx_lens, block_tables, starts, page_tokens, device)
        for members in (decode, prefill)
        if members
    ]


def _build_group(members, q_lens, ctx_lens, block_tables, starts, page_tokens, device) -> AttentionGroup:
    qm = max(q_lens[i] for i in members)
    nb = max((ctx_lens[i] + page_tokens - 1) // page_tokens for i in members)
    b = len(members)
    q_index = torch.zeros(b, qm, dtype=torch.long)
    pages = torch.zeros(b, nb, dtype=torch.long)
    qlen = torch.tensor([q_lens[i] for i in members])
    ctx = torch.tensor([ctx_lens[i] for i in members])
    for row, i in enumerate(members):
        q_index[row, : q_lens[i]] = torch.arange(starts[i], starts[i] + q_lens[i])
        table = block_tables[i][: (ctx_lens[i] + page_tokens - 1) // page_tokens]
        pages[row, : len(table)] = torch.tensor(table, dtype=torch.long)
    j = torch.arange(qm)
    q_valid = j[None, :] < qlen[:, None]
    q_pos = ctx[:, None] - qlen[:, None] + j[None, :]  # [B, Qm]
    k_pos = torch.arange(nb * page_tokens)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < ctx[:, None, None])
    # Padded query slots see key 0 only, so softmax never meets an all-masked row.
    mask[:, :, 0] |= ~q_valid
    key_outside = k_pos[None, :] >= ctx[:, None]
    return AttentionGroup(
        q_index=q_index.to(device),
        q_valid=q_valid.to(device),
        pages=pages.flatten().to(device),
        mask=mask[:, None].to(device),
        key_outside=key_outside[:, :, None, None].to(device),
        any_outside=bool(key_outside.any()),
        q_start=_consecutive_start(q_index) if qm > 1 and bool(q_valid.all()) else None,
        decode=qm == 1,
        all_valid=bool(q_valid.all()),
        ctx_lens=ctx.to(device),
    )


def _consecutive_start(q_index: torch.Tensor) -> int | None:
    flat = q_index.view(-1)
    start = int(flat[0])
    return start if torch.equal(flat, torch.arange(start, start + flat.numel())) else None


@dataclass
class TokenRows:
    """Every query token of a step as one row of the C++ attention op (kernels/cpu_ext.py): the
    op reads each row's keys in place through its sequence's block table, up to its own position.
    A decoding sequence is one row; a prompt chunk of n tokens is n rows over the same table. For
    the short prompts of a serving trace this is ~3x faster than SDPA over padded, masked groups
    (the keys of one prompt stay in the caches across its rows).

    q_index:  [T] long     the query token of each row (arange: rows in token order)
    tables:   [T, NB] long the block table of the row's sequence, padded with page 0
    ctx_lens: [T] long     keys the row attends to: its position + 1
    """

    q_index: torch.Tensor
    tables: torch.Tensor
    ctx_lens: torch.Tensor


def build_token_rows(
    q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]], page_tokens: int, device
) -> TokenRows:
    widths = [(c + page_tokens - 1) // page_tokens for c in ctx_lens]
    nb = max(widths)
    tables = torch.tensor([t[:w] + [0] * (nb - w) for t, w in zip(block_tables, widths, strict=True)],
                          dtype=torch.long)
    n = torch.tensor(q_lens)
    total = int(n.sum())
    first = torch.tensor(ctx_lens) - n + 1  # keys seen by each sequence's first query token
    starts = n.cumsum(0) - n
    ctx = first.repeat_interleave(n, output_size=total) + torch.arange(total) \
        - starts.repeat_interleave(n, output_size=total)
    return TokenRows(
        q_index=torch.arange(total, device=device),
        tables=tables.repeat_interleave(n, dim=0, output_size=total).to(device),
        ctx_lens=ctx.to(device),
    )


def token_row_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: TokenRows,
                        scale: float, op) -> torch.Tensor:
    """Attention of every query token through the C++ op (see TokenRows)."""
    out = torch.empty_like(q)
    op(out, q, k_cache, v_cache, rows.q_index, rows.tables, rows.ctx_lens, scale)
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: list[AttentionGroup],
    scale: float,
    decode_op=None,
) -> torch.Tensor:
    """Batched torch path: one gather of the paged K/V per group, then batched matmuls for the
    decode group (cheaper than SDPA's masked path for one query per sequence) and SDPA for the
    prefill group. `decode_op` (kernels/cpu_ext.py) replaces the decode group's gather and
    matmuls by one pass over the cache in place."""
    T, H, D = q.shape
    KVH = k_cache.shape[2]
    out = torch.empty_like(q)
    for g in groups:
        b, qm = g.q_index.shape
        if g.decode and decode_op is not None:
            decode_op(out, q, k_cache, v_cache, g.q_index.view(-1), g.pages.view(b, -1), g.ctx_lens, scale)
            continue
        # [B, K, KVH, D], stale slots zeroed (see AttentionGroup)
        k = k_cache.index_select(0, g.pages).view(b, -1, KVH, D)
        v = v_cache.index_select(0, g.pages).view(b, -1, KVH, D)
        if g.any_outside:
            k.masked_fill_(g.key_outside, 0)
            v.masked_fill_(g.key_outside, 0)
        if g.decode:
            idx = g.q_index.view(-1)
            qg = q.index_select(0, idx).view(b, KVH, H // KVH, D)
            scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * scale  # [B, KVH, g, K]
            scores = torch.where(g.mask, scores, float("-inf"))
            o = torch.matmul(scores.softmax(-1).to(q.dtype), v.transpose(1, 2))  # [B, KVH, g, D]
            out.index_copy_(0, idx, o.reshape(b, H, D))
            continue
        if g.q_start is not None:
            qg = q[g.q_start : g.q_start + b * qm].view(b, qm, H, D).transpose(1, 2)  # [B, H, Qm, D]
        else:
            qg = q.index_select(0, g.q_index.view(-1)).view(b, qm, H, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=g.mask, scale=scale, enable_gqa=H != KVH
        ).transpose(1, 2)  # [B, Qm, H, D]
        if g.q_start is not None:
            out[g.q_start : g.q_start + b * qm] = o.reshape(b * qm, H, D)
        elif g.all_valid:
            out.index_copy_(0, g.q_index.view(-1), o.reshape(b * qm, H, D))
        else:
            out[g.q_index[g.q_valid]] = o[g.q_valid]
    return out

"""The CPU attention paths (batched torch, the C++ loop for decode groups, and the C++ loop over
every query token as a row, which the engine runs) against the slow reference."""

from __future__ import annotations

import pytest
import torch

from slserve.kernels.attention import (
    build_attention_groups,
    build_token_rows,
    paged_attention,
    paged_attention_reference,
    token_row_attention,
)
from slserve.kernels.cpu_ext import decode_attention_op


def _case(seed, q_lens, ctx_lens, heads, kv_heads, head_dim=16, page_tokens=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-c // page_tokens) for c in ctx_lens) + 5
    # K and V as strided views of a bigger tensor, as they are views of the pool in the engine.
    big = torch.randn(num_pages, 3, 2, page_tokens, kv_heads, head_dim, generator=g).to(dtype)
    k_cache, v_cache = big[:, 1, 0], big[:, 1, 1]
    perm = torch.randperm(num_pages, generator=g).tolist()
    tables, i = [], 0
    for c in ctx_lens:
        n = -(-c // page_tokens)
        tables.append(perm[i : i + n])
        i += n
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(dtype)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), bt, torch.tensor(ctx_lens),
                                    starts, head_dim**-0.5)
    groups = build_attention_groups(q_lens, ctx_lens, tables, page_tokens, "cpu")
    return q, k_cache, v_cache, groups, ref, tables


CASES = [
    ([1, 1, 1], [1, 9, 30], 4, 4),  # decode only, MHA
    ([1, 6, 1, 3], [7, 6, 13, 9], 9, 3),  # mixed, GQA group 3, chunked prefill with context
    ([5, 2], [5, 20], 6, 2),  # prefill only
    ([1] * 12, list(range(3, 39, 3)), 8, 1),  # many decodes, MQA
    ([1] * 5, [1, 2, 17, 64, 93], 9, 3, 64),  # head_dim 64 (the vectorised bfloat16 loop), odd lengths
    ([1, 1, 4], [33, 8, 12], 4, 2, 128),  # head_dim 128
    ([1] * 4, [16, 32, 15, 47], 12, 2, 64),  # group 6: query heads in two register sets; 16-token edges
    ([1, 1], [16, 31], 6, 2, 128),  # head_dim 128, group 3 over register sets of two heads
    ([1, 1, 1], [5, 16, 40], 6, 3, 96),  # head_dim 96: three column blocks
    ([4, 4, 4], [4, 9, 16], 6, 2),  # equal-length prefills from token 0 (sliced, not gathered), with context
    ([1, 3, 3], [5, 3, 7], 4, 2),  # equal-length prefills after a decode: consecutive from token 1
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("use_cpp", [False, True])
def test_cpu_attention_matches_reference(case, dtype, use_cpp):
    q_lens, ctx_lens, heads, kv_heads, *rest = CASES[case]
    head_dim = rest[0] if rest else 16
    q, k_cache, v_cache, groups, ref, _ = _case(case, q_lens, ctx_lens, heads, kv_heads, head_dim,
                                                dtype=dtype)
    op = decode_attention_op() if use_cpp else None
    if use_cpp:
        assert op is not None, "the C++ helper must build on this machine"
    out = paged_attention(q, k_cache, v_cache, groups, head_dim**-0.5, decode_op=op)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)


def _token_rows(q_lens, ctx_lens, tables, q, k_cache, v_cache, head_dim):
    op = decode_attention_op()
    assert op is not None, "the C++ helper must build on this machine"
    rows = build_token_rows(q_lens, ctx_lens, tables, 4, "cpu")
    return rows, token_row_attention(q, k_cache, v_cache, rows, head_dim**-0.5, op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_token_rows_match_reference(case, dtype):
    """Every query token as one row of the C++ op (the engine's CPU path): prompt tokens see the
    keys up to their own position, decode rows their whole context."""
    q_lens, ctx_lens, heads, kv_heads, *rest = CASES[case]
    head_dim = rest[0] if rest else 16
    q, k_cache, v_cache, _, ref, tables = _case(case, q_lens, ctx_lens, heads, kv_heads, head_dim,
                                                dtype=dtype)
    rows, out = _token_rows(q_lens, ctx_lens, tables, q, k_cache, v_cache, head_dim)
    expected_ctx = [c - n + 1 + j for n, c in zip(q_lens, ctx_lens, strict=True) for j in range(n)]
    assert rows.ctx_lens.tolist() == expected_ctx
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)


def test_token_rows_split_unequal_rows_over_threads():
    """One long decode row and many one-key prompt rows: the threads split by keys read, not by
    row count, and every row still lands in its own output slot."""
    q_lens, ctx_lens = [1, 40, 1], [300, 40, 7]
    q, k_cache, v_cache, _, ref, tables = _case(7, q_lens, ctx_lens, 6, 2, 64, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            _, out = _token_rows(q_lens, ctx_lens, tables, q, k_cache, v_cache, 64)
            torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    finally:
        torch.set_num_threads(threads)


def poison_stale_slots(k_cache, v_cache, tables, ctx_lens, page_tokens, value: float) -> None:
    """Write `value` into every cache slot that no sequence owns below its context length: the
    tails of last pages and whole unused pages, as a freed request or adapter may leave them."""
    stale = torch.ones(k_cache.shape[:2], dtype=torch.bool)
    for table, ctx in zip(tables, ctx_lens, strict=True):
        for i in range(ctx):
            stale[table[i // page_tokens], i % page_tokens] = False
    k_cache[stale] = value
    v_cache[stale] = value


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("use_cpp", [False, True])
def test_stale_nonfinite_slots_are_never_read(case, use_cpp, poison):
    """Issue 15, defect 3: NaN/inf left in freed pages must not reach a later sequence whose last
    page is partly filled (every case has such a sequence), nor through padding pages."""
    q_lens, ctx_lens, heads, kv_heads, *rest = CASES[case]
    head_dim = rest[0] if rest else 16
    assert any(c % 4 for c in ctx_lens), "the case needs a partly filled last page"
    q, k_cache, v_cache, groups, ref, tables = _case(case, q_lens, ctx_lens, heads, kv_heads, head_dim)
    poison_stale_slots(k_cache, v_cache, tables, ctx_lens, 4, poison)
    op = decode_attention_op() if use_cpp else None
    out = paged_attention(q, k_cache, v_cache, groups, head_dim**-0.5, decode_op=op)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    if use_cpp:
        _, out = _token_rows(q_lens, ctx_lens, tables, q, k_cache, v_cache, head_dim)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


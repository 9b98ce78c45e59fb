"""The Triton paged-attention kernel against the torch loop reference and the batched SDPA path.

On machines without a GPU the kernel runs in the Triton interpreter (see conftest.py), so shapes
stay small and the interpreter tests run in fp32; bf16 runs only where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from slserve.kernels.attention import build_attention_groups, paged_attention, paged_attention_reference
from slserve.kernels.triton_attention import paged_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE == "cpu", reason="bf16 needs a GPU")),
]

# (q_len, seq_len) per sequence; seq_len > q_len means earlier tokens are already cached.
LAYOUTS = {
    "prefill": [(5, 5), (9, 9), (3, 3)],
    "decode": [(1, 7), (1, 18), (1, 1), (1, 33)],
    "mixed": [(1, 12), (6, 6), (1, 25), (4, 17)],
    "chunked_prefill": [(7, 30), (3, 11), (1, 2)],
    "ragged_long": [(13, 37), (1, 4), (2, 21)],
}
HEADS = {"mha": (4, 4), "gqa_4_2": (4, 2), "gqa_6_2": (6, 2), "mqa_4_1": (4, 1)}


def make_case(
    layout: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_tokens: int,
    *,
    strided: bool,
    dtype: torch.dtype = torch.float32,
    index_dtype: torch.dtype = torch.int32,
    seed: int = 0,
):
    """Random q and cache with every sequence's pages scattered over a shuffled pool."""
    gen = torch.Generator().manual_seed(seed)
    q_lens = [n for n, _ in layout]
    seq_lens = [c for _, c in layout]
    blocks = [(c + page_tokens - 1) // page_tokens for c in seq_lens]
    num_pages = sum(blocks) + 5  # spare pages that no sequence owns
    shape = (num_pages, page_tokens, num_kv_heads, head_dim)
    to = dict(device=DEVICE, dtype=dtype)
    if strided:
        # Like one layer of a pool [pages, layers, 2, P, KVH, D]: the page stride spans other data.
        pool = torch.randn(num_pages, 3, 2, *shape[1:], generator=gen).to(**to)
        k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]
        assert not k_cache.is_contiguous()
    else:
        k_cache = torch.randn(*shape, generator=gen).to(**to)
        v_cache = torch.randn(*shape, generator=gen).to(**to)
    order = torch.randperm(num_pages, generator=gen).tolist()
    tables, used = [], 0
    for n in blocks:
        tables.append(order[used : used + n])
        used += n
    # Padding entries are -1: the kernel must never read past a sequence's own pages.
    block_tables = torch.full((len(layout), max(blocks)), -1, dtype=index_dtype)
    for s, table in enumerate(tables):
        block_tables[s, : len(table)] = torch.tensor(table, dtype=index_dtype)
    query_start = torch.tensor([0] + q_lens, dtype=index_dtype).cumsum(0).to(index_dtype)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    return dict(
        q=q.to(**to),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=index_dtype, device=DEVICE),
        query_start=query_start.to(DEVICE),
        scale=head_dim**-0.5,
    ), (q_lens, seq_lens, tables, page_tokens)


def check(case, meta, dtype=torch.float32, **kwargs) -> None:
    out = paged_attention_triton(**case, **kwargs)
    ref_case = {k: v.float() if v.is_floating_point() else v for k, v in case.items() if k != "scale"}
    expected = paged_attention_reference(**ref_case, scale=case["scale"])
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])
    q_lens, seq_lens, tables, page_tokens = meta
    groups = build_attention_groups(q_lens, seq_lens, tables, page_tokens, DEVICE)
    batched = paged_attention(
        ref_case["q"], ref_case["k_cache"], ref_case["v_cache"], groups, scale=case["scale"]
    )
    torch.testing.assert_close(out.float(), batched, **TOLERANCE[dtype])


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layouts_and_heads(layout, heads):
    # block_n=16 makes most sequences span several key blocks, exercising the online softmax.
    case, meta = make_case(layout, *heads, head_dim=16, page_tokens=4, strided=True)
    check(case, meta, block_n=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize(
    "head_dim,page_tokens", [(32, 4), (16, 16), (24, 3)], ids=["d32_p4", "d16_p16", "d24_p3"]
)
def test_cache_layouts(head_dim, page_tokens, strided, dtype):
    case, meta = make_case(
        LAYOUTS["mixed"], 6, 2, head_dim=head_dim, page_tokens=page_tokens, strided=strided, dtype=dtype
    )
    check(case, meta, dtype=dtype)


def test_int64_indices_and_given_max_q_len():
    case, meta = make_case(
        LAYOUTS["chunked_prefill"], 4, 2, head_dim=16, page_tokens=4, strided=True, index_dtype=torch.int64
    )
    check(case, meta, max_q_len=7, block_n=32)


def test_query_rows_owned_by_no_sequence():
    case, meta = make_case(LAYOUTS["decode"], 4, 2, head_dim=16, page_tokens=4, strided=False)
    # Drop the last sequence: its query row belongs to no sequence any more.
    case["block_tables"] = case["block_tables"][:-1]
    case["seq_lens"] = case["seq_lens"][:-1]
    case["query_start"] = case["query_start"][:-1]
    out = paged_attention_triton(**case)
    expected = paged_attention_reference(**case)
    torch.testing.assert_close(out[:-1], expected[:-1], **TOLERANCE[torch.float32])


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("layout", ["decode", "chunked_prefill", "ragged_long"])
def test_stale_nonfinite_slots_are_never_read(layout, poison):
    """Issue 15, defect 3: NaN/inf in slots no sequence owns (tails of last pages, unused pages)
    must not reach the output; every layout has sequences whose last page is partly filled."""
    case, meta = make_case(LAYOUTS[layout], 4, 2, head_dim=16, page_tokens=4, strided=True)
    expected = paged_attention_reference(**case)
    q_lens, seq_lens, tables, page_tokens = meta
    assert any(c % page_tokens for c in seq_lens)
    stale = torch.ones(case["k_cache"].shape[:2], dtype=torch.bool, device=DEVICE)
    for table, ctx in zip(tables, seq_lens, strict=True):
        for i in range(ctx):
            stale[table[i // page_tokens], i % page_tokens] = False
    case["k_cache"][stale] = poison
    case["v_cache"][stale] = poison
    out = paged_attention_triton(**case, block_n=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])

"""The Triton LoRA shrink/expand kernels against the torch path and a naive per-token loop.

Every adapter's A and B^T sit at shuffled offsets of a flat pool with gaps between them; the gaps
hold NaN, so a kernel that reads outside an adapter's own rows (past its rank, say) fails loudly.
On machines without a GPU the kernels run in the Triton interpreter, in fp32 and at small shapes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from slserve.kernels.lora import lora_expand, lora_shrink
from slserve.kernels.triton_lora import lora_expand_triton, lora_shrink_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
RANKS = (1, 8, 16, 64)

# A batch is a list of runs (num_tokens, rank); rank None marks tokens with no adapter.
BATCHES = {
    "decode_rank1": [(1, 1)],
    "prefill_rank64": [(20, 64)],
    "mixed_ranks": [(9, 1), (1, 8), (17, 16), (1, 64), (5, 8)],
    "no_adapter_rows": [(3, None), (4, 16), (2, None), (1, 1), (6, None), (1, 64), (2, None)],
    "32_decode": [(1, RANKS[i % 4]) for i in range(32)],
    "32_mixed": [(1 if i % 3 else 1 + i % 7, RANKS[(i * 3) % 4]) for i in range(32)] + [(2, None)],
    "no_adapter_at_all": [(5, None)],
}
# (in_features, out_features): attention q/o, GQA-sized k/v, MLP up/gate, MLP down.
SHAPES = {"q_48x48": (48, 48), "kv_48x16": (48, 16), "up_48x128": (48, 128), "down_128x48": (128, 48)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@dataclass
class Segments:
    seg_start: list[int]
    seg_len: list[int]
    rank: list[int]  # shrink rank: the sum of the module ranks
    module_rank: list[list[int]]  # per segment, the rank of each expanded module
    a_off: list[int]
    b_off: list[list[int]]  # per module, the B^T offset of each segment


def build_pool(
    batch: list[tuple[int, object]], in_features: int, module_ranks, out_widths: list[int], seed: int
) -> tuple[int, torch.Tensor, Segments]:
    """Lay each adapter's stacked A [sum(r), in] and one B^T [r, out] per module into a NaN pool.

    module_ranks(batch rank entry) -> per-module ranks; the shrink rank is their sum.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    seg_start, seg_len, ranks, module_r = [], [], [], []
    token = 0
    for n, r in batch:
        if r is not None:
            seg_start.append(token)
            seg_len.append(n)
            module_r.append(module_ranks(r))
            ranks.append(sum(module_r[-1]))
        token += n
    chunks = []  # (segment, which, rows, width)
    for s, rs in enumerate(module_r):
        chunks.append((s, "a", sum(rs), in_features))
        chunks += [(s, m, r, out) for m, (r, out) in enumerate(zip(rs, out_widths, strict=True))]
    rng.shuffle(chunks)
    offsets, used = {}, 0
    for s, which, rows, width in chunks:
        used += rng.randrange(0, 9)  # a gap
        offsets[s, which] = used
        used += rows * width
    pool = torch.full((used + 7,), float("nan"))
    for s, which, rows, width in chunks:
        fan_in = in_features if which == "a" else max(rows, 1)
        w = torch.randn(rows * width, generator=gen) / fan_in**0.5
        pool[offsets[s, which] : offsets[s, which] + rows * width] = w
    segments = Segments(
        seg_start=seg_start,
        seg_len=seg_len,
        rank=ranks,
        module_rank=module_r,
        a_off=[offsets[s, "a"] for s in range(len(ranks))],
        b_off=[[offsets[s, m] for s in range(len(ranks))] for m in range(len(out_widths))],
    )
    return token, pool.to(DEVICE), segments


def naive_lora(x, pool, segs: Segments, out_widths, h_width):
    """Per-token loop in float64: h[t] = A @ x[t]; delta_m[t] = h[t, h0:h0+r] @ B^T_m."""
    x, pool = x.double().cpu(), pool.double().cpu()
    T, in_features = x.shape
    h = torch.zeros(T, h_width, dtype=torch.float64)
    deltas = [torch.zeros(T, out, dtype=torch.float64) for out in out_widths]
    for t in range(T):
        owner = [
            s for s, (s0, n) in enumerate(zip(segs.seg_start, segs.seg_len, strict=True)) if s0 <= t < s0 + n
        ]
        if not owner:
            continue
        (s,) = owner
        r = segs.rank[s]
        a = pool[segs.a_off[s] : segs.a_off[s] + r * in_features].view(r, in_features)
        h[t, :r] = a @ x[t]
        h0 = 0
        for m, (rm, out) in enumerate(zip(segs.module_rank[s], out_widths, strict=True)):
            bt = pool[segs.b_off[m][s] : segs.b_off[m][s] + rm * out].view(rm, out)
            deltas[m][t] = h[t, h0 : h0 + rm] @ bt
            h0 += rm
    return h.float(), [d.float() for d in deltas]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("batch", BATCHES.values(), ids=BATCHES.keys())
def test_shrink_expand(batch, shape):
    in_features, out_features = shape
    T, pool, segs = build_pool(
        batch, in_features, lambda r: [r], [out_features], seed=len(batch) + in_features
    )
    max_rank = max(segs.rank, default=0)
    x = torch.randn(T, in_features, device=DEVICE)
    args = (segs.seg_start, segs.seg_len)

    h = lora_shrink_triton(x, pool, *args, segs.a_off, segs.rank, max_rank)
    h_torch = lora_shrink(x, pool, *args, segs.a_off, segs.rank, max_rank)
    h_naive, (delta,) = naive_lora(x, pool, segs, [out_features], max_rank)
    torch.testing.assert_close(h, h_torch, **TOLERANCE[torch.float32])
    torch.testing.assert_close(h.cpu(), h_naive, **TOLERANCE[torch.float32])

    # y is wider than the module: the update lands at a column offset and leaves the rest alone.
    y_off = 3
    y0 = torch.randn(T, out_features + 7, device=DEVICE)
    h_off = [0] * len(segs.rank)
    y = lora_expand_triton(
        y0.clone(), h_torch, pool, *args, segs.b_off[0], h_off, segs.rank, y_off, out_features
    )
    y_torch = lora_expand(
        y0.clone(), h_torch, pool, *args, segs.b_off[0], h_off, segs.rank, y_off, out_features
    )
    y_naive = y0.clone().cpu()
    y_naive[:, y_off : y_off + out_features] += delta
    torch.testing.assert_close(y, y_torch, **TOLERANCE[torch.float32])
    torch.testing.assert_close(y.cpu(), y_naive, **TOLERANCE[torch.float32])

    covered = torch.zeros(T, dtype=torch.bool, device=DEVICE)
    for s0, n in zip(*args, strict=True):
        covered[s0 : s0 + n] = True
    assert torch.equal(y[~covered], y0[~covered]), "rows without an adapter must be untouched"
    assert torch.equal(y[:, :y_off], y0[:, :y_off]) and torch.equal(
        y[:, y_off + out_features :], y0[:, y_off + out_features :]
    )
    assert not h[~covered].any(), "rows without an adapter must shrink to zero"


# Per-adapter (rq, rk, rv) of a fused q/k/v group; rk == 0: the adapter does not target k_proj.
QKV_BATCHES = {
    "qkv_mixed": [(5, (8, 8, 8)), (2, None), (1, (16, 1, 16)), (12, (1, 1, 1)), (1, (64, 16, 8))],
    "qkv_missing_k": [(4, (16, 0, 16)), (1, (8, 8, 8)), (3, None)],
    "qkv_32_adapters": [(1 + (i % 5 == 0) * 3, (RANKS[i % 4], RANKS[(i + 1) % 4], 1)) for i in range(32)],
}


@pytest.mark.parametrize("batch", QKV_BATCHES.values(), ids=QKV_BATCHES.keys())
def test_fused_qkv(batch):
    """One shrink of rank rq + rk + rv, three expands at h0 = 0, rq, rq + rk into one y."""
    in_features, widths = 48, [48, 16, 16]
    T, pool, segs = build_pool(batch, in_features, list, widths, seed=len(batch))
    max_rank = max(segs.rank)
    x = torch.randn(T, in_features, device=DEVICE)
    args = (segs.seg_start, segs.seg_len)

    h = lora_shrink_triton(x, pool, *args, segs.a_off, segs.rank, max_rank)
    h_torch = lora_shrink(x, pool, *args, segs.a_off, segs.rank, max_rank)
    h_naive, deltas = naive_lora(x, pool, segs, widths, max_rank)
    torch.testing.assert_close(h, h_torch, **TOLERANCE[torch.float32])
    torch.testing.assert_close(h.cpu(), h_naive, **TOLERANCE[torch.float32])

    y0 = torch.randn(T, sum(widths), device=DEVICE)
    y, y_torch, y_naive = y0.clone(), y0.clone(), y0.clone().cpu()
    h_off, y_off = [0] * len(segs.rank), 0
    for m, out in enumerate(widths):
        rank_m = [rs[m] for rs in segs.module_rank]
        lora_expand_triton(y, h, pool, *args, segs.b_off[m], h_off, rank_m, y_off, out)
        lora_expand(y_torch, h_torch, pool, *args, segs.b_off[m], h_off, rank_m, y_off, out)
        y_naive[:, y_off : y_off + out] += deltas[m]
        h_off = [h0 + r for h0, r in zip(h_off, rank_m, strict=True)]
        y_off += out
    torch.testing.assert_close(y, y_torch, **TOLERANCE[torch.float32])
    torch.testing.assert_close(y.cpu(), y_naive, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch", ["mixed_ranks", "no_adapter_rows"])
@pytest.mark.parametrize("give_max_len", [False, True], ids=["computed_len", "given_len"])
def test_segment_arrays_as_device_tensors(batch, index_dtype, give_max_len):
    in_features, out_features = 48, 16
    T, pool, segs = build_pool(BATCHES[batch], in_features, lambda r: [r], [out_features], seed=7)
    max_rank = max(segs.rank)
    x = torch.randn(T, in_features, device=DEVICE)
    as_t = lambda v: torch.tensor(v, dtype=index_dtype, device=DEVICE)
    kw = dict(max_seg_len=max(segs.seg_len)) if give_max_len else {}
    t_args = (as_t(segs.seg_start), as_t(segs.seg_len))
    l_args = (segs.seg_start, segs.seg_len)

    h = lora_shrink_triton(x, pool, *t_args, as_t(segs.a_off), as_t(segs.rank), max_rank, **kw)
    h_torch = lora_shrink(x, pool, *l_args, segs.a_off, segs.rank, max_rank)
    torch.testing.assert_close(h, h_torch, **TOLERANCE[torch.float32])

    y0 = torch.randn(T, out_features, device=DEVICE)
    h_off = [0] * len(segs.rank)
    y = lora_expand_triton(
        y0.clone(), h, pool, *t_args, as_t(segs.b_off[0]), as_t(h_off), as_t(segs.rank), 0, out_features, **kw
    )
    y_torch = lora_expand(
        y0.clone(), h_torch, pool, *l_args, segs.b_off[0], h_off, segs.rank, 0, out_features
    )
    torch.testing.assert_close(y, y_torch, **TOLERANCE[torch.float32])


def test_expand_reads_only_its_own_h_columns():
    """h columns outside [h0, h0 + r) and rows outside every segment hold NaN and must not leak."""
    in_features, out_features = 48, 16
    T, pool, segs = build_pool(BATCHES["no_adapter_rows"], in_features, lambda r: [r], [out_features], seed=3)
    h_width = 80
    h = torch.full((T, h_width), float("nan"), device=DEVICE)
    h_off = [5 + 3 * s for s in range(len(segs.rank))]
    for s0, n, h0, r in zip(segs.seg_start, segs.seg_len, h_off, segs.rank, strict=True):
        h[s0 : s0 + n, h0 : h0 + r] = torch.randn(n, r, device=DEVICE)
    y0 = torch.randn(T, out_features, device=DEVICE)
    args = (segs.seg_start, segs.seg_len, segs.b_off[0], h_off, segs.rank, 0, out_features)
    y = lora_expand_triton(y0.clone(), h, pool, *args)
    y_torch = lora_expand(y0.clone(), h, pool, *args)
    torch.testing.assert_close(y, y_torch, **TOLERANCE[torch.float32])


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 arithmetic needs a GPU (not in the interpreter)")
@pytest.mark.parametrize("batch", ["mixed_ranks", "32_mixed"])
def test_bf16_on_gpu(batch):
    in_features, out_features = 128, 48
    T, pool, segs = build_pool(BATCHES[batch], in_features, lambda r: [r], [out_features], seed=11)
    pool = pool.bfloat16()
    max_rank = max(segs.rank)
    x = torch.randn(T, in_features, device=DEVICE).bfloat16()
    args = (segs.seg_start, segs.seg_len)
    h = lora_shrink_triton(x, pool, *args, segs.a_off, segs.rank, max_rank)
    h_torch = lora_shrink(x, pool, *args, segs.a_off, segs.rank, max_rank)
    torch.testing.assert_close(h, h_torch, **TOLERANCE[torch.bfloat16])
    y0 = torch.randn(T, out_features, device=DEVICE).bfloat16()
    h_off = [0] * len(segs.rank)
    rest = (segs.b_off[0], h_off, segs.rank, 0, out_features)
    y = lora_expand_triton(y0.clone(), h_torch, pool, *args, *rest)
    y_torch = lora_expand(y0.clone(), h_torch, pool, *args, *rest)
    torch.testing.assert_close(y, y_torch, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("batch", [BATCHES["mixed_ranks"], BATCHES["no_adapter_rows"]], ids=["mixed", "gaps"])
def test_expand_factor_scales_each_segment(batch):
    """factor[s] multiplies segment s's update (a nested rank's scale(K) / scale(r)), nothing else."""
    in_features, out_features = SHAPES["q_48x48"]
    T, pool, segs = build_pool(batch, in_features, lambda r: [r], [out_features], seed=11)
    args = (segs.seg_start, segs.seg_len)
    h = torch.randn(T, max(segs.rank), device=DEVICE)
    h_off = [0] * len(segs.rank)
    factor = torch.tensor([0.5 + s for s in range(len(segs.rank))], dtype=torch.float32, device=DEVICE)
    y0 = torch.randn(T, out_features, device=DEVICE)
    y = lora_expand_triton(y0.clone(), h, pool, *args, segs.b_off[0], h_off, segs.rank, 0, out_features,
                           factor=factor)
    expected = y0.clone()
    for s, (s0, n) in enumerate(zip(*args, strict=True)):
        r = segs.rank[s]
        bt = pool[segs.b_off[0][s] : segs.b_off[0][s] + r * out_features].view(r, out_features)
        expected[s0 : s0 + n] += factor[s] * h[s0 : s0 + n, :r] @ bt
    torch.testing.assert_close(y, expected, **TOLERANCE[torch.float32])

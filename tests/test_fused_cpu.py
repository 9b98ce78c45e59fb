"""The fused C++ layer steps (model/ops.py CpuOps) against the torch reference (TorchOps).

Both round at the same points, so in bfloat16 the results must be identical, bit for bit; in
float32 they may differ in the last bits (fused multiply-adds, reduction order)."""

from __future__ import annotations

import pytest
import torch

from slserve.config import ModelConfig
from slserve.kernels.cpu_ext import cpu_ops
from slserve.memory.kv_cache import KVCache, kv_page_elems
from slserve.memory.pool import allocate_storage
from slserve.model.layers import (
    LM_HEAD_MAX_BATCH,
    LM_HEAD_ROWS,
    SMALL_ROWS,
    RMSNorm,
    Rotary,
    dense,
    vocab_head,
)
from slserve.model.ops import CpuOps, TorchOps

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def cpu():
    ops = cpu_ops()
    assert ops is not None, "the C++ helpers must build on this machine"
    return CpuOps(ops)


def _check(got, want, dtype):
    if dtype == torch.bfloat16:
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    else:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,width", [(1, 576), (7, 100), (64, 576), (300, 64)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_norm(cpu, dtype, tokens, width, with_delta):
    g = torch.Generator().manual_seed(tokens * width)
    x = (torch.randn(tokens, width, generator=g) * 3).to(dtype)
    delta = (torch.randn(tokens, width, generator=g) * 3).to(dtype) if with_delta else None
    norm = RMSNorm((torch.randn(width, generator=g) * 0.5 + 1).to(dtype), 1e-5)
    want_x, want_h = TorchOps().add_norm(x.clone(), delta, norm)
    got_x, got_h = cpu.add_norm(x.clone(), delta, norm)
    _check(got_x, want_x, dtype)
    _check(got_h, want_h, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads", [(1, 9, 3), (5, 4, 4), (40, 8, 1)])
def test_rotary_and_cache_write(cpu, dtype, tokens, heads, kv_heads):
    D, P = 64, 4
    cfg = ModelConfig(vocab_size=10, hidden_size=heads * D, intermediate_size=8, num_layers=3,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=D, rms_norm_eps=1e-5,
                      rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096,
                      tie_word_embeddings=True, qkv_bias=False, eos_token_ids=(0,), bos_token_id=None)
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * D, generator=g).to(dtype)
    positions = torch.randint(0, 4000, (tokens,), generator=g)
    cos, sin = Rotary(D, 4096, 10000.0, None, "cpu").tables(positions, dtype)
    pages = torch.randperm(16, generator=g)[: (tokens + P - 1) // P]
    slot_pages = pages.repeat_interleave(P)[:tokens]
    slot_offsets = torch.arange(tokens) % P
    results = []
    for ops in (TorchOps(), cpu):
        data = allocate_storage(16, kv_page_elems(cfg, P), dtype, "cpu")
        kv = KVCache(data, cfg, P)
        index = kv.write_index(slot_pages, slot_offsets)
        q = ops.rotary_kv(qkv.clone(), cos, sin, (heads, kv_heads, D), kv, 1, index)
        results.append((q.clone(), data.clone()))
    (q_want, pool_want), (q_got, pool_got) = results
    _check(q_got, q_want, dtype)
    _check(pool_got, pool_want, dtype)
    assert pool_want.abs().sum() > 0  # the writes landed somewhere


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 1536), (9, 40), (64, 1536)])
def test_silu_mul(cpu, dtype, tokens, inter):
    g = torch.Generator().manual_seed(inter)
    gu = (torch.randn(tokens, 2 * inter, generator=g) * 4).to(dtype)
    gu[0, :4] = torch.tensor([0.0, -0.0, 30.0, -90.0])  # zero, saturation and underflow of e^-x
    want = TorchOps().silu_mul(gu)
    got = cpu.silu_mul(gu)
    if dtype == torch.bfloat16:
        # SiLU's exponential differs from torch's by ~1e-7 relative, which can move a float32 value
        # across a bfloat16 rounding boundary: SiLU one unit in the last place off, rarely, and the
        # product by up to two units.
        diff = (got.float() - want.float()).abs()
        assert (diff <= want.float().abs() * 2**-6 + 1e-30).all()
        assert (diff > 0).float().mean() < 0.01
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 7, LM_HEAD_MAX_BATCH, LM_HEAD_MAX_BATCH + 1])
def test_vocab_head_equals_one_matmul(rows):
    # A vocabulary that is not a multiple of the block: the last block is partial.
    vocab = 2 * LM_HEAD_ROWS + 123
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(vocab, 96, generator=g)
    h = torch.randn(rows, 96, generator=g)
    ref = (h.double() @ w.double().T).float()  # an independent reference: float64 accumulation
    out = vocab_head(w)(h)
    assert out.shape == (rows, vocab) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5, SMALL_ROWS, SMALL_ROWS + 1])
def test_float32_dense_equals_a_float64_reference(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 96, generator=g)
    bias = torch.randn(300, generator=g) if with_bias else None
    x = torch.randn(rows, 96, generator=g)
    ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
    out = dense(w, bias)(x)
    assert out.shape == (rows, 300) and out.is_contiguous()
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-4)


def _rows_with_special_values(n: int) -> torch.Tensor:
    """Rows whose argmax depends on ties, NaN, infinities and signed zeros, placed in and after
    the vectorised part of the loop."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(10, n, generator=g)
    last = n - 1
    x[0, last] = x[0, 0] = x[0].max() + 1  # a tie: the first wins
    x[1, n // 2] = float("nan")
    x[1, last] = float("nan")  # two NaN: the first wins over everything
    x[2] = float("-inf")  # all -inf: index 0
    x[3] = 0.0
    x[3, 0] = -0.0  # -0.0 == 0.0: index 0
    x[4, last] = float("inf")
    x[5, 1 % n] = float("inf")
    x[5, last] = float("inf")
    x[6, last] = float("nan")  # NaN in the scalar tail only
    x[7, last] = x[7].max() + 1  # the maximum in the last element
    x[8] = 1.0  # a constant row
    x[9] = float("nan")
    return x


@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 100, 4099])
def test_row_argmax_equals_torch(n):
    op = cpu_ops().row_argmax
    x = _rows_with_special_values(n)
    assert torch.equal(op(x), x.argmax(dim=-1))
    wide = torch.randn(5, n + 13)
    view = wide[:, 5 : 5 + n]  # rows further apart than their length
    assert torch.equal(op(view), view.argmax(dim=-1))
    logits = torch.randn(128, 49152, generator=torch.Generator().manual_seed(n))
    assert torch.equal(op(logits), logits.argmax(dim=-1))
    # bfloat16 rows (the model's logits as they are): rounding makes ties common, the first wins
    for rows in (x, view, logits):
        half = rows.bfloat16()
        assert torch.equal(op(half), half.float().argmax(dim=-1))


def test_sampler_uses_row_argmax_for_greedy_rows():
    from slserve.request import Request
    from slserve.sampling import Sampler
    from slserve.sampling_params import SamplingParams

    calls = []
    op = cpu_ops().row_argmax

    def counted(x):
        calls.append(x.shape)
        return op(x)

    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(3))
    reqs = [Request(f"r{i}", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4)) for i in range(6)]
    tokens, _ = Sampler(row_argmax=counted)(logits, reqs)
    assert calls == [(6, 1000)]
    assert tokens == logits.argmax(dim=-1).tolist() == Sampler()(logits, reqs)[0]


def test_sampler_widens_bfloat16_logits_only_when_it_needs_more_than_argmax():
    from slserve.request import Request
    from slserve.sampling import Sampler
    from slserve.sampling_params import SamplingParams

    dtypes = []
    op = cpu_ops().row_argmax

    def counted(x):
        dtypes.append(x.dtype)
        return op(x)

    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(4)).bfloat16()
    greedy = [Request(f"g{i}", [1, 2], SamplingParams(temperature=0, max_tokens=4)) for i in range(4)]
    tokens, _ = Sampler(row_argmax=counted)(logits, greedy)
    assert dtypes == [torch.bfloat16] and tokens == logits.float().argmax(dim=-1).tolist()
    wants_logprobs = Request("lp", [1, 2], SamplingParams(temperature=0, max_tokens=4, logprobs=2))
    with_logprobs = [*greedy[:3], wants_logprobs]
    tokens, logprobs = Sampler(row_argmax=counted)(logits, with_logprobs)
    assert dtypes[1:] == [torch.float32] and tokens == logits.float().argmax(dim=-1).tolist()
    expected = torch.log_softmax(logits[3].float(), dim=-1)[tokens[3]].item()
    assert logprobs[3].logprob == pytest.approx(expected)

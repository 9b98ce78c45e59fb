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

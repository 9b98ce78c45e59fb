"""float32 CPU matmuls through OpenBLAS (kernels/csrc/blas_cpu.cpp, SLSERVE_CPU_BLAS): the op
against a float64 product, the linear layers and the lm_head on every row-count path, the
choice of BLAS, and greedy decoding with each BLAS against transformers."""

from __future__ import annotations

import pytest
import torch

from slserve import LLM, SamplingParams
from slserve.config import cpu_blas
from slserve.kernels import cpu_ext
from slserve.model import layers

ops = cpu_ext.cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="C++ CPU helpers not built here")


@pytest.fixture(scope="module")
def gemm():
    """The OpenBLAS op, loaded whatever this CPU's vendor (auto may not choose it here)."""
    op = cpu_ext.openblas_linear_op()
    assert op is not None, "scipy-openblas32 is a dependency: it must load here"
    return op


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().t()).float()


@pytest.mark.parametrize("rows", [1, 7, 8, 33, 128, 257])
@pytest.mark.parametrize(("n", "k"), [(1, 5), (15, 33), (16, 64), (17, 576), (576, 576), (960, 576),
                                      (3072, 576), (576, 1536), (4099, 576)])
def test_op_matches_float64_product(gemm, rows, n, k):
    g = torch.Generator().manual_seed(rows * 10007 + n * 31 + k)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g)
    out = torch.full((rows, n), float("nan"))
    gemm(out, x, w)
    torch.testing.assert_close(out, reference(x, w), rtol=1e-5, atol=1e-4 * k**0.5)


def test_op_reads_strided_rows(gemm):
    """x as a view of the first k columns of a wider buffer (lda > k), as a fused q|k|v slice is."""
    wide = torch.randn(40, 700)
    x = wide[:, 100:676]
    w = torch.randn(300, 576)
    out = torch.empty(40, 300)
    gemm(out, x, w)
    torch.testing.assert_close(out, reference(x, w), rtol=1e-5, atol=3e-3)


def test_op_refuses_what_it_cannot_compute(gemm):
    x, w = torch.randn(8, 16), torch.randn(32, 16)
    with pytest.raises(RuntimeError, match="float32 only"):
        gemm(torch.empty(8, 32, dtype=torch.float64), x.double(), w.double())
    with pytest.raises(RuntimeError, match="shapes"):
        gemm(torch.empty(8, 31), x, w)
    with pytest.raises(RuntimeError, match="unit column stride"):
        gemm(torch.empty(8, 32), x, w.t().contiguous().t())


@pytest.mark.parametrize("bias", [False, True])
def test_linear_and_head_match_on_every_row_path(gemm, monkeypatch, bias):
    """1 row (torch's gemv), 2..BLAS_MIN_ROWS-1 (W @ x^T, blocked head), BLAS_MIN_ROWS and more
    (OpenBLAS): all equal the float64 product."""
    monkeypatch.setattr(cpu_ext, "float32_gemm", lambda: gemm)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(960, 576, generator=g)
    b = torch.randn(960, generator=g) if bias else None
    head_w = torch.randn(9000, 576, generator=g)
    linear, head = layers.dense(w, b), layers.vocab_head(head_w)
    for rows in (1, 2, layers.BLAS_MIN_ROWS - 1, layers.BLAS_MIN_ROWS, 65, 200):
        x = torch.randn(rows, 576, generator=g)
        want = reference(x, w) + (0 if b is None else b)
        torch.testing.assert_close(linear(x), want, rtol=1e-5, atol=3e-3)
        torch.testing.assert_close(head(x), reference(x, head_w), rtol=1e-5, atol=3e-3)


def test_choice_of_blas(monkeypatch):
    monkeypatch.delenv("SLSERVE_CPU_BLAS", raising=False)
    monkeypatch.setattr("slserve.config.cpu_vendor", lambda: "AuthenticAMD")
    assert cpu_blas() == "openblas"
    for vendor in ("GenuineIntel", ""):
        monkeypatch.setattr("slserve.config.cpu_vendor", lambda v=vendor: v)
        assert cpu_blas() == "torch"
    for choice in ("torch", "openblas"):
        monkeypatch.setenv("SLSERVE_CPU_BLAS", choice.upper())
        assert cpu_blas() == choice
    monkeypatch.setenv("SLSERVE_CPU_BLAS", "mkl")
    with pytest.raises(ValueError, match="expected one of auto, openblas, torch"):
        cpu_blas()


@pytest.fixture
def blas_choice(monkeypatch):
    """Set SLSERVE_CPU_BLAS for an engine built inside the test, then forget the cached choice."""

    def choose(choice: str):
        monkeypatch.setenv("SLSERVE_CPU_BLAS", choice)
        cpu_ext.float32_gemm.cache_clear()
        return cpu_ext.float32_gemm()

    yield choose
    monkeypatch.undo()
    cpu_ext.float32_gemm.cache_clear()


@pytest.fixture(scope="module")
def greedy_reference():
    """Eight prompts and transformers' own greedy continuations of them, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slserve.model.loader import resolve_model

    path = str(resolve_model(None))
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer.encode("The printing press changed how books were made and read across Europe. " * 10)
    prompts = [ids[: 3 + 23 * i] for i in range(8)]
    expected = []
    with torch.no_grad():
        for p in prompts:
            gen = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=16, do_sample=False)
            expected.append(gen[0, len(p):].tolist())
    return prompts, expected


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["torch", "openblas"])
def test_greedy_decoding_with_each_blas_matches_transformers(blas_choice, greedy_reference, choice, tmp_path):
    """The eight prompts decoded together (decode steps of 8 rows, prefill chunks of hundreds)
    by the real model with each BLAS."""
    assert (blas_choice(choice) is None) == (choice == "torch")
    prompts, expected = greedy_reference
    llm = LLM(dtype="float32", pool_bytes=128 << 20, adapter_dir=str(tmp_path))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    assert [o.token_ids for o in outs] == expected

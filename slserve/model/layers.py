"""Building blocks of the decoder: the one linear abstraction with its LoRA hook, RMSNorm, RoPE."""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from slserve.config import cpu_has_native_bf16
from slserve.model.quant import QuantizedWeight, quantized_matmul


class LoRAHook(Protocol):
    """What a step's batched-LoRA state offers to the linear layers (see slserve/lora_batch.py)."""

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None: ...


def dense(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x -> x @ W^T (+ b). On CPUs in bfloat16 the weight is packed once into oneDNN's blocked
    layout: an unpacked bfloat16 matmul re-lays the weight out on every call, which at decode
    batch sizes costs as much as the arithmetic. oneDNN packs bfloat16 only on CPUs with AVX512
    (BW/VL/DQ) or AVX-NE-CONVERT; elsewhere the plain matmul is the one that works."""
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and cpu_has_native_bf16():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        return _float32_cpu_dense(weight, bias)
    return lambda x: F.linear(x, weight, bias)


SMALL_ROWS = 16  # up to this many rows a float32 CPU matmul runs as W @ x^T (without OpenBLAS)
BLAS_MIN_ROWS = 8  # from this many rows float32 CPU matmuls go to OpenBLAS where it was chosen


def _float32_cpu_dense(weight: torch.Tensor, bias: torch.Tensor | None):
    """x @ W^T in float32 on a CPU. Where config.cpu_blas chose OpenBLAS, BLAS_MIN_ROWS rows and
    more run through it (kernels/csrc/blas_cpu.cpp; benchmarks/blas.py). Below that, and with
    torch's BLAS for up to SMALL_ROWS rows, the product is computed as W @ x^T: for 2-16 rows
    BLAS's x @ W^T took 1.3-2.8x as long (and as long as for 1 row); benchmarks/lm_head.py,
    "projections"."""
    gemm = _blas_gemm(weight)
    small = BLAS_MIN_ROWS - 1 if gemm is not None else SMALL_ROWS

    def matmul(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if gemm is not None and rows >= BLAS_MIN_ROWS and x.dim() == 2 and x.stride(1) == 1:
            y = x.new_empty(rows, weight.shape[0])
            gemm(y, x, weight)
        elif 2 <= rows <= small:
            y = torch.mm(weight, x.t()).t().contiguous()
        else:
            return F.linear(x, weight, bias)
        return y if bias is None else y.add_(bias)

    return matmul


def _blas_gemm(weight: torch.Tensor):
    """The OpenBLAS gemm for this float32 CPU weight, or None for torch's matmul."""
    from slserve.kernels.cpu_ext import float32_gemm

    return float32_gemm() if weight.is_contiguous() else None


LM_HEAD_ROWS = 4096  # vocabulary rows per matmul of the float32 CPU lm_head
LM_HEAD_MAX_BATCH = 64  # above this, no gain in benchmarks/lm_head.py


def vocab_head(weight: torch.Tensor):
    """h -> h @ W^T for the lm_head, W [vocab, hidden]. On CPUs in float32 one matmul over all
    of a 49k-row vocabulary runs at half the rate torch's BLAS reaches on the decoder's
    projections (and at a third of it for 2-8 rows): its [T, vocab] output leaves the cache while
    the weight streams. Blocks of LM_HEAD_ROWS rows, each W_block @ h^T into its own rows of a
    [vocab, T] buffer, keep every block's output in cache (benchmarks/RESULTS.md, "Small-batch
    float32 matmuls"). One row is a matrix-vector product bound by the weight's bytes either way,
    and stays one call, as do more than LM_HEAD_MAX_BATCH rows, where the measured gain was
    within the machine's noise. Where OpenBLAS was chosen it takes BLAS_MIN_ROWS rows and more:
    its threads each own a slice of the vocabulary, and it ran the head 1.3-2x as fast as either
    torch variant from 8 rows up (benchmarks/blas.py)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return dense(weight)
    gemm = _blas_gemm(weight)
    most = BLAS_MIN_ROWS - 1 if gemm is not None else LM_HEAD_MAX_BATCH

    def head(h: torch.Tensor) -> torch.Tensor:
        rows = h.shape[0]
        if gemm is not None and rows >= BLAS_MIN_ROWS and h.stride(1) == 1:
            out = h.new_empty(rows, weight.shape[0])
            gemm(out, h, weight)
            return out
        if not 2 <= rows <= most:
            return F.linear(h, weight)
        out = h.new_empty(weight.shape[0], rows)
        ht = h.t()
        for r0 in range(0, weight.shape[0], LM_HEAD_ROWS):
            torch.mm(weight[r0 : r0 + LM_HEAD_ROWS], ht, out=out[r0 : r0 + LM_HEAD_ROWS])
        return out.t().contiguous()

    return head


class Linear(nn.Module):
    """y = x @ W^T (+ b), plus the step's batched LoRA term for this (layer, group).

    Every target projection goes through here; fused projections (q|k|v, gate|up) are one
    Linear whose LoRA group knows how its output columns split into modules. A row-parallel
    projection under tensor parallelism has a `reduce` (the all-reduce that sums the ranks'
    partial outputs), applied after the LoRA term so that one collective carries both.
    """

    def __init__(self, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None, layer: int,
                 group: str, reduce=None):
        super().__init__()
        self.reduce = reduce
        if isinstance(weight, torch.Tensor):
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.quantized = None
        else:  # --quantization (model/quant.py): moved to the device by finalize
            self.weight = None
            self.quantized = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.layer = layer
        self.group = group
        self._matmul = None

    def finalize(self, device: torch.device | str = "cpu", cpu_ops=None) -> None:
        """Called once the weights sit on their device: choose the matmul implementation. The
        closure keeps what it needs (a packed copy, or the tensors themselves), so the module
        drops its own references rather than hold the weights twice. `cpu_ops`: the C++
        helpers when built (the int8 loop)."""
        bias = None if self.bias is None else self.bias.data
        if self.quantized is not None:
            self._matmul = quantized_matmul(self.quantized.to(device), bias, cpu_ops)
        else:
            self._matmul = dense(self.weight.data, bias)
        self.weight = None
        self.quantized = None
        self.bias = None

    def forward(self, x: torch.Tensor, lora: LoRAHook | None) -> torch.Tensor:
        y = self._matmul(x)
        if lora is not None:
            lora.apply(y, x, self.layer, self.group)
        if self.reduce is not None:
            self.reduce(y)
        return y


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference implementation does, whatever the model dtype.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, with the llama3 and linear scalings that Llama-family configs use."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()
    raise ValueError(f"unsupported rope scaling {kind!r}")


class Rotary:
    """cos/sin tables for every position, computed once; a step indexes them by position."""

    def __init__(self, head_dim: int, max_pos: int, theta: float, scaling: dict | None, device):
        inv = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_pos, D]
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each token's position: [T, D] each."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; the rotate-half convention of Hugging Face Llama checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

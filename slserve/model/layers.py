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
    return lambda x: F.linear(x, weight, bias)


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

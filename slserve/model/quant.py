"""Weight-only quantization of the base model's linear layers (opt-in: `--quantization`).

Decode reads every base weight once per step for a handful of tokens, so a step costs weight
bytes; int8 weights are a quarter of float32's and half of bfloat16's. Only the seven projections
of each decoder layer (q, k, v, o, gate, up, down) are quantized; the embedding, lm_head and norms
keep the serving dtype. Activations stay in the serving dtype, and LoRA runs on them unchanged:
the base output y = x W^T comes from the quantized matmul and the step's LoRA term adds to it.

int8: symmetric, one float32 scale per output channel (row of W [out, in]):

    scale[n] = max_k |W[n, k]| / 127            (1 for an all-zero row)
    q[n, k]  = clamp(round_half_even(W[n, k] / scale[n]), -127, 127)
    W'[n, k] = q[n, k] * scale[n]               (the dequantized weight every path multiplies by)

Weights are quantized from the checkpoint's float32 values as they are read (loader.py), each
rank's slice after tensor-parallel slicing. A row-parallel slice (o, down: split by input
columns) takes its scales from the whole row, so the dequantized model is the same for any
number of ranks.

The matmul, by what the device offers:
- CPU, float32 activations: the C++ loop `slserve::int8_linear` (kernels/csrc/quant_cpu.cpp),
  up to LOOP_ROWS rows; ATen's `_weight_int8pack_mm` is vectorised only for 16-bit activations.
- CPU, bfloat16 / float16 activations: ATen's `_weight_int8pack_mm`.
- Longer prefill chunks (compute-bound), any device without either kernel, or a CPU without the
  C++ helpers: dequantize, then the library matmul.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Rows up to which the C++ loop beats a float32 library matmul on an AVX2 CPU (measured in
# benchmarks/quant_quality.py); past it the step is compute-bound and the library's blocking wins.
LOOP_ROWS = 64

# The projections whose weights are quantized, by the name of their checkpoint module.
QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_quantized_key(key: str) -> bool:
    """Whether a checkpoint tensor is one of the quantized projection weights."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZED_MODULES


def int8_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale of W [out, in]: max |W| / 127 per row (1 for a zero row)."""
    amax = w.float().abs().amax(dim=1)
    return torch.where(amax > 0, amax / 127, torch.ones_like(amax))


@dataclass(frozen=True)
class Int8Weight:
    """W [out, in] as int8 codes and one float32 scale per output channel."""

    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] float32

    @classmethod
    def quantize(cls, w: torch.Tensor, scale: torch.Tensor | None = None) -> Int8Weight:
        """`scale` [out]: the scales of the whole rows when `w` is a slice of their columns."""
        w = w.float()
        scale = int8_scale(w) if scale is None else scale.float()
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.contiguous())

    @classmethod
    def cat(cls, parts: list[Int8Weight]) -> Int8Weight:
        """Stacked output channels (q|k|v, gate|up): codes and scales concatenate row by row."""
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))

    def to(self, device) -> Int8Weight:
        return Int8Weight(self.q.to(device), self.scale.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W' [out, in] = q * scale, computed in float32 and then cast."""
        return (self.q.float() * self.scale[:, None]).to(dtype)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


QuantizedWeight = Int8Weight
QUANTIZED_TYPES: dict[str, type[QuantizedWeight]] = {"int8": Int8Weight}


def quantize(mode: str, w: torch.Tensor, row_scale_source: torch.Tensor | None = None) -> QuantizedWeight:
    """W [out, in] quantized by `mode`. `row_scale_source`: the whole rows when `w` holds only
    some of their columns (a row-parallel slice), so that the scales are those of the whole rows."""
    kind = QUANTIZED_TYPES[mode]
    scale = None if row_scale_source is None else int8_scale(row_scale_source)
    return kind.quantize(w, scale)


def cat_weights(parts: list) -> torch.Tensor | QuantizedWeight:
    """Stack the output channels of several projections, plain or quantized alike."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0]).cat(parts)


def _has_kernel(op_name: str, device: torch.device) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op_name}", key)


def int8_matmul(w: Int8Weight, bias: torch.Tensor | None, cpu_ops=None
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [T, in] -> x W'^T (+ bias) [T, out] in x's dtype. `cpu_ops`: torch.ops.slserve with the
    C++ helpers built (None where they are not)."""
    device = w.q.device
    loop = cpu_ops.int8_linear if cpu_ops is not None and device.type == "cpu" else None
    aten = _has_kernel("_weight_int8pack_mm", device)
    scales = {dtype: w.scale.to(dtype) for dtype in (torch.bfloat16, torch.float16)}

    def matmul(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if loop is not None and x.dtype == torch.float32 and rows <= LOOP_ROWS:
            y = x.new_empty(rows, w.q.shape[0])
            loop(y, x.contiguous(), w.q, w.scale)
        elif aten and x.dtype in scales and rows <= LOOP_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), w.q, scales[x.dtype])
        else:
            y = F.linear(x, w.dequantize(x.dtype))
        return y if bias is None else y.add_(bias)

    return matmul


MATMULS: dict[type, Callable] = {Int8Weight: int8_matmul}


def quantized_matmul(w: QuantizedWeight, bias: torch.Tensor | None, cpu_ops=None) -> Callable:
    return MATMULS[type(w)](w, bias, cpu_ops)

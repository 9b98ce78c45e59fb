"""Quantization of the base model's linear layers (opt-in: `--quantization`).

Decode reads every base weight once per step for a handful of tokens, so a small step costs
weight bytes; int8 weights are a quarter of float32's and half of bfloat16's. A large step
(hundreds of decode rows, prefill chunks) costs arithmetic instead, which weight-only modes do
not reduce; w8a8 does, with int8 x int8 dot products (VNNI on x86: twice bfloat16's rate).
Only the seven projections of each decoder layer (q, k, v, o, gate, up, down) are quantized (w8a8:
all but down, see W8A8_MODULES, and the lm_head as well); the embedding and norms keep the
serving dtype (a tied embedding keeps its rows for the lookup beside the head's int8 copy). LoRA
runs on the unquantized activations: the base output y = x W^T comes from the quantized matmul
and the step's LoRA term adds to it. The lm_head is a sixth of a 256-row decode step's
arithmetic; quantized, it did not measurably move the perplexity of the fixed text
(benchmarks/RESULTS.md, "w8a8 quantizes the lm_head").

int8: symmetric, one float32 scale per output channel (row of W [out, in]):

    scale[n] = max_k |W[n, k]| / 127            (1 for an all-zero row)
    q[n, k]  = clamp(round_half_even(W[n, k] / scale[n]), -127, 127)
    W'[n, k] = q[n, k] * scale[n]               (the dequantized weight every path multiplies by)

w8a8: the weights as int8 above, and each row of activations quantized as it arrives,
symmetric, one float32 scale per row (token):

    amax[m]  = max_k |x[m, k]|,  sx[m] = amax[m] / 127   (1 for an all-zero row)
    xq[m, k] = clamp(round_half_even(x[m, k] * inv[m]), -127, 127),  inv[m] = 127 / amax[m]
    (sx and inv computed in float64 and rounded to float32; the products in float32)
    y[m, n]  = float(sum_k xq[m, k] * q[n, k]) * (sx[m] * scale[n])   (exact int32 sums)

This changes the model more than weight-only int8 (RESULTS.md has the perplexities), so it is
never the default. Under tensor parallelism a row-parallel rank (o) quantizes its own columns
of x, with its own row scales: results differ from one rank's by activation rounding.

q4: asymmetric 4-bit codes in groups of Q4_GROUP = 32 consecutive inputs of a row, a float32
scale and zero per group (the layout of GGUF's Q4_1 blocks):

    scale[n, g] = (max - min) / 15 over the group (1 for a constant group), zero[n, g] = min
    code[n, k]  = clamp(round_half_even((W[n, k] - zero) / scale), 0, 15), two codes a byte
    W'[n, k]    = code[n, k] * scale[n, g] + zero[n, g]

The embedded model's projections are Q4_1 blocks of 32 (dequantized into the cached
safetensors), so q4 finds the same blocks again: each block's minimum is its code-0 level and
its maximum its code-15 level, and the codes come back unchanged (scales to a float32 rounding).

Weights are quantized from the checkpoint's float32 values as they are read (loader.py), each
rank's slice after tensor-parallel slicing. An int8 row-parallel slice (o, down: split by input
columns) takes its scales from the whole row, and q4 groups never straddle two ranks' columns,
so the dequantized model is the same for any number of ranks.

The matmul, by what the device offers:
- CPU, float32 activations: the C++ loops `slserve::int8_linear` / `q4_linear`
  (kernels/csrc/quant_cpu.cpp), up to LOOP_ROWS rows; ATen's `_weight_int8pack_mm` is vectorised
  only for 16-bit activations, and its CPU int4 matmul is 25-50x slower than float32 on AVX2.
- CPU, bfloat16 / float16 activations: ATen's `_weight_int8pack_mm` (int8); q4 widens the rows
  to float32 for its C++ loop.
- Longer prefill chunks (compute-bound), any device without either kernel, or a CPU without the
  C++ helpers: dequantize, then the library matmul.
- w8a8, any number of rows: `torch._int_mm` (oneDNN's int8 GEMM on the CPU), between the C++
  helpers `slserve::quantize_rows` and `dequantize_rows`; their torch equivalents where the
  helpers are not built, and a float64 matmul of the codes (exact) where `_int_mm` is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Rows up to which the C++ loops take the matmul. At SmolLM2's shapes on an AVX2 CPU, weights
# read from memory, one thread, the int8 loop ran 2-3x faster than MKL's float32 matmul at 1-8
# rows and about even at 64; past that the step is compute-bound and the library's blocking wins.
LOOP_ROWS = 64

# The projections whose weights are quantized, by the name of their checkpoint module.
QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# w8a8 leaves down_proj in the serving dtype: its inputs (silu(gate) * up) carry the model's
# massive activations, a few values thousands of times a token's mean (up to 2824 against a
# mean of ~2 in SmolLM2 on benchmarks/quant_text.txt), which one scale per token cannot hold.
W8A8_MODULES = tuple(m for m in QUANTIZED_MODULES if m != "down_proj")


# The weights an output head can come from: its own, or the embedding it is tied to.
HEAD_KEYS = ("lm_head.weight", "model.embed_tokens.weight")


def quantizes_head(mode: str) -> bool:
    """Whether `mode` also quantizes the lm_head (w8a8; see the module docstring)."""
    return mode == "w8a8"


def head_copy_key(key: str) -> str:
    """Where load_state_dict puts the quantized copy of a head weight; the tensor itself stays in
    the serving dtype (a tied embedding still looks its rows up)."""
    return f"{key}.quantized"


def is_quantized_key(key: str, mode: str) -> bool:
    """Whether a checkpoint tensor is one of the projection weights `mode` quantizes."""
    parts = key.split(".")
    modules = W8A8_MODULES if mode == "w8a8" else QUANTIZED_MODULES
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in modules


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
    def quantize(cls, w: torch.Tensor, whole_rows: torch.Tensor | None = None) -> Int8Weight:
        """`whole_rows`: the rows `w` is a slice of the columns of, whose scales it takes."""
        w = w.float()
        scale = int8_scale(w if whole_rows is None else whole_rows)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.contiguous())

    @classmethod
    def cat(cls, parts: list[Int8Weight]) -> Int8Weight:
        """Stacked output channels (q|k|v, gate|up): codes and scales concatenate row by row."""
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))

    def to(self, device) -> Int8Weight:
        return type(self)(self.q.to(device), self.scale.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W' [out, in] = q * scale, computed in float32 and then cast."""
        return (self.q.float() * self.scale[:, None]).to(dtype)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


@dataclass(frozen=True)
class W8A8Weight(Int8Weight):
    """int8 weights exactly as Int8Weight; their matmul quantizes the activations too."""


Q4_GROUP = 32


@dataclass(frozen=True)
class Q4Weight:
    """W [out, in] as 4-bit codes (two a byte) with a scale and zero per group of Q4_GROUP inputs."""

    codes: torch.Tensor  # [out, in / 2] uint8: column 2j in the low nibble, 2j + 1 in the high one
    scale: torch.Tensor  # [out, in / Q4_GROUP] float32
    zero: torch.Tensor  # [out, in / Q4_GROUP] float32

    @classmethod
    def quantize(cls, w: torch.Tensor, whole_rows: torch.Tensor | None = None) -> Q4Weight:
        """Groups lie inside a slice, so `whole_rows` is not needed."""
        out, inp = w.shape
        if inp % Q4_GROUP:
            raise ValueError(f"q4 quantizes groups of {Q4_GROUP} inputs; this weight has {inp}")
        g = w.float().view(out, inp // Q4_GROUP, Q4_GROUP)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = (hi - lo) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(out, inp)
        return cls((q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scale.contiguous(), lo.contiguous())

    @classmethod
    def cat(cls, parts: list[Q4Weight]) -> Q4Weight:
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "zero")))

    def to(self, device) -> Q4Weight:
        return Q4Weight(self.codes.to(device), self.scale.to(device), self.zero.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W' [out, in] = code * scale + zero, computed in float32 and then cast."""
        out = self.codes.shape[0]
        q = torch.stack([self.codes & 15, self.codes >> 4], dim=-1).view(out, -1, Q4_GROUP).float()
        return (q * self.scale[..., None] + self.zero[..., None]).view(out, -1).to(dtype)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.codes.shape[0], self.codes.shape[1] * 2))


QuantizedWeight = Int8Weight | W8A8Weight | Q4Weight
QUANTIZED_TYPES: dict[str, type[QuantizedWeight]] = {"int8": Int8Weight, "w8a8": W8A8Weight, "q4": Q4Weight}


def quantize(mode: str, w: torch.Tensor, whole_rows: torch.Tensor | None = None) -> QuantizedWeight:
    """W [out, in] quantized by `mode`. `whole_rows`: the whole rows when `w` holds only some of
    their columns (a row-parallel slice), for a mode whose scales span a whole row."""
    return QUANTIZED_TYPES[mode].quantize(w, whole_rows)


def needs_whole_rows(mode: str) -> bool:
    """Whether a row-parallel slice of `mode` takes its scales from the whole rows (int8, w8a8)."""
    return issubclass(QUANTIZED_TYPES[mode], Int8Weight)


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


def q4_matmul(w: Q4Weight, bias: torch.Tensor | None, cpu_ops=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [T, in] -> x W'^T (+ bias) [T, out] in x's dtype (16-bit rows widened for the C++ loop)."""
    loop = cpu_ops.q4_linear if cpu_ops is not None and w.codes.device.type == "cpu" else None

    def matmul(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if loop is not None and rows <= LOOP_ROWS:
            y = x.new_empty(rows, w.codes.shape[0], dtype=torch.float32)
            loop(y, x.float().contiguous(), w.codes, w.scale, w.zero, Q4_GROUP)
            y = y.to(x.dtype)
        else:
            y = F.linear(x, w.dequantize(x.dtype))
        return y if bias is None else y.add_(bias)

    return matmul


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] int8, sx [M] float32), per row as the module docstring says."""
    x = x.float()
    amax = x.abs().amax(dim=1).double()  # the row constants in double, then rounded
    live = amax > 0
    inv = torch.where(live, 127 / amax, 0).float()
    xq = torch.round(x * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return xq, torch.where(live, amax / 127, 1).float()


def int8_codes_matmul(xq: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
    """xq [M, K] int8 @ qt [K, N] int8 -> int32 [M, N], exact."""
    try:
        return torch._int_mm(xq, qt)
    except RuntimeError:  # no kernel on this device, or shapes it refuses (CUDA: M <= 16, ...)
        return (xq.double() @ qt.double()).to(torch.int32)


# Output columns per int8 matmul in w8a8: a wider product (the lm_head's 49k vocabulary rows) runs
# as blocks of this many columns, each block's int32 result dequantized while it is in cache. At
# 256 rows x 576 x 49152 one oneDNN call ran at 400 GOPS (the bfloat16 matmul's rate), blocks of
# 8192 at ~600 with the quantizing and scaling (benchmarks/RESULTS.md, "w8a8 quantizes the lm_head").
W8A8_COLUMN_BLOCK = 8192


def w8a8_matmul(w: W8A8Weight, bias: torch.Tensor | None, cpu_ops=None, column_block: int = W8A8_COLUMN_BLOCK
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [T, in] -> y [T, out] (+ bias) in x's dtype, activations quantized per row; the int8
    products `column_block` output columns at a time."""
    helpers = cpu_ops if cpu_ops is not None and w.q.device.type == "cpu" else None
    qt = w.q.t()  # [in, out]: _int_mm takes the transposed view as it is

    def matmul(x: torch.Tensor) -> torch.Tensor:
        rows, out = x.shape[0], qt.shape[1]
        y = x.new_empty(rows, out)
        if helpers is not None:
            xq = torch.empty(x.shape, dtype=torch.int8)
            sx = torch.empty(rows, dtype=torch.float32)
            helpers.quantize_rows(xq, sx, x if x.stride(-1) == 1 else x.contiguous())
            for j in range(0, out, column_block):
                cols = slice(j, j + column_block)
                helpers.dequantize_rows(y[:, cols], int8_codes_matmul(xq, qt[:, cols]), sx, w.scale[cols])
        else:
            xq, sx = quantize_rows(x)
            for j in range(0, out, column_block):
                cols = slice(j, j + column_block)
                acc = int8_codes_matmul(xq, qt[:, cols])
                y[:, cols] = acc.float() * (sx[:, None] * w.scale[None, cols])
        return y if bias is None else y.add_(bias)

    return matmul


MATMULS: dict[type, Callable] = {Int8Weight: int8_matmul, W8A8Weight: w8a8_matmul, Q4Weight: q4_matmul}


def quantized_matmul(w: QuantizedWeight, bias: torch.Tensor | None, cpu_ops=None) -> Callable:
    return MATMULS[type(w)](w, bias, cpu_ops)

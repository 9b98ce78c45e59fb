"""The element-wise steps between a decoder layer's matmuls, in two implementations.

`TorchOps` runs anywhere and is the reference. `CpuOps` runs the same steps as single passes of
the C++ loops in kernels/csrc/fused_cpu.cpp (a few microseconds each at decode batch sizes,
where the torch chains cost tens); it rounds where TorchOps rounds, so in bfloat16 the norm and
RoPE results match bit for bit, and SiLU*up to a unit or two in the last place in rare elements
(its exponential differs from torch's by ~1e-7 relative).

    add_norm(x, delta, norm) -> (x, h)      x (+)= delta; h = RMSNorm(x)
    rotary_kv(qkv, cos, sin, ...) -> q      RoPE on q and k, k and v written to the cache
    silu_mul(gu) -> act                     SiLU(gate) * up for gu = [gate | up]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slserve.memory.kv_cache import KVCache
from slserve.model.layers import RMSNorm, apply_rotary


class TorchOps:
    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm):
        if delta is not None:
            x = x + delta
        return x, norm(x)

    def rotary_kv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: tuple[int, int, int],
                  kv: KVCache, layer: int, write_index: torch.Tensor) -> torch.Tensor:
        """qkv: [T, (H + 2 KVH) D]; cos, sin: [T, D]. Returns the rotated q: [T, H, D]."""
        H, KVH, D = heads
        T = qkv.shape[0]
        # q and k are adjacent columns: rotate both at once.
        qk = apply_rotary(qkv[:, : (H + KVH) * D].view(T, H + KVH, D), cos[:, None], sin[:, None])
        kv.write(layer, qk[:, H:], qkv[:, (H + KVH) * D :].view(T, KVH, D), write_index)
        return qk[:, :H]

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        n = gu.shape[1] // 2
        return F.silu(gu[:, :n]) * gu[:, n:]


class CpuOps(TorchOps):
    """The fused C++ loops; `ops` is torch.ops.slserve with kernels/csrc/fused_cpu.cpp built."""

    def __init__(self, ops):
        self.ops = ops

    def add_norm(self, x, delta, norm):
        h = torch.empty_like(x)
        self.ops.add_rms_norm(x, delta, h, norm.weight, norm.eps)  # x += delta in place
        return x, h

    def rotary_kv(self, qkv, cos, sin, heads, kv, layer, write_index):
        H, KVH, D = heads
        self.ops.rotary_write_kv(qkv, cos, sin, H, KVH, kv.rows, write_index[layer, 0], write_index[layer, 1])
        return qkv[:, : H * D].view(qkv.shape[0], H, D)

    def silu_mul(self, gu):
        out = gu.new_empty(gu.shape[0], gu.shape[1] // 2)
        self.ops.silu_mul(out, gu)
        return out

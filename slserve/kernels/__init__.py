"""Kernel backends by name: the torch path (CPU, and the reference) and the Triton path (GPU)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from slserve.kernels.attention import paged_attention


def _torch_attention(q, k_cache, v_cache, batch, scale, decode_op=None):
    return paged_attention(q, k_cache, v_cache, batch.attn_groups, scale, decode_op)


def _triton_attention(q, k_cache, v_cache, batch, scale):
    from slserve.kernels.triton_attention import paged_attention_triton

    return paged_attention_triton(
        q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start, scale
    )


ATTENTION_BACKENDS: dict[str, Callable] = {"torch": _torch_attention, "triton": _triton_attention}


def attention_backend(name: str, cpu_extension: bool) -> Callable:
    """The attention function for a resolved backend name; on CPUs with the C++ helpers built,
    decode groups use the in-place C++ loop."""
    if name == "torch" and cpu_extension:
        from slserve.kernels.cpu_ext import decode_attention_op

        op = decode_attention_op()
        if op is not None:
            return partial(_torch_attention, decode_op=op)
    return ATTENTION_BACKENDS[name]


def resolve_backend(name: str, device: torch.device | str) -> str:
    """'auto' picks Triton on CUDA devices and the torch path elsewhere."""
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return name

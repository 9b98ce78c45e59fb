"""Kernel backends by name: the torch path (CPU, and the reference) and the Triton path (GPU)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from slserve.kernels.attention import paged_attention


def _torch_attention(q, k_cache, v_cache, batch, scale):
    return paged_attention(q, k_cache, v_cache, batch.attn_groups, scale)


def _triton_attention(q, k_cache, v_cache, batch, scale):
    from slserve.kernels.triton_attention import paged_attention_triton

    return paged_attention_triton(
        q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start, scale
    )


ATTENTION_BACKENDS: dict[str, Callable] = {"torch": _torch_attention, "triton": _triton_attention}


def resolve_backend(name: str, device: torch.device | str) -> str:
    """'auto' picks Triton on CUDA devices and the torch path elsewhere."""
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return name

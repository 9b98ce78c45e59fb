"""Attention/LoRA backends: one object per runner, chosen once, that turns a step plan into the
tensors its kernels want (`prepare`) and runs paged attention over them.

    TorchBackend   CPUs (and the reference): padded attention groups, C++ decode loop and LoRA op
                   where the CPU helpers are built (kernels/cpu_ext.py)
    TritonBackend  GPUs: block tables for the paged-attention kernel, offset tables for the
                   gather-matmul LoRA kernels
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from slserve.config import ModelConfig
from slserve.kernels.attention import (
    build_attention_groups,
    build_token_rows,
    paged_attention,
    token_row_attention,
)
from slserve.memory.adapter_layout import SlotView, group_columns
from slserve.memory.kv_cache import KVCache
from slserve.model.layers import LoRAHook
from slserve.norm_batch import SavedNorms, saved_norms
from slserve.parallel import Collectives, Shard
from slserve.plan import StepPlan


@dataclass
class ForwardContext:
    """The per-step tensors every layer reads."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    write_index: torch.Tensor  # [layers, 2, T]: each new token's K/V row (KVCache.write_index)
    logits_index: torch.Tensor  # [R] long
    attn: Any  # the backend's attention metadata
    lora: LoRAHook | None
    # rows of virtual tokens [V] and the adapter rows replacing their embeddings [V, hidden]
    virtual: tuple[torch.Tensor, torch.Tensor] | None = None
    norms: SavedNorms | None = None  # segments with saved RMSNorm weights (norm_batch.py)


class Backend:
    name = ""

    def __init__(self, cfg: ModelConfig, shard: Shard, comm: Collectives, device: torch.device,
                 page_tokens: int):
        """cfg: the whole model's config; the backend works on this rank's share of it."""
        self.device = device
        self.page_tokens = page_tokens
        self.shard = shard
        self.comm = comm
        self.hidden_columns = shard.hidden_columns(cfg)
        self.hidden = cfg.hidden_size
        self.eps = cfg.rms_norm_eps

    def prepare(self, plan: StepPlan, kv: KVCache, views: list[SlotView],
                flat: torch.Tensor) -> ForwardContext:
        """views: the SlotView of each of the plan's segments."""
        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        lora = norms = None
        if plan.segments:
            bounds = [(s.start, s.end) for s in plan.segments]
            lora = self.lora(bounds, views, flat)
            norms = saved_norms(bounds, views, flat, self.hidden, plan.logits_index, self.eps)
        virtual = None
        if plan.virtual_rows:  # each row of the pool's virtual tokens: [V, hidden]
            cols = torch.arange(self.hidden, device=self.device)
            virtual = (tensor(plan.virtual_rows), flat[tensor(plan.virtual_offsets)[:, None] + cols])
        return ForwardContext(
            input_ids=tensor(plan.input_ids),
            positions=tensor(plan.positions),
            write_index=kv.write_index(tensor(plan.slot_pages), tensor(plan.slot_offsets)),
            logits_index=tensor(plan.logits_index),
            attn=self.attention_metadata(plan),
            lora=lora,
            virtual=virtual,
            norms=norms,
        )

    def attention_metadata(self, plan: StepPlan) -> Any:
        raise NotImplementedError

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  ctx: ForwardContext, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def lora(self, bounds: list[tuple[int, int]], views: list[SlotView], flat: torch.Tensor) -> LoRAHook:
        raise NotImplementedError


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, *args, cpu_extension: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        from slserve.kernels.cpu_ext import decode_attention_op, lora_apply_op

        self.decode_op = decode_attention_op() if cpu_extension else None
        self.lora_op = lora_apply_op() if cpu_extension else None

    def attention_metadata(self, plan):
        build = build_token_rows if self.decode_op is not None else build_attention_groups
        return build(plan.query_lens, plan.context_lens, plan.block_tables, self.page_tokens, self.device)

    def attention(self, q, k_cache, v_cache, ctx, scale):
        if self.decode_op is not None:
            return token_row_attention(q, k_cache, v_cache, ctx.attn, scale, self.decode_op)
        return paged_attention(q, k_cache, v_cache, ctx.attn, scale)

    def lora(self, bounds, views, flat):
        from slserve.lora_batch import LoRABatch

        return LoRABatch(bounds, views, flat, self.lora_op, self.comm, self.hidden_columns)


@dataclass
class TritonAttention:
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32
    query_start: torch.Tensor  # [S + 1] int32


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, cfg: ModelConfig, shard: Shard, *args, **kwargs):
        super().__init__(cfg, shard, *args, **kwargs)
        local = shard.local_config(cfg)
        self.columns = group_columns(local)
        self.out_features = {m: o for m, (_, o) in shard.lora_shapes(cfg).items()}

    def attention_metadata(self, plan):
        def tensor(values):
            return torch.tensor(values, dtype=torch.int32, device=self.device)

        width = max(len(t) for t in plan.block_tables)
        starts = [0]
        for n in plan.query_lens:
            starts.append(starts[-1] + n)
        return TritonAttention(
            block_tables=tensor([t + [0] * (width - len(t)) for t in plan.block_tables]),
            seq_lens=tensor(plan.context_lens),
            query_start=tensor(starts),
        )

    def attention(self, q, k_cache, v_cache, ctx, scale):
        from slserve.kernels.triton_attention import paged_attention_triton

        a = ctx.attn
        return paged_attention_triton(q, k_cache, v_cache, a.block_tables, a.seq_lens, a.query_start, scale)

    def lora(self, bounds, views, flat):
        from slserve.lora_batch import TritonLoRABatch

        return TritonLoRABatch(bounds, views, flat, self.columns, self.out_features, self.comm,
                               self.hidden_columns)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """'auto' picks Triton on CUDA devices and the torch path elsewhere."""
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return name


def make_backend(name: str, cfg: ModelConfig, shard: Shard, comm: Collectives, device: torch.device,
                 page_tokens: int, cpu_extension: bool) -> Backend:
    if resolve_backend(name, device) == "triton":
        return TritonBackend(cfg, shard, comm, device, page_tokens)
    return TorchBackend(cfg, shard, comm, device, page_tokens, cpu_extension=cpu_extension)

"""The flat varlen batch of one engine step, built once from the scheduler's decisions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slserve.kernels.attention import AttentionGroup, build_attention_groups
from slserve.model.layers import LoRAHook
from slserve.request import Request


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    slot_pages: torch.Tensor  # [T] long: page of each new token's K/V
    slot_offsets: torch.Tensor  # [T] long: offset inside that page
    attn_groups: list[AttentionGroup]  # torch attention path
    block_tables: torch.Tensor | None  # [S, max_blocks] int32, Triton attention path
    seq_lens: torch.Tensor | None  # [S] int32
    query_start: torch.Tensor | None  # [S + 1] int32
    logits_index: torch.Tensor  # [R] long: the token whose logits sample each request below
    sample_requests: list[Request]
    lora: LoRAHook | None


def build_batch(
    scheduled: list[tuple[Request, int]],
    page_tokens: int,
    device: torch.device | str,
    attention_backend: str,
    make_lora,
) -> ForwardBatch:
    """scheduled: (request, new tokens) in adapter order. `make_lora(segments)` builds the LoRA
    state from (start, end, DeviceAdapter) segments, or the batch has none."""
    ids: list[int] = []
    positions: list[int] = []
    pages: list[int] = []
    offsets: list[int] = []
    q_lens: list[int] = []
    ctx_lens: list[int] = []
    tables: list[list[int]] = []
    logits_index: list[int] = []
    sample: list[Request] = []
    segments: list[tuple[int, int, object]] = []
    for req, n in scheduled:
        start, end = req.num_computed, req.num_computed + n
        t0 = len(ids)
        ids.extend(req.token_ids[start:end])
        pos = range(start, end)
        positions.extend(pos)
        table = req.block_table
        pages.extend(table[p // page_tokens] for p in pos)
        offsets.extend(p % page_tokens for p in pos)
        q_lens.append(n)
        ctx_lens.append(end)
        tables.append(table)
        if end == req.num_tokens:  # the prompt is complete: this step yields a token
            logits_index.append(len(ids) - 1)
            sample.append(req)
        dev = req.device_adapter
        if dev is not None:
            if segments and segments[-1][2] is dev and segments[-1][1] == t0:
                segments[-1] = (segments[-1][0], len(ids), dev)
            else:
                segments.append((t0, len(ids), dev))

    def tensor(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    groups, block_tables, seq_lens, query_start = [], None, None, None
    if attention_backend == "torch":
        groups = build_attention_groups(q_lens, ctx_lens, tables, page_tokens, device)
    else:
        width = max(len(t) for t in tables)
        block_tables = tensor([t + [0] * (width - len(t)) for t in tables], torch.int32)
        seq_lens = tensor(ctx_lens, torch.int32)
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        query_start = tensor(starts, torch.int32)
    return ForwardBatch(
        input_ids=tensor(ids),
        positions=tensor(positions),
        slot_pages=tensor(pages),
        slot_offsets=tensor(offsets),
        attn_groups=groups,
        block_tables=block_tables,
        seq_lens=seq_lens,
        query_start=query_start,
        logits_index=tensor(logits_index),
        sample_requests=sample,
        lora=make_lora(segments) if segments else None,
    )

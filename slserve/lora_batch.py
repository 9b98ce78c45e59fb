"""A step's batched-LoRA state: which token segment uses which resident adapter.

Built once per step from the scheduled requests (already ordered so that each adapter's tokens
are contiguous) and handed to every linear layer through `apply`.
"""

from __future__ import annotations

import torch

from slserve.kernels.lora import MAX_EXPANDS, apply_lora
from slserve.memory.adapter_pages import GROUPS, DeviceAdapter

GROUP_INDEX = {group: g for g, group in enumerate(GROUPS)}


def stacked_slots(segments: list[tuple[int, int, DeviceAdapter]]) -> torch.Tensor:
    """The segments' slot tables as one int64 [layers, groups, segments, SLOT_FIELDS] tensor."""
    return torch.stack([dev.table for _, _, dev in segments]).permute(1, 2, 0, 3).contiguous()


class LoRABatch:
    """Torch path. `op` is the C++ loop (kernels/cpu_ext.py) when it could be built, else the
    same loop runs in Python (kernels/lora.py:apply_lora). Each call hands the op the segments'
    slot-table rows for one (layer, group): views sliced here once per step, not per call."""

    def __init__(self, segments: list[tuple[int, int, DeviceAdapter]], pool_flat: torch.Tensor, op=None):
        self.op = op or apply_lora
        self.pool = pool_flat
        self.bounds = torch.tensor([[s0, s1] for s0, s1, _ in segments], dtype=torch.int64)
        self.slots = [layer.unbind(0) for layer in stacked_slots(segments).unbind(0)]

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        self.op(y, x, self.pool, self.bounds, self.slots[layer][GROUP_INDEX[group]])


class TritonLoRABatch:
    """The same state as offset tables for the Triton kernels: [num_layers, segments] per field,
    one set per module (a slot row lists only the modules an adapter has; a module is found by
    the output columns it writes, which are distinct within a group)."""

    def __init__(self, segments: list[tuple[int, int, DeviceAdapter]], pool_flat: torch.Tensor,
                 columns: dict[str, int], out_features: dict[str, int]):
        from slserve.kernels.triton_lora import lora_expand_triton, lora_shrink_triton

        self._shrink, self._expand = lora_shrink_triton, lora_expand_triton
        self.pool = pool_flat
        self.columns = columns
        self.out_features = out_features
        device = pool_flat.device
        self.seg_start = torch.tensor([s0 for s0, _, _ in segments], dtype=torch.int32, device=device)
        self.seg_len = torch.tensor([s1 - s0 for s0, s1, _ in segments], dtype=torch.int32, device=device)
        table = stacked_slots(segments)  # [layers, groups, segments, fields], built on the host
        self.tables: dict[str, tuple] = {}
        for g, (group, modules) in enumerate(GROUPS.items()):
            rows = table[:, g]
            expands = {}
            for mod in modules:
                b_off, h_off, r = (torch.zeros_like(rows[..., 0]) for _ in range(3))
                for e in range(MAX_EXPANDS):
                    f = rows[..., 4 + 5 * e : 9 + 5 * e]  # b_off, r, out, h0, y0
                    hit = (rows[..., 3] > e) & (f[..., 4] == columns[mod])
                    b_off = torch.where(hit, f[..., 0], b_off)
                    h_off = torch.where(hit, f[..., 3], h_off)
                    r = torch.where(hit, f[..., 1], r)
                expands[mod] = (b_off.to(device), h_off.to(device), r.to(device))
            rank = rows[..., 1]
            self.tables[group] = (rows[..., 0].to(device), rank.to(device), int(rank.max()), expands)

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        a_off, rank, max_rank, expands = self.tables[group]
        if max_rank == 0:
            return
        h = self._shrink(x, self.pool, self.seg_start, self.seg_len, a_off[layer], rank[layer], max_rank)
        for mod, (b_off, h_off, r) in expands.items():
            self._expand(y, h, self.pool, self.seg_start, self.seg_len, b_off[layer], h_off[layer],
                         r[layer], self.columns[mod], self.out_features[mod])

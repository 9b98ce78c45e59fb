"""A step's batched-LoRA state: which token segment uses which resident adapter.

Built once per step from the scheduled requests (already ordered so that each adapter's tokens
are contiguous) and handed to every linear layer through `apply`.
"""

from __future__ import annotations

import torch

from slserve.kernels.lora import apply_lora
from slserve.memory.adapter_pages import GROUPS, DeviceAdapter

GROUP_INDEX = {group: g for g, group in enumerate(GROUPS)}


class LoRABatch:
    """Torch path. `op` is the C++ loop (kernels/cpu_ext.py) when it could be built, else the
    same loop runs in Python (kernels/lora.py:apply_lora). Each call hands the op the segments'
    slot-table rows for one (layer, group): views sliced here once per step, not per call."""

    def __init__(self, segments: list[tuple[int, int, DeviceAdapter]], pool_flat: torch.Tensor, op=None):
        self.segments = segments
        self.op = op or apply_lora
        self.pool = pool_flat
        self.bounds = torch.tensor([[s0, s1] for s0, s1, _ in segments], dtype=torch.int64)
        # [segments, layers, groups, fields] -> per layer, per group: [segments, fields]
        stacked = torch.stack([dev.table for _, _, dev in segments]).permute(1, 2, 0, 3).contiguous()
        self.slots = [layer.unbind(0) for layer in stacked.unbind(0)]

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        self.op(y, x, self.pool, self.bounds, self.slots[layer][GROUP_INDEX[group]])


class TritonLoRABatch:
    """The same state as offset tables for the Triton kernels: [num_layers, segments] per field."""

    def __init__(self, segments: list[tuple[int, int, DeviceAdapter]], pool_flat: torch.Tensor,
                 columns: dict[str, int], out_features: dict[str, int]):
        self.segments = segments
        from slserve.kernels.triton_lora import lora_expand_triton, lora_shrink_triton

        self._shrink, self._expand = lora_shrink_triton, lora_expand_triton
        self.pool = pool_flat
        self.columns = columns
        self.out_features = out_features
        device = pool_flat.device
        num_layers = len(segments[0][2].slots) if segments else 0
        self.seg_start = torch.tensor([s0 for s0, _, _ in segments], dtype=torch.int32, device=device)
        self.seg_len = torch.tensor([s1 - s0 for s0, s1, _ in segments], dtype=torch.int32, device=device)
        self.tables: dict[str, tuple] = {}
        for group, modules in GROUPS.items():
            a_off = [[0] * len(segments) for _ in range(num_layers)]
            rank = [[0] * len(segments) for _ in range(num_layers)]
            b_off = {m: [[0] * len(segments) for _ in range(num_layers)] for m in modules}
            h_off = {m: [[0] * len(segments) for _ in range(num_layers)] for m in modules}
            r_mod = {m: [[0] * len(segments) for _ in range(num_layers)] for m in modules}
            for s, (_, _, dev) in enumerate(segments):
                for layer in range(num_layers):
                    slot = dev.slots[layer].get(group)
                    if slot is None:
                        continue
                    a_off[layer][s], rank[layer][s] = slot.a_off, slot.rank
                    for mod, off, h0, r in slot.expands:
                        b_off[mod][layer][s], h_off[mod][layer][s], r_mod[mod][layer][s] = off, h0, r
            t = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
            max_rank = max((max(row) for row in rank), default=0)
            self.tables[group] = (
                t(a_off), t(rank), max_rank,
                {m: (t(b_off[m]), t(h_off[m]), t(r_mod[m])) for m in modules},
            )

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        a_off, rank, max_rank, expands = self.tables[group]
        if max_rank == 0:
            return
        h = self._shrink(x, self.pool, self.seg_start, self.seg_len, a_off[layer], rank[layer], max_rank)
        for mod, (b_off, h_off, r) in expands.items():
            self._expand(y, h, self.pool, self.seg_start, self.seg_len, b_off[layer], h_off[layer],
                         r[layer], self.columns[mod], self.out_features[mod])

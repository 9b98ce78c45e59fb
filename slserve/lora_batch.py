"""A step's batched-LoRA state: which token segment uses which resident adapter.

Built once per step from the scheduled requests (already ordered so that each adapter's tokens
are contiguous) and handed to every linear layer through `apply`.
"""

from __future__ import annotations

import torch

from slserve.kernels.lora import apply_lora
from slserve.memory.adapter_pages import GROUPS, DeviceAdapter


class LoRABatch:
    """Torch path. `op` is the C++ loop (kernels/cpu_ext.py) when it could be built, else the
    same loop runs in Python."""

    def __init__(self, segments: list[tuple[int, int, DeviceAdapter]], op=None):
        self.segments = segments
        self.op = op

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        if self.op is None:
            apply_lora(y, x, [(s0, s1, dev.views[layer][group]) for s0, s1, dev in self.segments])
            return
        starts, ends, a, n_expand, bt, h0, y0 = [], [], [], [], [], [], []
        for s0, s1, dev in self.segments:
            w = dev.views[layer][group]
            if w is None:
                continue
            starts.append(s0)
            ends.append(s1)
            a.append(w[0])
            n_expand.append(len(w[1]))
            for b, hh, yy in w[1]:
                bt.append(b)
                h0.append(hh)
                y0.append(yy)
        if starts:
            self.op(y, x, starts, ends, a, n_expand, bt, h0, y0)


class TritonLoRABatch(LoRABatch):
    """The same state as offset tables for the Triton kernels: [num_layers, segments] per field."""

    def __init__(self, segments: list[tuple[int, int, DeviceAdapter]], pool_flat: torch.Tensor,
                 columns: dict[str, int], out_features: dict[str, int]):
        super().__init__(segments)
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

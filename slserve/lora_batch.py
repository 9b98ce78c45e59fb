"""A step's batched-LoRA state: which token segment uses which resident adapter.

Built once per step by the runner's backend from the plan's (start, end, slot) segments and the
slot tables of the adapters it holds (memory/adapter_layout.py: AdapterLayout.table), and handed
to every linear layer through `apply`.

Under tensor parallelism a row-parallel group (o, down) cannot run shrink and expand in one pass:
each rank's shrink over its input columns is a partial sum, all-reduced ([T, max rank], the only
traffic LoRA adds) before the expand writes the rank's columns of the output (parallel.py).
"""

from __future__ import annotations

import torch

from slserve.kernels.lora import MAX_EXPANDS, apply_lora
from slserve.memory.adapter_layout import GROUPS
from slserve.parallel import Collectives

GROUP_INDEX = {group: g for g, group in enumerate(GROUPS)}
ROW_GROUPS = ("o", "down")


def stacked_slots(tables: list[torch.Tensor]) -> torch.Tensor:
    """The segments' slot tables as one int64 [layers, groups, segments, SLOT_FIELDS] tensor."""
    return torch.stack(tables).permute(1, 2, 0, 3).contiguous()


class LoRABatch:
    """Torch path. `op` is the C++ loop (kernels/cpu_ext.py) when it could be built, else the
    same loop runs in Python (kernels/lora.py:apply_lora). Each call hands the op the segments'
    slot-table rows for one (layer, group): views sliced here once per step, not per call.
    `comm`/`hidden_columns`: under TP, the collectives and this rank's columns of a row-parallel
    output."""

    def __init__(self, bounds: list[tuple[int, int]], tables: list[torch.Tensor], pool_flat: torch.Tensor,
                 op=None, comm: Collectives | None = None, hidden_columns: range | None = None):
        self.op = op or apply_lora
        self.pool = pool_flat
        self.bounds = torch.tensor(bounds, dtype=torch.int64)
        self.slots = [layer.unbind(0) for layer in stacked_slots(tables).unbind(0)]
        self.comm = comm if comm is not None and comm.shard.parallel else None
        self.hidden_columns = hidden_columns

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        rows = self.slots[layer][GROUP_INDEX[group]]
        if self.comm is not None and group in ROW_GROUPS:
            self._row_parallel(y, x, rows)
        else:
            self.op(y, x, self.pool, self.bounds, rows)

    def _row_parallel(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> None:
        max_rank = int(rows[:, 1].max())
        if max_rank == 0:
            return
        pool, in_f = self.pool, x.shape[1]
        h = x.new_zeros(x.shape[0], max_rank)
        segs = list(zip(self.bounds.tolist(), rows.tolist(), strict=True))
        for (s0, s1), row in segs:
            a_off, rank = row[0], row[1]
            if rank:
                a = pool[a_off : a_off + rank * in_f].view(rank, in_f)
                torch.mm(x[s0:s1], a.t(), out=h[s0:s1, :rank])
        self.comm.all_reduce(h)
        out = y[:, self.hidden_columns.start : self.hidden_columns.stop]
        for (s0, s1), row in segs:
            if row[1]:
                b_off, r, out_f, h0, y0 = row[4:9]
                bt = pool[b_off : b_off + r * out_f].view(r, out_f)
                out[s0:s1, y0 : y0 + out_f].addmm_(h[s0:s1, h0 : h0 + r], bt)


class TritonLoRABatch:
    """The same state as offset tables for the Triton kernels: [num_layers, segments] per field,
    one set per module (a slot row lists only the modules an adapter has; a module is found by
    the output columns it writes, which are distinct within a group)."""

    def __init__(self, bounds: list[tuple[int, int]], tables: list[torch.Tensor], pool_flat: torch.Tensor,
                 columns: dict[str, int], out_features: dict[str, int], comm: Collectives | None = None,
                 hidden_columns: range | None = None):
        from slserve.kernels.triton_lora import lora_expand_triton, lora_shrink_triton

        self._shrink, self._expand = lora_shrink_triton, lora_expand_triton
        self.pool = pool_flat
        self.columns = columns
        self.out_features = out_features
        self.comm = comm if comm is not None and comm.shard.parallel else None
        self.hidden_columns = hidden_columns
        device = pool_flat.device
        self.seg_start = torch.tensor([s0 for s0, _ in bounds], dtype=torch.int32, device=device)
        self.seg_len = torch.tensor([s1 - s0 for s0, s1 in bounds], dtype=torch.int32, device=device)
        table = stacked_slots(tables)  # [layers, groups, segments, fields], built on the host
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
        if self.comm is not None and group in ROW_GROUPS:
            self.comm.all_reduce(h)
            y = y[:, self.hidden_columns.start : self.hidden_columns.stop]
        for mod, (b_off, h_off, r) in expands.items():
            self._expand(y, h, self.pool, self.seg_start, self.seg_len, b_off[layer], h_off[layer],
                         r[layer], self.columns[mod], self.out_features[mod])

"""A step's batched-LoRA state: which token segment uses which resident adapter.

Built once per step by the runner's backend from the plan's segments and the views of the
adapters they use (memory/adapter_layout.py: SlotView), and handed to every linear layer through
`apply`. Segments of a lower nested rank (factors) and of adapters with output scales (DoRA,
IA3) add their own work after the LoRA op; a step without them runs exactly the plain path.

Under tensor parallelism a row-parallel group (o, down) cannot run shrink and expand in one pass:
each rank's shrink over its input columns is a partial sum, all-reduced ([T, max rank], the only
traffic LoRA adds) before the expand writes the rank's columns of the output (parallel.py).
"""

from __future__ import annotations

import torch

from slserve.kernels.lora import MAX_EXPANDS, apply_lora, apply_output_scales
from slserve.memory.adapter_layout import GROUP_INDEX, GROUPS, SlotView
from slserve.parallel import Collectives

ROW_GROUPS = ("o", "down")


def stacked_slots(tables: list[torch.Tensor]) -> torch.Tensor:
    """The segments' slot tables as one [layers, groups, segments, fields] tensor."""
    return torch.stack(tables).permute(1, 2, 0, 3).contiguous()


def per_layer_group(tables: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """[layer][group] -> the segments' rows [segments, fields], sliced once per step."""
    return [layer.unbind(0) for layer in stacked_slots(tables).unbind(0)]


class OutputScales:
    """The scale-table rows of the step's segments that have them, as lists: [layer][group] ->
    one row per such segment; false when no segment has one."""

    def __init__(self, bounds: list[tuple[int, int]], views: list[SlotView]):
        scaled = [i for i, v in enumerate(views) if v.scales is not None]
        self.bounds = [bounds[i] for i in scaled]
        self.rows = stacked_slots([views[i].scales for i in scaled]).tolist() if scaled else []

    def __bool__(self) -> bool:
        return bool(self.rows)

    def apply(self, y: torch.Tensor, pool: torch.Tensor, layer: int, group: str) -> None:
        apply_output_scales(y, pool, self.bounds, self.rows[layer][GROUP_INDEX[group]])


class LoRABatch:
    """Torch path. `op` is the C++ loop (kernels/cpu_ext.py) when it could be built, else the
    same loop runs in Python (kernels/lora.py:apply_lora). Each call hands the op the segments'
    slot-table rows for one (layer, group): views sliced here once per step, not per call.
    Segments of a nested rank run in the torch loop with their factors (the op has none).
    `comm`/`hidden_columns`: under TP, the collectives and this rank's columns of a row-parallel
    output."""

    def __init__(self, bounds: list[tuple[int, int]], views: list[SlotView], pool_flat: torch.Tensor,
                 op=None, comm: Collectives | None = None, hidden_columns: range | None = None):
        self.op = op or apply_lora
        self.pool = pool_flat
        self.comm = comm if comm is not None and comm.shard.parallel else None
        self.hidden_columns = hidden_columns
        plain = [i for i, v in enumerate(views) if v.factors is None]
        nested = [i for i, v in enumerate(views) if v.factors is not None]
        self.bounds = torch.tensor([bounds[i] for i in plain], dtype=torch.int64)
        self.slots = per_layer_group([views[i].table for i in plain]) if plain else None
        self.nested = None
        if nested:
            self.nested = (torch.tensor([bounds[i] for i in nested], dtype=torch.int64),
                           per_layer_group([views[i].table for i in nested]),
                           per_layer_group([views[i].factors for i in nested]))
        self.scales = OutputScales(bounds, views) or None  # None: no segment has output scales
        if self.comm is not None:  # the row-parallel path walks every segment itself
            self._rows = [(b, v.table.tolist(), None if v.factors is None else v.factors.tolist())
                          for b, v in zip(bounds, views, strict=True)]

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        g = GROUP_INDEX[group]
        if self.comm is not None and group in ROW_GROUPS:
            self._row_parallel(y, x, layer, g)
        else:
            if self.slots is not None:
                self.op(y, x, self.pool, self.bounds, self.slots[layer][g])
            if self.nested is not None:
                bounds, slots, factors = self.nested
                apply_lora(y, x, self.pool, bounds, slots[layer][g], factors[layer][g])
        if self.scales is not None:
            self.scales.apply(y, self.pool, layer, group)

    def _row_parallel(self, y: torch.Tensor, x: torch.Tensor, layer: int, g: int) -> None:
        segs = [(b, rows[layer][g], 1 if f is None else f[layer][g][0]) for b, rows, f in self._rows]
        max_rank = max(row[1] for _, row, _ in segs)
        if max_rank == 0:
            return
        pool, in_f = self.pool, x.shape[1]
        h = x.new_zeros(x.shape[0], max_rank)
        for (s0, s1), row, _ in segs:
            a_off, rank = row[0], row[1]
            if rank:
                a = pool[a_off : a_off + rank * in_f].view(rank, in_f)
                torch.mm(x[s0:s1], a.t(), out=h[s0:s1, :rank])
        self.comm.all_reduce(h)
        out = y[:, self.hidden_columns.start : self.hidden_columns.stop]
        for (s0, s1), row, factor in segs:  # a row-parallel group has one module: one expand
            if row[1]:
                b_off, r, out_f, h0, y0 = row[4:9]
                bt = pool[b_off : b_off + r * out_f].view(r, out_f)
                out[s0:s1, y0 : y0 + out_f].addmm_(h[s0:s1, h0 : h0 + r], bt, alpha=factor)


class TritonLoRABatch:
    """The same state as offset tables for the Triton kernels: [num_layers, segments] per field,
    one set per module (a slot row lists only the modules an adapter has; a module is found by
    the output columns it writes, which are distinct within a group). Nested ranks are a factor
    per (layer, segment) of each module's expand; output scales run as torch ops on the device."""

    def __init__(self, bounds: list[tuple[int, int]], views: list[SlotView], pool_flat: torch.Tensor,
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
        table = stacked_slots([v.table for v in views])  # [layers, groups, segments, fields], host
        factors = None
        if any(v.factors is not None for v in views):
            ones = torch.ones_like(views[0].table[..., :MAX_EXPANDS], dtype=torch.float32)
            factors = stacked_slots([ones if v.factors is None else v.factors for v in views])
        self.tables: dict[str, tuple] = {}
        for g, (group, modules) in enumerate(GROUPS.items()):
            rows = table[:, g]
            expands = {}
            for mod in modules:
                b_off, h_off, r = (torch.zeros_like(rows[..., 0]) for _ in range(3))
                factor = torch.ones(rows.shape[:2]) if factors is not None else None
                for e in range(MAX_EXPANDS):
                    f = rows[..., 4 + 5 * e : 9 + 5 * e]  # b_off, r, out, h0, y0
                    hit = (rows[..., 3] > e) & (f[..., 4] == columns[mod])
                    b_off = torch.where(hit, f[..., 0], b_off)
                    h_off = torch.where(hit, f[..., 3], h_off)
                    r = torch.where(hit, f[..., 1], r)
                    if factor is not None:
                        factor = torch.where(hit, factors[:, g, :, e], factor)
                expands[mod] = (b_off.to(device), h_off.to(device), r.to(device),
                                None if factor is None else factor.to(device))
            rank = rows[..., 1]
            self.tables[group] = (rows[..., 0].to(device), rank.to(device), int(rank.max()), expands)
        self.scales = OutputScales(bounds, views) or None  # None: no segment has output scales

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        a_off, rank, max_rank, expands = self.tables[group]
        if max_rank:
            h = self._shrink(x, self.pool, self.seg_start, self.seg_len, a_off[layer], rank[layer], max_rank)
            out = y
            if self.comm is not None and group in ROW_GROUPS:
                self.comm.all_reduce(h)
                out = y[:, self.hidden_columns.start : self.hidden_columns.stop]
            for mod, (b_off, h_off, r, factor) in expands.items():
                self._expand(out, h, self.pool, self.seg_start, self.seg_len, b_off[layer], h_off[layer],
                             r[layer], self.columns[mod], self.out_features[mod],
                             factor=None if factor is None else factor[layer])
        if self.scales is not None:
            self.scales.apply(y, self.pool, layer, group)

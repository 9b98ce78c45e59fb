"""The adapter layout table: where each module's LoRA matrices sit in the pool, one named row each.

Rank 0 lays an adapter out once per residency (adapter_pages.py) and every rank writes its own
slice of the weights at the same offsets (`write_adapter`). The kernels read views of this table:
the C++/torch op a packed int64 row per (layer, group) (`AdapterLayout.table`, layout in
kernels/lora.py), the Triton path per-module offset tensors derived from that (lora_batch.py).

Within one layer the block reads

    A_qkv  [rq + rk + rv, hidden]   the q, k, v A matrices stacked: one shrink feeds three expands
    A_o    [ro, q_size]
    A_gu   [rg + ru, hidden]        gate and up stacked likewise
    A_down [rd, intermediate]
    B^T_q [rq, q_size]  B^T_k [rk, kv_size]  B^T_v [rv, kv_size]  B^T_o [ro, hidden]
    B^T_gate [rg, intermediate]  B^T_up [ru, intermediate]  B^T_down [rd, hidden]

with every size the rank's own (parallel.py: Shard.lora_shapes); absent modules take no room,
B^T carries the module's scale, nothing is padded to a maximum rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from slserve.config import ModelConfig
from slserve.kernels.lora import SLOT_FIELDS, slot_row
from slserve.parallel import ROW_PARALLEL

# group -> the modules it fuses, in the column order of the fused base projection
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
GROUP_OF = {module: group for group, modules in GROUPS.items() for module in modules}


def group_columns(model: ModelConfig) -> dict[str, int]:
    """Column offset of each module inside its group's fused output (`model`: a rank's config)."""
    q, kv, inter = model.q_size, model.kv_size, model.intermediate_size
    return {"q_proj": 0, "k_proj": q, "v_proj": q + kv, "o_proj": 0,
            "gate_proj": 0, "up_proj": inter, "down_proj": 0}


@dataclass(frozen=True)
class ModuleSlot:
    """One (layer, module) of a resident adapter, as offsets into the rank's flat pool."""

    layer: int
    module: str
    group: str
    rank: int
    in_features: int  # A is [rank, in_features] at a_off
    out_features: int  # B^T is [rank, out_features] at b_off, scale folded in
    a_off: int
    b_off: int
    h0: int  # its first column in the group's shrink output (the group's A rows are stacked)
    y0: int  # its first column in the group's fused output
    row_parallel: bool  # under TP: its shrink is a partial sum (all-reduced before the expand)


@dataclass(frozen=True)
class AdapterLayout:
    slots: tuple[ModuleSlot, ...]  # by layer, then in GROUPS order
    num_layers: int

    def table(self) -> torch.Tensor:
        """The packed view for the LoRA op: int64 [layers, len(GROUPS), SLOT_FIELDS]."""
        by_group: dict[tuple[int, str], list[ModuleSlot]] = {}
        for s in self.slots:
            by_group.setdefault((s.layer, s.group), []).append(s)
        rows = []
        for layer in range(self.num_layers):
            for group in GROUPS:
                mods = by_group.get((layer, group))
                if not mods:  # rank 0: the adapter leaves this group alone
                    rows.append(slot_row(0, 0, 0, []))
                    continue
                expands = [(s.b_off, s.rank, s.out_features, s.h0, s.y0) for s in mods]
                rows.append(slot_row(mods[0].a_off, sum(s.rank for s in mods), mods[0].in_features, expands))
        return torch.tensor(rows, dtype=torch.int64).view(self.num_layers, len(GROUPS), SLOT_FIELDS)


def layer_elems(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> int:
    """Pool elements of one layer block whose modules have these ranks."""
    return sum(r * (shapes[m][0] + shapes[m][1]) for m, r in ranks.items())


def lay_out(layer_ranks: list[dict[str, int]], shapes: Mapping[str, tuple[int, int]],
            columns: Mapping[str, int], layer_offsets: list[int]) -> AdapterLayout:
    """The layout of an adapter whose layer l block starts at pool element layer_offsets[l];
    layer_ranks[l]: module -> rank for the modules the adapter has in layer l."""
    slots = []
    for layer, ranks in enumerate(layer_ranks):
        off = layer_offsets[layer]
        a_offs: dict[str, int] = {}
        for modules in GROUPS.values():  # every group's A rows first, stacked
            for mod in modules:
                if mod in ranks:
                    a_offs[mod] = off
                    off += ranks[mod] * shapes[mod][0]
        for group, modules in GROUPS.items():  # then every B^T
            h0 = 0
            for mod in modules:
                r = ranks.get(mod)
                if r is None:
                    continue
                slots.append(ModuleSlot(
                    layer=layer, module=mod, group=group, rank=r, in_features=shapes[mod][0],
                    out_features=shapes[mod][1], a_off=a_offs[mod], b_off=off, h0=h0, y0=columns[mod],
                    row_parallel=mod in ROW_PARALLEL,
                ))
                off += r * shapes[mod][1]
                h0 += r
    return AdapterLayout(tuple(slots), len(layer_ranks))


def write_adapter(flat: torch.Tensor, layout: AdapterLayout,
                  weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """Write one rank's weights into its pool at the layout's offsets. weights: (layer, module) ->
    (A [r, in], B [out, r], scale), already cut to the rank's slice (parallel.py: lora_slice)."""
    for s in layout.slots:
        a, b, scale = weights[(s.layer, s.module)]
        flat[s.a_off : s.a_off + s.rank * s.in_features].view(s.rank, s.in_features).copy_(a)
        # Scale in float32, then one transposing, rounding copy into the pages.
        flat[s.b_off : s.b_off + s.rank * s.out_features].view(s.rank, s.out_features).copy_((b.float() * scale).t())

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

    then, for each module with an output scale (DoRA, IA3), its vector [width] and, for a DoRA
    module with a bias, the shift (1 - s) * bias [width]

with every size the rank's own (parallel.py: Shard.lora_shapes); absent modules take no room,
B^T carries the module's scale, nothing is padded to a maximum rank. An output scale's width is
the module's columns in the rank's output: its own output columns for a column-parallel module,
every hidden column for a row-parallel one (each rank scales its partial sum before the all-reduce).

After the layer blocks comes one more block for the parts that are not per module (`Extras`):

    virtual tokens [n, hidden]           prompt tuning, P-tuning: rows that replace the embeddings
                                         of the request's first n slots
    saved norms    [k, hidden]           LongLoRA's RMSNorm weights (modules_to_save), one row
                                         per saved (layer, norm), the final norm as layer -1

both full width on every rank (the residual stream is not split). A prefix-tuning adapter's keys
and values are not in this block: they are whole KV pages of the pool (`prefix_pages`), laid out
as the KV cache's own pages so that a request's block table can start with them.

A segment reads an adapter through a `SlotView`: the slot table, and two parts present only when
used, so that a step of plain LoRA requests does no extra work: the factor of each expand when the
request asks for a lower nested rank (`name:rK`), and the output-scale table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from slserve.config import ModelConfig
from slserve.kernels.lora import MAX_EXPANDS, SCALE_FIELDS, SLOT_FIELDS, scale_row, slot_row
from slserve.parallel import ROW_PARALLEL

# group -> the modules it fuses, in the column order of the fused base projection
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
GROUP_OF = {module: group for group, modules in GROUPS.items() for module in modules}
GROUP_INDEX = {group: g for g, group in enumerate(GROUPS)}


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
class ScaleSlot:
    """One (layer, module) output scale of a resident adapter: y[:, y0 : y0 + width] = y * v (+ c)."""

    layer: int
    module: str
    group: str
    width: int
    v_off: int
    c_off: int  # the shift (1 - s) * bias, or -1 when the module has none
    y0: int


FINAL_NORM = (-1, "norm")  # the final RMSNorm's key among saved norms


@dataclass(frozen=True)
class Extras:
    """Where an adapter's parts outside the layer blocks sit: virtual-token rows and saved norms
    (pool element offsets, each row `hidden` wide), and its prefix K/V pages."""

    virtual_off: int = -1  # [num_virtual, hidden] at virtual_off
    num_virtual: int = 0
    norms: tuple[tuple[tuple[int, str], int], ...] = ()  # ((layer, norm name), offset), FINAL_NORM last
    prefix_pages: tuple[int, ...] = ()  # KV pages holding the prefix's n slots, in order
    prefix_len: int = 0


def extras_elems(num_virtual: int, num_norms: int, hidden: int) -> int:
    """Pool elements of the block after the layer blocks."""
    return (num_virtual + num_norms) * hidden


def lay_out_extras(num_virtual: int, norm_keys: list[tuple[int, str]], hidden: int, off: int,
                   prefix_pages: tuple[int, ...] = (), prefix_len: int = 0) -> Extras:
    """The extras block starting at pool element `off` (virtual rows first, then the norms)."""
    norms_off = off + num_virtual * hidden
    norms = tuple((key, norms_off + i * hidden) for i, key in enumerate(norm_keys))
    return Extras(off if num_virtual else -1, num_virtual, norms, prefix_pages, prefix_len)


@dataclass(frozen=True)
class SlotView:
    """What a segment of one resident adapter reads in a step (see the module docstring)."""

    table: torch.Tensor  # int64 [layers, groups, SLOT_FIELDS]
    factors: torch.Tensor | None  # float32 [layers, groups, MAX_EXPANDS]; None: every factor is 1
    scales: torch.Tensor | None  # int64 [layers, groups, SCALE_FIELDS]; None: no output scale
    norms: dict[tuple[int, str], int] | None = None  # saved norm -> pool offset; None: the base norms


@dataclass(frozen=True)
class AdapterLayout:
    slots: tuple[ModuleSlot, ...]  # by layer, then in GROUPS order
    num_layers: int
    scales: tuple[ScaleSlot, ...] = ()
    rslora: bool = False  # the adapter's scale is alpha / sqrt(r): a lower rank K rescales by sqrt(r / K)
    extras: Extras = Extras()

    def _by_group(self, slots) -> dict[tuple[int, str], list]:
        by_group: dict[tuple[int, str], list] = {}
        for s in slots:
            by_group.setdefault((s.layer, s.group), []).append(s)
        return by_group

    def table(self, rank: int = 0) -> torch.Tensor:
        """The packed view for the LoRA op: int64 [layers, len(GROUPS), SLOT_FIELDS]. rank K > 0:
        the nested view, each module's first min(K, r) rows of A and B^T (a fused group still
        shrinks with all its stacked A rows: the first K rows of each are not contiguous)."""
        by_group = self._by_group(self.slots)
        rows = []
        for layer in range(self.num_layers):
            for group in GROUPS:
                mods = by_group.get((layer, group))
                if not mods:  # rank 0: the adapter leaves this group alone
                    rows.append(slot_row(0, 0, 0, []))
                    continue
                ranks = [min(rank, s.rank) if rank else s.rank for s in mods]
                expands = [(s.b_off, r, s.out_features, s.h0, s.y0) for s, r in zip(mods, ranks, strict=True)]
                shrink = ranks[0] if len(mods) == 1 else sum(s.rank for s in mods)
                rows.append(slot_row(mods[0].a_off, shrink, mods[0].in_features, expands))
        return torch.tensor(rows, dtype=torch.int64).view(self.num_layers, len(GROUPS), SLOT_FIELDS)

    def factors(self, rank: int) -> torch.Tensor:
        """float32 [layers, groups, MAX_EXPANDS]: scale(K) / scale(r) of each expand of the nested
        view at rank K, for B^T holds the scale of the module's full rank r."""
        out = torch.ones(self.num_layers, len(GROUPS), MAX_EXPANDS)
        for (layer, group), mods in self._by_group(self.slots).items():
            g = GROUP_INDEX[group]
            for e, s in enumerate(mods):
                ratio = s.rank / min(rank, s.rank)
                out[layer, g, e] = ratio**0.5 if self.rslora else ratio
        return out

    def scale_table(self) -> torch.Tensor | None:
        """int64 [layers, len(GROUPS), SCALE_FIELDS], or None when the adapter has no output scale."""
        if not self.scales:
            return None
        by_group = self._by_group(self.scales)
        rows = []
        for layer in range(self.num_layers):
            for group in GROUPS:
                mods = by_group.get((layer, group), [])
                rows.append(scale_row([(s.v_off, s.c_off, s.width, s.y0) for s in mods]))
        return torch.tensor(rows, dtype=torch.int64).view(self.num_layers, len(GROUPS), SCALE_FIELDS)

    def view(self, rank: int = 0) -> SlotView:
        """A segment's view: the adapter as laid out, or its nested rank K (rank > 0)."""
        nested = 0 < rank < max((s.rank for s in self.slots), default=0)
        return SlotView(self.table(rank if nested else 0), self.factors(rank) if nested else None,
                        self.scale_table(), dict(self.extras.norms) or None)



def layer_elems(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]],
                scales: Mapping[str, int] | None = None, widths: Mapping[str, int] | None = None) -> int:
    """Pool elements of one layer block whose modules have these ranks and these output scales
    (module -> number of vectors: 1, or 2 with a shift; widths: module -> scale width)."""
    pairs = sum(r * (shapes[m][0] + shapes[m][1]) for m, r in ranks.items())
    return pairs + sum(n * widths[m] for m, n in (scales or {}).items())


def lay_out(layer_ranks: list[dict[str, int]], shapes: Mapping[str, tuple[int, int]],
            columns: Mapping[str, int], layer_offsets: list[int],
            layer_scales: list[dict[str, int]] | None = None, widths: Mapping[str, int] | None = None,
            rslora: bool = False) -> AdapterLayout:
    """The layout of an adapter whose layer l block starts at pool element layer_offsets[l];
    layer_ranks[l]: module -> rank for the modules the adapter has in layer l; layer_scales[l]:
    module -> 1 or 2 for its output scale (with a shift) in layer l, each `widths[module]` wide."""
    slots, scales = [], []
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
        own = layer_scales[layer] if layer_scales else {}
        for mod in (m for modules in GROUPS.values() for m in modules if m in own):  # then the scales
            width = widths[mod]
            c_off = off + width if own[mod] == 2 else -1
            scales.append(ScaleSlot(layer=layer, module=mod, group=GROUP_OF[mod], width=width, v_off=off,
                                    c_off=c_off, y0=0 if mod in ROW_PARALLEL else columns[mod]))
            off += own[mod] * width
    return AdapterLayout(tuple(slots), len(layer_ranks), tuple(scales), rslora)


class RankWeights(NamedTuple):
    """One rank's slices of an adapter (parallel.py: lora_slice, output_scale_slice); virtual
    tokens and norms are whole on every rank, the prefix K/V has the rank's KV heads."""

    # (layer, module) -> (A [r, in], B [out, r], scale)
    pairs: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]
    scales: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]]  # -> (s [width], shift | None)
    virtual: torch.Tensor | None = None  # [n, hidden]
    norms: Mapping[tuple[int, str], torch.Tensor] | None = None  # (layer, norm) -> [hidden]; FINAL_NORM
    prefix_kv: torch.Tensor | None = None  # [layers, 2, n, local kv_heads, head_dim]


def write_adapter(flat: torch.Tensor, layout: AdapterLayout, weights: RankWeights,
                  kv_pages: torch.Tensor | None = None) -> None:
    """Write one rank's weights into its pool at the layout's offsets; `kv_pages`: the pool as KV
    pages [num_pages, layers, 2, page_tokens, kv_heads, head_dim], for a prefix."""
    ext = layout.extras
    if ext.num_virtual:
        flat[ext.virtual_off : ext.virtual_off + weights.virtual.numel()].copy_(weights.virtual.reshape(-1))
    for key, off in ext.norms:
        w = weights.norms[key]
        flat[off : off + w.numel()].copy_(w)
    if ext.prefix_pages:
        page_tokens = kv_pages.shape[3]
        for i, page in enumerate(ext.prefix_pages):
            chunk = weights.prefix_kv[:, :, i * page_tokens : (i + 1) * page_tokens]  # [L, 2, c, KVH, D]
            kv_pages[page, :, :, : chunk.shape[2]].copy_(chunk)
    for s in layout.scales:
        vector, shift = weights.scales[(s.layer, s.module)]
        flat[s.v_off : s.v_off + s.width].copy_(vector)
        if s.c_off >= 0:
            flat[s.c_off : s.c_off + s.width].copy_(shift)
    for s in layout.slots:
        a, b, scale = weights.pairs[(s.layer, s.module)]
        flat[s.a_off : s.a_off + s.rank * s.in_features].view(s.rank, s.in_features).copy_(a)
        # Scaled in float32 and rounded once to the pool's dtype. From a host copy already in that
        # dtype: a transposing copy (exact), then the multiply in place (computed in float32,
        # rounded once), the same values without two temporaries.
        bt = flat[s.b_off : s.b_off + s.rank * s.out_features].view(s.rank, s.out_features)
        if b.dtype == bt.dtype:
            bt.copy_(b.t())
            if scale != 1.0:
                bt.mul_(scale)
        else:
            bt.copy_((b.float() * scale).t())

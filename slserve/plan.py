"""The step plan: everything a model runner needs for one forward, as plain picklable data.

Rank 0 builds it from the scheduler's decisions (`build_plan`); every rank's model runner
(runner.py) executes it: first the adapter commands, in order, then the forward. Nothing in it
holds a tensor or a `Request`, so under tensor parallelism it is the one message of a step.

    input_ids, positions      [T]  the step's tokens: prefill chunks and decode tokens, flat
    slot_pages, slot_offsets  [T]  where each token's K/V goes (page id, offset in the page)
    query_lens, context_lens  [S]  per sequence: new tokens, tokens in the cache after the step
    block_tables              [S]  per sequence: its pages, in order (its adapter's prefix pages
                                   first, for prefix tuning)
    virtual_rows, virtual_offsets [V]  tokens that are an adapter's virtual tokens (prompt
                                   tuning, P-tuning; input id 0): the pool offset of the row that
                                   replaces their embedding
    kv_copies                      (adapter page, request page, slots): the first slots of a
                                   prefix's partial last page, copied before the forward
    logits_index              [R]  the token whose logits sample each finishing prompt/decode
    segments                       Segment (start, end, adapter slot, rank): token ranges of one
                                   adapter; rank K > 0 asks for its nested rank K (`name:rK`)
    adapter_commands               AdapterLoad / AdapterFree, applied before the forward

Sampling state (seeded generators, per-request parameters) stays on rank 0, which samples from
the logits the runners return there (engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from slserve.adapters.peft_format import LoRAAdapter
    from slserve.memory.adapter_layout import AdapterLayout
    from slserve.request import Request


@dataclass(frozen=True)
class AdapterLoad:
    """Write an adapter's weights at `layout` and know it as `slot` from now on. `adapter` is the
    host copy (rank 0, in process); for another rank the TP driver replaces it by `weights`,
    that rank's slices alone. `background`: a prefetch, which may overlap the step's forward."""

    slot: int
    layout: AdapterLayout
    adapter: LoRAAdapter | None
    background: bool = False
    weights: dict[tuple[int, str], Any] | None = None


@dataclass(frozen=True)
class AdapterFree:
    """The slot's pages go back to the pool: wait for any copy still writing them."""

    slot: int


AdapterCommand = AdapterLoad | AdapterFree


class Segment(NamedTuple):
    start: int
    end: int
    slot: int
    rank: int = 0  # 0: the adapter as it is; K > 0: its first K ranks (memory/adapter_layout.py: view)


@dataclass
class StepPlan:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_pages: list[int] = field(default_factory=list)
    slot_offsets: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    logits_index: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    adapter_commands: list[AdapterCommand] = field(default_factory=list)
    virtual_rows: list[int] = field(default_factory=list)
    virtual_offsets: list[int] = field(default_factory=list)
    kv_copies: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def build_plan(scheduled: list[tuple[Request, int]], page_tokens: int,
               hidden: int = 0) -> tuple[StepPlan, list[Request]]:
    """The plan of (request, new slots) pairs, already ordered so that each adapter's tokens are
    contiguous; and the requests that sample a token this step, in logits_index order. A slot
    is a position of the request's sequence: its adapter's virtual slots, then its tokens
    (scheduler/adapter_slots.py). `hidden`: the width of a virtual-token row."""
    plan = StepPlan()
    ids, positions, pages, offsets = plan.input_ids, plan.positions, plan.slot_pages, plan.slot_offsets
    segments = plan.segments
    sample: list[Request] = []
    for req, n in scheduled:
        start, end = req.num_computed, req.num_computed + n
        t0 = len(ids)
        nv = req.num_virtual
        if start < nv:  # virtual tokens: placeholders whose embeddings the forward replaces
            _virtual_rows(plan, req, t0, start, min(end, nv), hidden)
        if end > nv:
            ids.extend(req.token_ids[max(start - nv, 0) : end - nv])
        positions.extend(range(start, end))
        table = req.block_table
        if req.shared_pages:  # its adapter's prefix pages first
            table = req.shared_pages + table
        if req.prefix_copy is not None:
            plan.kv_copies.append((req.prefix_copy[0], req.block_table[0], req.prefix_copy[1]))
            req.prefix_copy = None
        pages.extend(table[p // page_tokens] for p in range(start, end))
        offsets.extend(p % page_tokens for p in range(start, end))
        plan.query_lens.append(n)
        plan.context_lens.append(end)
        plan.block_tables.append(table)  # not copied: a plan is executed before the next schedule
        if end == req.seq_len:  # the prompt is complete: this step yields a token
            plan.logits_index.append(len(ids) - 1)
            sample.append(req)
        dev = req.device_adapter
        if dev is not None:
            rank = req.adapter_rank or 0
            last = segments[-1] if segments else None
            if last is not None and (last.slot, last.rank, last.end) == (dev.slot, rank, t0):
                segments[-1] = last._replace(end=len(ids))
            else:
                segments.append(Segment(t0, len(ids), dev.slot, rank))
    return plan, sample


def _virtual_rows(plan: StepPlan, req: Request, t0: int, start: int, end: int, hidden: int) -> None:
    """Slots [start, end) of the request's virtual tokens, at step rows t0..: placeholder id 0,
    and the pool offset of the adapter row that replaces each embedding."""
    base = req.device_adapter.layout.extras.virtual_off
    plan.input_ids.extend([0] * (end - start))
    plan.virtual_rows.extend(range(t0, t0 + end - start))
    plan.virtual_offsets.extend(base + p * hidden for p in range(start, end))

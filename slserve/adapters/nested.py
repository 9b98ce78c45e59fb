"""Nested ranks (DyLoRA): a request may ask for the first K ranks of a LoRA adapter, `name:rK`.

The op then reads the first min(K, r) rows of each module's A and of its B^T (no copy: they are
the first rows of what sits in the pool) with the scale alpha / min(K, r) (alpha / sqrt(...) with
use_rslora) instead of alpha / r; B^T holds the full rank's scale, so each expand of such a
segment carries the factor scale(K) / scale(r) (memory/adapter_layout.py: AdapterLayout.view).
Only plain LoRA adapters nest: the folded pairs of AdaLoRA and VeRA are not ordered by rank, and
a DoRA adapter's norm belongs to its full rank.
"""

from __future__ import annotations

import re

NESTED_KINDS = ("LORA",)
_SUFFIX = re.compile(r"(?P<name>[^:]+):r(?P<rank>[+-]?\d+)")


def split_nested(model: str) -> tuple[str, int | None]:
    """("name", K) for "name:rK", else (model, None). Adapter names cannot hold ':'."""
    match = _SUFFIX.fullmatch(model)
    if match is None:
        return model, None
    return match["name"], int(match["rank"])


def nested_rank_problem(name: str, kind: str | None, max_rank: int, rank: int) -> str | None:
    """Why `name:r<rank>` cannot be served (None when it can)."""
    if kind not in NESTED_KINDS:
        return f"`{name}:r{rank}`: nested ranks apply to LoRA adapters only; {name!r} is of kind {kind}"
    if rank < 1:
        return f"`{name}:r{rank}`: a nested rank must be at least 1"
    if rank > max_rank:
        return f"`{name}:r{rank}`: rank {rank} is larger than the adapter's rank {max_rank}"
    return None

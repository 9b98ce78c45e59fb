"""The host tier keeps LoRA pairs in 16 bits where that changes nothing the pool receives
(adapters/host_copy.py): the pool's contents after a copy equal those written from the parsed
float32 adapter, bit for bit, for each serving dtype, and the host bytes halve for 16-bit files."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slserve.adapters.host_copy import host_copy
from slserve.memory.adapter_layout import RankWeights, group_columns, lay_out, layer_elems, write_adapter
from tests.test_scheduler_properties import ALL, MODEL, make_adapter


def pool_contents(adapter, dtype: torch.dtype) -> torch.Tensor:
    """The pool elements one adapter's copy writes, laid out from element 0."""
    shapes = MODEL.module_shapes()
    ranks = [{m: w.rank for (layer, m), w in adapter.modules.items() if layer == i}
             for i in range(MODEL.num_layers)]
    offsets, off = [], 0
    for r in ranks:
        offsets.append(off)
        off += layer_elems(r, shapes)
    layout = lay_out(ranks, shapes, group_columns(MODEL), offsets)
    flat = torch.zeros(off, dtype=dtype)
    write_adapter(flat, layout, RankWeights({k: (w.a, w.b, w.scale) for k, w in adapter.modules.items()}, {}))
    return flat


def rounded_to(adapter, dtype: torch.dtype):
    """The adapter as parsed from a file saved in `dtype`: float32 values that dtype holds exactly."""
    modules = {k: dataclasses.replace(w, a=w.a.to(dtype).float(), b=w.b.to(dtype).float())
               for k, w in adapter.modules.items()}
    return dataclasses.replace(adapter, modules=modules)


@pytest.mark.parametrize("serving", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("saved", [torch.float32, torch.bfloat16, torch.float16])
def test_pool_receives_the_same_values(serving, saved):
    parsed = make_adapter("x", 4, ALL, seed=3)
    if saved is not torch.float32:
        parsed = rounded_to(parsed, saved)
    kept = host_copy(parsed, serving)
    assert torch.equal(pool_contents(kept, serving), pool_contents(parsed, serving))
    pair_bytes = sum(w.a.nbytes + w.b.nbytes for w in parsed.modules.values())
    kept_bytes = sum(w.a.nbytes + w.b.nbytes for w in kept.modules.values())
    assert kept.nbytes == parsed.nbytes - pair_bytes + kept_bytes
    if saved is not torch.float32:  # a 16-bit file: every pair in 16 bits on the host
        assert kept_bytes * 2 == pair_bytes
        assert all(w.a.dtype == saved == w.b.dtype or serving in (torch.bfloat16, torch.float16)
                   for w in kept.modules.values())
    elif serving is torch.float32:  # float32 values no 16-bit dtype holds: unchanged
        assert kept_bytes == pair_bytes
    else:  # A rounds as the pool rounds it; B keeps float32 for the pool's round(scale * B)
        assert all(w.a.dtype == serving and w.b.dtype == torch.float32 for w in kept.modules.values())

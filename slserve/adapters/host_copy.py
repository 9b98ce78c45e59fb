"""The host tier's copy of an adapter: each LoRA pair in the narrowest dtype that gives the pool
exactly the values it would get from the parsed float32 copy.

Converters work in float32 (adapters/checks.py: to_float32), but most adapters are saved in
bfloat16 or float16, and the pool holds them in the serving dtype. So a tensor whose float32
values a 16-bit dtype holds exactly is kept in that dtype (half the host RAM, the same pool
values), and otherwise:
- serving in float32: the tensor stays float32;
- serving in a 16-bit dtype: A is rounded to it now (the pool copy rounds it the same way);
  B stays float32, because the pool receives round(scale * B), which rounding B first could
  change.
"""

from __future__ import annotations

import dataclasses

import torch

from slserve.adapters.weights import LoRAAdapter, tensor_bytes

NARROW = (torch.bfloat16, torch.float16)


def _exact(t: torch.Tensor) -> torch.Tensor:
    for dtype in NARROW:
        narrow = t.to(dtype)
        if torch.equal(narrow.to(t.dtype), t):
            return narrow
    return t


def host_copy(adapter: LoRAAdapter, serving_dtype: torch.dtype) -> LoRAAdapter:
    def narrow_a(a: torch.Tensor) -> torch.Tensor:
        return a.to(serving_dtype) if serving_dtype in NARROW else _exact(a)

    modules = {key: dataclasses.replace(w, a=narrow_a(w.a), b=_exact(w.b))
               for key, w in adapter.modules.items()}
    before = tensor_bytes(*(t for w in adapter.modules.values() for t in (w.a, w.b)))
    after = tensor_bytes(*(t for w in modules.values() for t in (w.a, w.b)))
    return dataclasses.replace(adapter, modules=modules, nbytes=adapter.nbytes - before + after)

"""A step's LoRA state on adapters made resident by the device tier, against the host weights.

DeviceAdapterCache lays adapters out in the pool and writes their slot tables; LoRABatch (torch
and C++) and TritonLoRABatch turn those into kernel arguments. Each is checked, for every layer
and group, against y += scale * (x @ A^T) @ B^T computed per token from the host-side weights,
with adapters that target different module subsets and ranks so that a group's expands are not
always all present. The Triton kernels run in the interpreter when there is no GPU. Nested-rank views and
output scales are checked the same way against their formulas.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slserve.adapters.peft_format import LoRAAdapter, LoRAWeights, OutputScale
from slserve.config import ModelConfig
from slserve.kernels.cpu_ext import lora_apply_op
from slserve.lora_batch import LoRABatch, TritonLoRABatch
from slserve.memory.adapter_layout import GROUPS, group_columns, write_adapter
from slserve.memory.adapter_pages import DeviceAdapterCache
from slserve.memory.pool import PagePool
from slserve.parallel import Shard
from slserve.runner import rank_weights

MODEL = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64,
    tie_word_embeddings=False, qkv_bias=False, eos_token_ids=(0,), bos_token_id=None,
)
# name -> (rank, modules): k_proj alone, q and v without k, gate without up, everything.
ADAPTERS = {
    "k-only": (3, ("k_proj",)),
    "q-v": (8, ("q_proj", "v_proj", "down_proj")),
    "gate": (5, ("gate_proj", "o_proj")),
    "all": (4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


def make_adapter(name: str, seed: int) -> LoRAAdapter:
    rank, modules = ADAPTERS[name]
    g = torch.Generator().manual_seed(seed)
    shapes = MODEL.module_shapes()
    weights = {}
    for layer in range(MODEL.num_layers):
        for mod in modules:
            n_in, n_out = shapes[mod]
            weights[(layer, mod)] = LoRAWeights(a=torch.randn(rank, n_in, generator=g),
                                                b=torch.randn(n_out, rank, generator=g), scale=0.5 + seed)
    return LoRAAdapter(name=name, modules=weights, target_modules=modules, ranks=dict.fromkeys(modules, rank),
                       nbytes=0, config={})


def group_out(group: str) -> int:
    shapes = MODEL.module_shapes()
    return sum(shapes[m][1] for m in GROUPS[group])


def naive(y, x, segments, layer: int, group: str) -> torch.Tensor:
    out = y.double().clone()
    columns, shapes = group_columns(MODEL), MODEL.module_shapes()
    for s0, s1, dev in segments:
        for mod in GROUPS[group]:
            w = dev.adapter.modules.get((layer, mod))
            if w is None:
                continue
            delta = w.scale * (x[s0:s1].double() @ w.a.double().t()) @ w.b.double().t()
            out[s0:s1, columns[mod] : columns[mod] + shapes[mod][1]] += delta
    return out


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def resident():
    """Four adapters resident in one float32 pool (NaN elsewhere), and segments with gaps."""
    host = {name: make_adapter(name, i) for i, name in enumerate(ADAPTERS)}
    pool = PagePool(num_pages=64, page_elems=256, itemsize=4)
    flat = torch.full((64 * 256,), float("nan"))
    cache = DeviceAdapterCache(pool, MODEL, host.__getitem__)
    devs = [cache.acquire(name) for name in ADAPTERS]
    for cmd in cache.take_commands():  # what a model runner does with the step's load commands
        write_adapter(flat, cmd.layout, rank_weights(cmd.adapter, Shard().module_ranges(MODEL)))
    # Token rows: 1 and 3 and 2 and 4 tokens, with rows that use no adapter in between.
    segments, t = [], 0
    for dev, n in zip(devs, (1, 3, 2, 4), strict=True):
        t += 1
        segments.append((t, t + n, dev))
        t += n
    yield flat, segments, t + 1
    cache.close()


def step_states(flat, segments):
    bounds = [(s0, s1) for s0, s1, _ in segments]
    tables = [dev.layout.view() for _, _, dev in segments]
    states = {"torch": LoRABatch(bounds, tables, flat)}
    if lora_apply_op() is not None:
        states["cpp"] = LoRABatch(bounds, tables, flat, lora_apply_op())
    columns, shapes = group_columns(MODEL), MODEL.module_shapes()
    # On a GPU the Triton state reads a device copy of the pool (same offsets); elsewhere the
    # interpreter reads the CPU pool itself.
    states["triton"] = TritonLoRABatch(bounds, tables, flat.to(TRITON_DEVICE), columns,
                                       {m: o for m, (_, o) in shapes.items()})
    return states


@pytest.mark.parametrize("group", list(GROUPS))
def test_step_state_matches_host_weights(resident, group):
    flat, segments, T = resident
    n_in = MODEL.module_shapes()[GROUPS[group][0]][0]
    g = torch.Generator().manual_seed(1)
    for name, state in step_states(flat, segments).items():
        for layer in range(MODEL.num_layers):
            x = torch.randn(T, n_in, generator=g)
            y = torch.randn(T, group_out(group), generator=g)
            expected = naive(y, x, segments, layer, group)
            device = TRITON_DEVICE if name == "triton" else "cpu"
            y = y.to(device)
            state.apply(y, x.to(device), layer, group)
            torch.testing.assert_close(y.cpu().double(), expected, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, name=name, layer=layer: f"{name}, layer {layer}: {m}")


def with_scales(adapter: LoRAAdapter, seed: int) -> LoRAAdapter:
    """The adapter plus an output scale on q_proj (with a shift, as DoRA on a biased module) and on
    down_proj (a row-parallel module) of every layer."""
    g = torch.Generator().manual_seed(seed)
    shapes = MODEL.module_shapes()
    scales = {}
    for layer in range(MODEL.num_layers):
        for mod in ("q_proj", "down_proj"):
            out = shapes[mod][1]
            shift = torch.randn(out, generator=g) if mod == "q_proj" else None
            vector = 1 + 0.5 * torch.randn(out, generator=g)
            scales[(layer, mod)] = OutputScale(vector, scales_bias=False, weight_norm=False, shift=shift)
    return dataclasses.replace(adapter, name="scaled", output_scales=scales)


NESTED_RANK = 2


def naive_kinds(y, x, segments, layer: int, group: str) -> torch.Tensor:
    """Per segment (start, end, adapter, K): y += r / K * scale * (x A[:K]^T) B[:, :K]^T (K = 0:
    the full rank), then y = s * y + shift on the scaled modules' columns."""
    out = y.double().clone()
    columns, shapes = group_columns(MODEL), MODEL.module_shapes()
    for s0, s1, adapter, k in segments:
        for mod in GROUPS[group]:
            cols = slice(columns[mod], columns[mod] + shapes[mod][1])
            w = adapter.modules.get((layer, mod))
            if w is not None:
                r = min(k, w.rank) if k else w.rank
                a, b = w.a[:r].double(), w.b[:, :r].double()
                out[s0:s1, cols] += w.scale * w.rank / r * (x[s0:s1].double() @ a.t()) @ b.t()
            s = adapter.output_scales.get((layer, mod))
            if s is not None:
                shift = 0 if s.shift is None else s.shift.double()
                out[s0:s1, cols] = out[s0:s1, cols] * s.vector.double() + shift
    return out


@pytest.mark.parametrize("group", list(GROUPS))
def test_nested_ranks_and_output_scales_match_host_weights(group):
    """One adapter at its full rank and at a nested rank in the same step, and an adapter with
    output scales, on every path: only their own segments change, by the documented formulas."""
    host = {"all": make_adapter("all", 0), "scaled": with_scales(make_adapter("q-v", 1), 2)}
    pool = PagePool(num_pages=64, page_elems=256, itemsize=4)
    flat = torch.full((64 * 256,), float("nan"))
    cache = DeviceAdapterCache(pool, MODEL, host.__getitem__)
    devs = {name: cache.acquire(name) for name in host}
    for cmd in cache.take_commands():
        write_adapter(flat, cmd.layout, rank_weights(cmd.adapter, Shard().module_ranges(MODEL)))
    segments = [(1, 3, "all", 0), (3, 5, "all", NESTED_RANK), (6, 9, "scaled", 0),
                (9, 10, "all", NESTED_RANK)]
    bounds = [(s0, s1) for s0, s1, _, _ in segments]
    views = [devs[name].layout.view(k) for _, _, name, k in segments]
    assert views[1].factors is not None and views[0].factors is None and views[2].scales is not None
    columns, shapes = group_columns(MODEL), MODEL.module_shapes()
    states = {"torch": LoRABatch(bounds, views, flat),
              "triton": TritonLoRABatch(bounds, views, flat.to(TRITON_DEVICE), columns,
                                        {m: o for m, (_, o) in shapes.items()})}
    if lora_apply_op() is not None:
        states["cpp"] = LoRABatch(bounds, views, flat, lora_apply_op())
    n_in = shapes[GROUPS[group][0]][0]
    g = torch.Generator().manual_seed(3)
    for name, state in states.items():
        for layer in range(MODEL.num_layers):
            x = torch.randn(11, n_in, generator=g)
            y = torch.randn(11, group_out(group), generator=g)
            expected = naive_kinds(y, x, [(s0, s1, host[a], k) for s0, s1, a, k in segments], layer, group)
            device = TRITON_DEVICE if name == "triton" else "cpu"
            y = y.to(device)
            state.apply(y, x.to(device), layer, group)
            torch.testing.assert_close(y.cpu().double(), expected, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, name=name, layer=layer: f"{name}, layer {layer}: {m}")
    cache.close()

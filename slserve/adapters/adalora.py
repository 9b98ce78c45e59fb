"""AdaLoRA (peft_type ADALORA) folded into low-rank pairs at load.

PEFT's SVDLinear computes, per module,

    y = x @ W^T + (x @ (A * E)^T @ B^T) * scaling / (ranknum + 1e-5)
    A: [r, in] right singular vectors, E: [r, 1] singular values, B: [out, r] left singular vectors
    scaling = lora_alpha (r when lora_alpha <= 0); ranknum = init_r (or the saved ranknum tensor)

so a = A * E (E folded into A's rows), b = B, scale = scaling / (ranknum + 1e-5) is exact. r is
init_r, or for a module in rank_pattern the number of triplets its mask keeps: training prunes
triplets by zeroing E, and save_pretrained drops the masked rows. Triplets whose E is zero add
nothing and are dropped too, so the served rank is the rank left after pruning; a module pruned
to rank 0 gets no pair.
"""

from __future__ import annotations

import re

import torch

from slserve.adapters.checks import check_gain, check_pair, max_gain, to_float32
from slserve.adapters.fields import ConfigFields, is_number
from slserve.adapters.lora import describe_foreign_key, refuse_unsupported_fields
from slserve.adapters.norms import take_saved_norms
from slserve.adapters.targets import (
    BLOCK_OF,
    TargetSpec,
    group_module_tensors,
    param_key_pattern,
    require_params,
    where,
)
from slserve.adapters.weights import WEIGHTS_FILE, LoRAAdapter, LoRAWeights, adapter_error, build_adapter
from slserve.config import ModelConfig

_TRIPLET = ("lora_A", "lora_E", "lora_B")
_KEYS = param_key_pattern({**{p: r"(?:\.[^.]+)?" for p in _TRIPLET}, "ranknum": r"(?:\.[^.]+)?"})
# rank_pattern keys name a module's lora_E as the rank allocator saw it, e.g.
# model.layers.0.self_attn.q_proj.lora_E
_MASK_KEY = re.compile(
    r"^(?P<path>model\.layers\.(?P<layer>\d+)\.(?P<block>[^.]+)\.(?P<module>[^.]+))\.lora_E(?:\.[^.]+)?$"
)
_RANKNUM_EPS = 1e-5  # PEFT's SVDLinear divides by ranknum + 1e-5


def convert_adalora(config: dict, tensors: dict[str, torch.Tensor], model: ModelConfig, max_rank: int,
                    name: str) -> LoRAAdapter:
    fields = ConfigFields(config, name)
    if fields.get("use_dora"):
        raise fields.bad("use_dora is not supported with AdaLoRA (PEFT refuses it too)")
    refuse_unsupported_fields(fields)
    init_r = fields.positive_int("init_r", 12)
    alpha = fields.number("lora_alpha", 8)
    bias = fields.choice("bias", "none", ("none", "all", "lora_only"))
    spec = TargetSpec(fields, model)
    masks = _rank_masks(fields, spec, init_r)

    tensors = dict(tensors)
    norms, final_norm = take_saved_norms(fields, tensors, model)
    groups = group_module_tensors(tensors, _KEYS, spec, name, lambda k: describe_foreign_key(k, bias))
    shapes = model.module_shapes()
    bound = max_gain(model)

    modules: dict[tuple[int, str], LoRAWeights] = {}
    present: set[str] = set()
    for (layer, module), (path, found) in sorted(groups.items()):
        at = where(layer, module)
        a, e, b = require_params(found, _TRIPLET, at, name)
        r = sum(masks[path]) if path in masks else init_r
        _check_triplet(a, e, b, r, shapes[module], at, name)
        a = to_float32(a, at + ".lora_A", name)
        e = to_float32(e, at + ".lora_E", name)
        b = to_float32(b, at + ".lora_B", name)
        ranknum = _ranknum(found.get("ranknum"), init_r, at, name)
        present.add(module)
        keep = e[:, 0] != 0
        if not bool(keep.any()):
            continue  # pruned to rank 0: the module adds nothing
        a, b = (a * e)[keep].contiguous(), b[:, keep].contiguous()
        check_pair(a, b, shapes[module], max_rank, at, name)
        scale = (alpha if alpha > 0 else r) / (ranknum + _RANKNUM_EPS)
        check_gain(a, b, scale, bound, at, name)
        modules[(layer, module)] = LoRAWeights(a=a, b=b, scale=float(scale))

    if not present:
        raise adapter_error(name, f"{WEIGHTS_FILE} contains no AdaLoRA tensors (missing tensors)")
    if not modules:
        raise adapter_error(
            name, "every AdaLoRA triplet has lora_E = 0 (pruned or never trained); the adapter does nothing"
        )
    spec.check_all_present(present)
    return build_adapter(name, config, "ADALORA", modules, present, norms=norms, final_norm=final_norm)


def _rank_masks(fields: ConfigFields, spec: TargetSpec, init_r: int) -> dict[str, list[bool]]:
    """Module key -> the mask of triplets its rank allocator kept (rank_pattern)."""
    pattern = fields.get("rank_pattern")
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise fields.bad(f"rank_pattern must be an object of masks, got {pattern!r}")
    masks: dict[str, list[bool]] = {}
    for key, mask in pattern.items():
        match = _MASK_KEY.match(key)
        path = match.group("path") if match else ""
        in_block = match is not None and BLOCK_OF.get(match.group("module")) == match.group("block")
        if not (in_block and spec.targets(path)):
            raise fields.bad(f"rank_pattern key {key!r} is not the lora_E of a module this adapter targets")
        if int(match.group("layer")) >= spec.num_layers:
            raise fields.bad(f"rank_pattern key {key!r}: layer index out of range")
        if not (isinstance(mask, list) and len(mask) == init_r and all(isinstance(m, bool) for m in mask)):
            raise fields.bad(
                f"rank_pattern[{key!r}] must be a list of init_r={init_r} booleans, got {mask!r}"
            )
        if match.group("path") in masks:
            raise fields.bad(f"rank_pattern names {match.group('path')} twice")
        masks[match.group("path")] = mask
    return masks


def _check_triplet(a: torch.Tensor, e: torch.Tensor, b: torch.Tensor, r: int, in_out: tuple[int, int],
                   at: str, name: str) -> None:
    in_features, out_features = in_out
    expected = {"lora_A": (r, in_features), "lora_E": (r, 1), "lora_B": (out_features, r)}
    got = {"lora_A": tuple(a.shape), "lora_E": tuple(e.shape), "lora_B": tuple(b.shape)}
    if got != expected:
        shapes = " / ".join(f"{k} {list(v)}" for k, v in got.items())
        wanted = " / ".join(str(list(v)) for v in expected.values())
        raise adapter_error(
            name,
            f"{at}: shapes {shapes} do not fit (expected {wanted}: r={r} from init_r and rank_pattern, "
            "in/out from the base model)",
        )


def _ranknum(t: torch.Tensor | None, init_r: int, at: str, name: str) -> float:
    """The saved ranknum (older PEFT versions write it), else init_r as PEFT sets it."""
    if t is None:
        return float(init_r)
    if t.numel() != 1:
        raise adapter_error(name, f"{at}.ranknum has shape {list(t.shape)}; a single number is required")
    value = float(to_float32(t, at + ".ranknum", name).reshape(()))
    if not (is_number(value) and value > 0):
        raise adapter_error(name, f"{at}.ranknum must be positive, got {value}")
    return value

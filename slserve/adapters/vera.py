"""VeRA (peft_type VERA) folded into low-rank pairs at load.

VeRA shares two frozen random projections across all adapted modules, vera_A: [r, max_in] and
vera_B: [max_out, r], and trains two vectors per module. PEFT's vera.Linear computes

    y = x @ W^T + lambda_b * ((lambda_d * (x @ vera_A[:, :in]^T)) @ vera_B[:out, :]^T)

so a = lambda_d[:, None] * vera_A[:, :in], b = lambda_b[:, None] * vera_B[:out, :], scale 1 is
exact. The projections must be in the file (save_projection=true, PEFT's default): without them
PEFT regenerates them from projection_prng_key with torch's random generator, which the server
does not reproduce, so such adapters are refused.
"""

from __future__ import annotations

import torch

from slserve.adapters.checks import check_gain, check_pair, check_shape, max_gain, to_float32
from slserve.adapters.fields import ConfigFields
from slserve.adapters.lora import describe_foreign_key
from slserve.adapters.norms import take_saved_norms
from slserve.adapters.targets import (
    TargetSpec,
    group_module_tensors,
    param_key_pattern,
    require_params,
    where,
)
from slserve.adapters.weights import WEIGHTS_FILE, LoRAAdapter, LoRAWeights, adapter_error, build_adapter
from slserve.config import ModelConfig

_LAMBDAS = ("vera_lambda_d", "vera_lambda_b")
_KEYS = param_key_pattern({p: r"(?:\.[^.]+)?" for p in _LAMBDAS})
_PROJECTIONS = ("vera_A", "vera_B")


def convert_vera(config: dict, tensors: dict[str, torch.Tensor], model: ModelConfig, max_rank: int,
                 name: str) -> LoRAAdapter:
    fields = ConfigFields(config, name)
    r = fields.positive_int("r", 256)
    bias = fields.choice("bias", "none", ("none", "all", "vera_only"))
    spec = TargetSpec(fields, model)
    tensors = dict(tensors)
    if not fields.flag("save_projection", True):
        raise fields.bad(
            "save_projection is false: the shared VeRA projections (vera_A, vera_B) are not saved with "
            "the adapter, and PEFT would regenerate them from projection_prng_key with torch's random "
            "generator, which the server does not reproduce; save the adapter with save_projection=True"
        )
    vera_a, vera_b = (_take_projection(tensors, p, name) for p in _PROJECTIONS)
    norms, final_norm = take_saved_norms(fields, tensors, model)
    groups = group_module_tensors(tensors, _KEYS, spec, name, lambda k: describe_foreign_key(k, bias))
    shapes = model.module_shapes()
    _check_projections(vera_a, vera_b, r, [shapes[m] for _, m in groups], name)
    bound = max_gain(model)

    modules: dict[tuple[int, str], LoRAWeights] = {}
    for (layer, module), (_, found) in sorted(groups.items()):
        at = where(layer, module)
        in_features, out_features = shapes[module]
        lambda_d, lambda_b = require_params(found, _LAMBDAS, at, name)
        check_shape(lambda_d, (r,), f"{at}.vera_lambda_d", name)
        check_shape(lambda_b, (out_features,), f"{at}.vera_lambda_b", name)
        lambda_d = to_float32(lambda_d, f"{at}.vera_lambda_d", name)
        lambda_b = to_float32(lambda_b, f"{at}.vera_lambda_b", name)
        a = (lambda_d[:, None] * vera_a[:, :in_features]).contiguous()
        b = (lambda_b[:, None] * vera_b[:out_features, :]).contiguous()
        check_pair(a, b, shapes[module], max_rank, at, name, names=("vera_A", "vera_B"))
        check_gain(a, b, 1.0, bound, at, name)
        modules[(layer, module)] = LoRAWeights(a=a, b=b, scale=1.0)

    if not modules:
        raise adapter_error(name, f"{WEIGHTS_FILE} contains no VeRA vectors (missing tensors)")
    adapted = {m for _, m in modules}
    spec.check_all_present(adapted)
    return build_adapter(name, config, "VERA", modules, adapted, norms=norms, final_norm=final_norm)


def _take_projection(tensors: dict[str, torch.Tensor], projection: str, name: str) -> torch.Tensor:
    # Saved as base_model.vera_A; PEFT's in-memory name adds the adapter name.
    key = f"base_model.{projection}"
    keys = [k for k in tensors if k == key or k.startswith(key + ".")]
    if not keys:
        raise adapter_error(
            name,
            f"{WEIGHTS_FILE} has no base_model.{projection} tensor: the shared VeRA projection is missing "
            "(missing tensor); save the adapter with save_projection=True",
        )
    if len(keys) > 1:
        raise adapter_error(name, f"duplicate VeRA projections: {sorted(keys)}")
    return to_float32(tensors.pop(keys[0]), projection, name)


def _check_projections(vera_a: torch.Tensor, vera_b: torch.Tensor, r: int, in_outs: list[tuple[int, int]],
                       name: str) -> None:
    """vera_A: [r, >= every adapted in_features], vera_B: [>= every out_features, r], as PEFT slices them."""
    max_in = max((i for i, _ in in_outs), default=0)
    max_out = max((o for _, o in in_outs), default=0)
    ok_a = vera_a.ndim == 2 and vera_a.shape[0] == r and vera_a.shape[1] >= max_in
    ok_b = vera_b.ndim == 2 and vera_b.shape[1] == r and vera_b.shape[0] >= max_out
    if not (ok_a and ok_b):
        raise adapter_error(
            name,
            f"the VeRA projections have shapes vera_A {list(vera_a.shape)} / vera_B "
            f"{list(vera_b.shape)}, but r={r} and the adapted modules need at least [{r}, {max_in}] / "
            f"[{max_out}, {r}] (wrong shape)",
        )

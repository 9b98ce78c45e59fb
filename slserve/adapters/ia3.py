"""IA3 (peft_type IA3) into per-module output scales.

PEFT's IA3 Linear scales a module's output, y = (x @ W^T + bias) * l (ia3_l: [out, 1]), or, for
a feed-forward module, its input, y = (x * l) @ W^T (ia3_l: [1, in]). The feed-forward module of
Llama-family models is down_proj, whose input is silu(gate) * up: scaling it equals scaling
up_proj's output, so it is kept as an output scale of up_proj (multiplied into up_proj's own IA3
scale when there is one). An input scale on any other module is refused.
"""

from __future__ import annotations

import re

import torch

from slserve.adapters.checks import check_scale_bound, check_shape, max_gain, to_float32
from slserve.adapters.fields import ConfigFields
from slserve.adapters.norms import take_saved_norms
from slserve.adapters.targets import (
    TargetSpec,
    group_module_tensors,
    param_key_pattern,
    require_params,
    where,
)
from slserve.adapters.weights import WEIGHTS_FILE, LoRAAdapter, OutputScale, adapter_error, build_adapter
from slserve.config import ModelConfig

_KEYS = param_key_pattern({"ia3_l": r"(?:\.[^.]+)?"})
# PEFT's default feedforward_modules for Llama, Mistral and Qwen2
# (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING).
_DEFAULT_FEEDFORWARD = ["down_proj"]


def convert_ia3(config: dict, tensors: dict[str, torch.Tensor], model: ModelConfig, max_rank: int,
                name: str) -> LoRAAdapter:
    fields = ConfigFields(config, name)
    spec = TargetSpec(fields, model)
    feedforward = fields.str_or_list("feedforward_modules", required=False) or _DEFAULT_FEEDFORWARD
    tensors = dict(tensors)
    norms, final_norm = take_saved_norms(fields, tensors, model)
    groups = group_module_tensors(tensors, _KEYS, spec, name, lambda k: f"unexpected tensor key {k!r}")
    shapes = model.module_shapes()
    bound = max_gain(model)

    scales: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, module), (path, found) in sorted(groups.items()):
        at = where(layer, module)
        (l_vec,) = require_params(found, ("ia3_l",), at, name)
        in_features, out_features = shapes[module]
        if _is_feedforward(feedforward, path):
            if module != "down_proj":
                raise adapter_error(
                    name,
                    f"{at}: an IA3 feed-forward (input) scale on {module!r} is not supported; only "
                    "down_proj's input is (it equals a scale of up_proj's output)",
                )
            check_shape(l_vec, (1, in_features), f"{at}.ia3_l", name)
            target = (layer, "up_proj")
        else:
            check_shape(l_vec, (out_features, 1), f"{at}.ia3_l", name)
            target = (layer, module)
        vector = to_float32(l_vec, f"{at}.ia3_l", name).flatten()
        scales[target] = scales[target] * vector if target in scales else vector

    if not scales:
        raise adapter_error(name, f"{WEIGHTS_FILE} contains no IA3 vectors (missing tensors)")
    present = {m for _, m in groups}
    spec.check_all_present(present)
    for (layer, module), vector in scales.items():
        check_scale_bound(vector, bound, f"{where(layer, module)} (IA3)", name)
    output_scales = {
        key: OutputScale(vector=v, scales_bias=True, weight_norm=False) for key, v in sorted(scales.items())
    }
    return build_adapter(name, config, "IA3", {}, present, output_scales, norms, final_norm=final_norm)


def _is_feedforward(feedforward: str | list[str], key: str) -> bool:
    """peft IA3Model._check_target_module_feedforward."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, key) is not None
    return any(key.endswith(f) for f in feedforward)

"""Which decoder modules a PEFT config adapts, and its tensors grouped by (layer, module).

The matching follows PEFT's check_target_module_exists literally (target_modules, exclude_modules,
layers_to_transform, layers_pattern), which every PEFT kind that adapts linear layers shares, so
the server adapts exactly the modules PEFT would.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from slserve.adapters.fields import ConfigFields, is_int
from slserve.adapters.weights import BLOCK_OF, CONFIG_FILE, TARGET_MODULES, WEIGHTS_FILE, adapter_error
from slserve.config import ModelConfig

# Modules of a Llama model that a config may name but the server does not adapt; listing them
# lets a regex target_modules be checked against the whole model, not only the supported part.
TOP_KEYS = ("model.embed_tokens", "lm_head", "model.norm", "model.rotary_emb")
LAYER_KEYS = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp", "mlp.act_fn")

_LAYER_PATH = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>[^.]+)\.(?P<module>[^.]+)$")


def module_key(layer: int, module: str) -> str:
    """The model-relative key of a target module, as PEFT names it."""
    return f"model.layers.{layer}.{BLOCK_OF[module]}.{module}"


def where(layer: int, module: str) -> str:
    """A module as messages name it."""
    return f"layers.{layer}.{BLOCK_OF[module]}.{module}"


class TargetSpec:
    """The parts of a config that decide which modules are adapted."""

    def __init__(self, fields: ConfigFields, model: ModelConfig) -> None:
        self.fields = fields
        self.num_layers = model.num_layers
        self.layers_to_transform = fields.int_or_ints("layers_to_transform")
        self.layers_pattern = fields.str_or_list("layers_pattern", required=False)
        self.exclude_modules = fields.str_or_list("exclude_modules", required=False)
        self.target_modules = fields.str_or_list("target_modules", required=True)
        self._check_targets()

    # -- PEFT's matching rules, kept literal so the server adapts exactly what PEFT would --------

    def _excluded(self, key: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, key) is not None
        return key in ex or any(key.endswith(f".{e}") for e in ex)

    def _layer_ok(self, key: str) -> bool:
        if self.layers_to_transform is None or self.layers_to_transform == []:
            return True
        match = None
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            for pattern in patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        if is_int(self.layers_to_transform):
            return idx == self.layers_to_transform
        return idx in self.layers_to_transform

    def targets(self, key: str) -> bool:
        """peft.tuners.tuners_utils.check_target_module_exists for a model-relative module key."""
        if self._excluded(key):
            return False
        tm = self.target_modules
        if isinstance(tm, str):
            return re.fullmatch(tm, key) is not None
        if key in tm:
            return True
        return any(key.endswith(f".{t}") for t in tm) and self._layer_ok(key)

    # -- which modules the config names ----------------------------------------------------------

    def _supported_keys(self) -> dict[str, tuple[int, str]]:
        return {module_key(i, m): (i, m) for i in range(self.num_layers) for m in TARGET_MODULES}

    def _unsupported_keys(self) -> list[str]:
        layer_keys = [f"model.layers.{i}.{k}" for i in range(self.num_layers) for k in LAYER_KEYS]
        return [*TOP_KEYS, *layer_keys]

    def _check_targets(self) -> None:
        supported = self._supported_keys()
        unsupported = self._unsupported_keys()
        allowed = ", ".join(TARGET_MODULES)
        # A regex is judged as a whole; list entries one by one, so the message names the culprit.
        if isinstance(self.target_modules, str):
            entries = {self.target_modules: self.targets}
        else:
            entries = {t: lambda k, t=t: k == t or k.endswith(f".{t}") for t in self.target_modules}
        for entry, matches in entries.items():
            bad = [k for k in unsupported if matches(k)]
            if bad:
                raise self.fields.bad(
                    f"target_modules {entry!r} targets {bad[0].rsplit('.', 1)[-1]!r}, which the server "
                    f"does not support (supported: {allowed})"
                )
            if not any(matches(k) for k in supported):
                raise self.fields.bad(
                    f"target_modules {entry!r} is not a module the server supports (supported: {allowed})"
                )

    def declared_modules(self) -> list[str]:
        """Module names the config adapts in at least one layer, in TARGET_MODULES order."""
        names = {m for key, (_, m) in self._supported_keys().items() if self.targets(key)}
        return [m for m in TARGET_MODULES if m in names]

    def check_all_present(self, present: set[str]) -> None:
        """Refuse a config that declares a module the weights file has no tensors for."""
        silent = [m for m in self.declared_modules() if m not in present]
        if silent:
            raise adapter_error(
                self.fields.name,
                f"target module {silent[0]!r} is declared in {CONFIG_FILE} but {WEIGHTS_FILE} has no "
                "tensors for it (missing tensors)",
            )


def param_key_pattern(params: dict[str, str]) -> re.Pattern[str]:
    """Tensor keys `[base_model.model.]<module path>.<param><suffix>`; params: name -> suffix regex
    (an optional adapter-name segment, a `.weight`, as the kind's checkpoints write them)."""
    alternatives = "|".join(f"(?P<{p}>{re.escape(p)}{suffix})" for p, suffix in params.items())
    return re.compile(rf"^(?:base_model\.model\.)?(?P<path>.+?)\.(?:{alternatives})$")


ModuleTensors = dict[tuple[int, str], tuple[str, dict[str, torch.Tensor]]]


def group_module_tensors(
    tensors: dict[str, torch.Tensor],
    pattern: re.Pattern[str],
    spec: TargetSpec,
    name: str,
    describe_foreign: Callable[[str], str],
) -> ModuleTensors:
    """(layer, module) -> (model-relative module key, {param: tensor}) for every key `pattern`
    matches; any other key is refused with describe_foreign(key)."""
    params = [p for p in pattern.groupindex if p != "path"]
    groups: ModuleTensors = {}
    for key in sorted(tensors):
        match = pattern.match(key)
        if match is None:
            raise adapter_error(name, describe_foreign(key))
        path = match.group("path")
        param = next(p for p in params if match.group(p) is not None)
        module = path.rsplit(".", 1)[-1]
        if module not in TARGET_MODULES:
            raise adapter_error(
                name,
                f"tensor {key!r} targets {module!r}, which the server does not support "
                f"(supported: {', '.join(TARGET_MODULES)})",
            )
        loc = _LAYER_PATH.match(path)
        if loc is None or loc.group("block") != BLOCK_OF[module] or loc.group("module") != module:
            raise adapter_error(name, f"unexpected tensor key {key!r} (not a decoder-layer {module})")
        layer = int(loc.group("layer"))
        if layer >= spec.num_layers:
            raise adapter_error(
                name,
                f"tensor {key!r}: layer index {layer} is out of range (the base model has "
                f"{spec.num_layers} layers)",
            )
        if not spec.targets(path):
            raise adapter_error(name, f"tensor {key!r} is for a module that {CONFIG_FILE} does not target")
        stored_path, found = groups.setdefault((layer, module), (path, {}))
        if param in found or stored_path != path:
            raise adapter_error(
                name, f"duplicate tensors for {where(layer, module)} (unexpected tensor key {key!r})"
            )
        found[param] = tensors[key]
    return groups


def require_params(
    found: dict[str, torch.Tensor], params: tuple[str, ...], at: str, name: str
) -> list[torch.Tensor]:
    """The tensors of `params` in order; a missing one is refused, naming what is there."""
    missing = [p for p in params if p not in found]
    if missing:
        have = " and ".join(p for p in params if p in found)
        has = f"has {have} but no" if have else "has no"
        raise adapter_error(name, f"{at} {has} {missing[0]} tensor (missing tensor)")
    return [found[p] for p in params]

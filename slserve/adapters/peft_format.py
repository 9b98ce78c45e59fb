"""Parse and validate a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

Everything a client can upload passes through here, so every refusal is an AdapterError whose
message names the adapter and the reason, and nothing that reaches the engine can mis-shape a
kernel call. What is accepted is plain LoRA on the seven Llama linear layers:

    y = x @ W^T + scale * (x @ A^T) @ B^T      A: [r, in], B: [out, r]
    scale = alpha / r   (alpha / sqrt(r) with use_rslora)

r and alpha per module are resolved from rank_pattern / alpha_pattern with PEFT's own rule
(peft.utils.other.get_pattern_key), and which modules a config targets follows PEFT's
check_target_module_exists, so the server applies exactly what PEFT would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from slserve.config import ModelConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Pickle checkpoints run arbitrary code on load; they are refused, never opened.
PICKLE_FILES = ("adapter_model.bin",)

# The LoRA target modules the server applies, in layer order, with the block each lives in.
TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
_BLOCK_OF: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# Modules of a Llama model that a config may name but the server does not adapt; listing them
# lets a regex target_modules be checked against the whole model, not only the supported part.
_UNSUPPORTED_TOP_KEYS = ("model.embed_tokens", "lm_head", "model.norm", "model.rotary_emb")
_UNSUPPORTED_LAYER_KEYS = (
    "input_layernorm",
    "post_attention_layernorm",
    "self_attn",
    "mlp",
    "mlp.act_fn",
)

# LoraConfig fields that, when truthy, change the forward pass beyond `y += scale * B A x` or add
# trained parts outside A/B. The variant fields mirror peft's LoraLayer.resolve_lora_variant.
_UNSUPPORTED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA (use_dora=true) is not supported",
    "modules_to_save": "modules_to_save (fully trained copies of base modules) is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "layer_replication": "layer_replication is not supported",
    "lora_bias": "lora_bias (a trained bias on lora_B) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora=true) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
}
# init_lora_weights values that select a LoRA variant (not just an initialisation).
_VARIANT_INITS = ("mica",)
# Initialisations that subtract the initial adapter from the base weights: such an adapter is only
# right on top of that modified base, unless peft converted it when saving (which writes
# init_lora_weights=true), see PeftModel.save_pretrained(path_initial_model_for_weight_conversion).
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$"
)
_LAYER_PATH = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>[^.]+)\.(?P<module>[^.]+)$")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message is shown to the client as is."""


@dataclass(frozen=True, eq=False)
class LoRAWeights:
    """One module's LoRA: y += scale * (x @ a^T) @ b^T."""

    a: torch.Tensor  # [r, in] float32
    b: torch.Tensor  # [out, r] float32
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """A parsed, validated adapter held in host memory."""

    name: str
    modules: dict[tuple[int, str], LoRAWeights]  # (layer index, module name) -> weights
    target_modules: tuple[str, ...]  # module names with weights, in TARGET_MODULES order
    ranks: dict[str, int]  # module name -> max rank over layers
    nbytes: int  # host bytes of all a and b tensors
    config: dict

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())


def _error(name: str, reason: str) -> AdapterError:
    return AdapterError(f"adapter {name!r}: {reason}")


def read_adapter_dir(path: str | os.PathLike, name: str) -> tuple[bytes, bytes]:
    """(config bytes, weights bytes) of an adapter directory, refusing pickle checkpoints.

    Both files are opened relative to one directory descriptor, so a directory renamed away
    mid-read (an adapter being replaced) still yields a consistent pair.
    """
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise _error(name, f"adapter directory {str(path)!r} does not exist") from None
    except NotADirectoryError:
        raise _error(name, f"{str(path)!r} is not a directory") from None
    except OSError as e:
        raise _error(name, f"cannot open the adapter directory: {e}") from None
    try:
        return _read_files(dir_fd, name)
    except OSError as e:
        raise _error(name, f"cannot read the adapter files: {e}") from None
    finally:
        os.close(dir_fd)


def _read_files(dir_fd: int, name: str) -> tuple[bytes, bytes]:
    entries = set(os.listdir(dir_fd))
    pickles = [f for f in PICKLE_FILES if f in entries]
    if pickles:
        raise _error(
            name,
            f"pickle weights ({pickles[0]}) are refused because loading them can run arbitrary "
            f"code; save the adapter with safetensors ({WEIGHTS_FILE})",
        )
    if WEIGHTS_FILE not in entries:
        raise _error(name, f"{WEIGHTS_FILE} is missing (only safetensors weights are accepted)")
    if CONFIG_FILE not in entries:
        raise _error(name, f"{CONFIG_FILE} is missing")
    opener = lambda p, flags: os.open(p, flags, dir_fd=dir_fd)
    with open(CONFIG_FILE, "rb", opener=opener) as f:
        config_bytes = f.read()
    with open(WEIGHTS_FILE, "rb", opener=opener) as f:
        weights_bytes = f.read()
    return config_bytes, weights_bytes


def load_peft_adapter(path: str | os.PathLike, model: ModelConfig, max_rank: int, name: str) -> LoRAAdapter:
    """Load and validate the adapter saved by peft's save_pretrained in directory `path`."""
    config_bytes, weights_bytes = read_adapter_dir(path, name)
    return parse_peft_adapter(config_bytes, weights_bytes, model, max_rank, name)


def parse_peft_adapter(
    config_bytes: bytes, weights_bytes: bytes, model: ModelConfig, max_rank: int, name: str
) -> LoRAAdapter:
    """Validate an adapter given as the bytes of its two files (an upload); raises AdapterError."""
    config = _parse_config_json(config_bytes, name)
    spec = _LoraSpec(config, model, name)
    tensors = _load_tensors(weights_bytes, name)
    pairs = _group_tensors(tensors, spec, model, name)
    shapes = model.module_shapes()

    modules: dict[tuple[int, str], LoRAWeights] = {}
    ranks: dict[str, int] = {}
    nbytes = 0
    for (layer, module), (path, ab) in sorted(pairs.items()):
        where = f"layers.{layer}.{_BLOCK_OF[module]}.{module}"
        if "A" not in ab or "B" not in ab:
            have, lack = ("lora_A", "lora_B") if "A" in ab else ("lora_B", "lora_A")
            raise _error(name, f"{where} has {have} but no {lack} tensor (missing tensor)")
        a, b = ab["A"], ab["B"]
        r = _check_shapes(a, b, shapes[module], max_rank, where, name)
        r_cfg, alpha = spec.rank_and_alpha(path)
        if r != r_cfg:
            raise _error(
                name,
                f"rank mismatch: {where} has rank {r} tensors but adapter_config.json resolves r={r_cfg}",
            )
        a = _to_float32(a, where + ".lora_A", name)
        b = _to_float32(b, where + ".lora_B", name)
        scale = alpha / math.sqrt(r) if spec.use_rslora else alpha / r
        _check_gain(a, b, scale, max_gain(model), where, name)
        modules[(layer, module)] = LoRAWeights(a=a, b=b, scale=float(scale))
        ranks[module] = max(ranks.get(module, 0), r)
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()

    if not modules:
        raise _error(name, f"{WEIGHTS_FILE} contains no LoRA tensors (missing tensors)")
    silent = [m for m in spec.declared_modules() if m not in ranks]
    if silent:
        raise _error(
            name,
            f"target module {silent[0]!r} is declared in {CONFIG_FILE} but {WEIGHTS_FILE} has no "
            "tensors for it (missing tensors)",
        )
    return LoRAAdapter(
        name=name,
        modules=modules,
        target_modules=tuple(m for m in TARGET_MODULES if m in ranks),
        ranks=ranks,
        nbytes=nbytes,
        config=config,
    )


def _parse_config_json(config_bytes: bytes, name: str) -> dict:
    def no_constants(token: str) -> Any:
        # Python's json accepts NaN/Infinity, which would slip a non-finite alpha through.
        raise ValueError(f"{token} is not valid JSON")

    try:
        config = json.loads(config_bytes.decode("utf-8"), parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise _error(name, f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise _error(name, f"{CONFIG_FILE} must hold a JSON object, got {type(config).__name__}")
    return config


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    # An int beyond float range would turn into an infinite scale (and math.isfinite raises on it).
    if _is_int(x):
        return abs(x) < 2**1023
    return isinstance(x, float) and math.isfinite(x)


class _LoraSpec:
    """The parts of a LoraConfig that decide which modules are adapted and with what r / alpha."""

    def __init__(self, config: dict, model: ModelConfig, name: str) -> None:
        self.name = name
        self.num_layers = model.num_layers
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            raise self._bad(f"peft_type {peft_type!r} is not supported (only LORA adapters are served)")
        for field_name, reason in _UNSUPPORTED_FIELDS.items():
            if config.get(field_name):
                raise self._bad(reason)
        if config.get("init_lora_weights") in _VARIANT_INITS:
            raise self._bad(
                f"the LoRA variant init_lora_weights={config['init_lora_weights']!r} is not supported"
            )

        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
            raise self._bad(
                f"init_lora_weights={init!r} adapters only work on a modified base model; convert it "
                "with save_pretrained(path_initial_model_for_weight_conversion=...) first"
            )
        self.r = config.get("r", 8)
        if not _is_int(self.r) or self.r < 1:
            raise self._bad(f"r must be a positive integer, got {self.r!r}")
        self.alpha = config.get("lora_alpha", 8)
        if not _is_number(self.alpha):
            raise self._bad(f"lora_alpha must be a finite number, got {self.alpha!r}")
        self.use_rslora = config.get("use_rslora", False)
        if not isinstance(self.use_rslora, bool):
            raise self._bad(f"use_rslora must be true or false, got {self.use_rslora!r}")
        self.bias = config.get("bias", "none")
        if self.bias not in ("none", "all", "lora_only"):
            raise self._bad(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        self.rank_pattern = self._pattern("rank_pattern", config, lambda v: _is_int(v) and v >= 1)
        self.alpha_pattern = self._pattern("alpha_pattern", config, _is_number)

        self.layers_to_transform = config.get("layers_to_transform")
        ltt = self.layers_to_transform
        if not (ltt is None or _is_int(ltt) or (isinstance(ltt, list) and all(map(_is_int, ltt)))):
            raise self._bad(f"layers_to_transform must be an integer or a list of them, got {ltt!r}")
        self.layers_pattern = config.get("layers_pattern")
        self.exclude_modules = self._str_or_list("exclude_modules", config, required=False)
        self.target_modules = self._str_or_list("target_modules", config, required=True)
        for regex in [self.target_modules, self.exclude_modules, self.layers_pattern]:
            self._check_regexes(regex)
        self._check_targets()

    def _bad(self, reason: str) -> AdapterError:
        return _error(self.name, f"{CONFIG_FILE}: {reason}")

    def _pattern(self, key: str, config: dict, valid_value: Any) -> dict:
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise self._bad(f"{key} must be an object, got {pattern!r}")
        for k, v in pattern.items():
            if not valid_value(v):
                raise self._bad(f"{key}[{k!r}] has an invalid value {v!r}")
            self._check_regexes(k)
        return pattern

    def _str_or_list(self, key: str, config: dict, required: bool) -> str | list[str] | None:
        value = config.get(key)
        if value is None and not required:
            return None
        if isinstance(value, str) or (
            isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        ):
            return value
        raise self._bad(f"{key} must be a regex string or a non-empty list of module names, got {value!r}")

    def _check_regexes(self, patterns: str | Iterable[str] | None) -> None:
        for p in [patterns] if isinstance(patterns, str) else patterns or ():
            try:
                re.compile(p)
            except re.error as e:
                raise self._bad(f"invalid regular expression {p!r}: {e}") from None

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
        if _is_int(self.layers_to_transform):
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

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """peft LoraModel._create_and_replace: the first pattern key matching wins."""
        r_key = _get_pattern_key(self.rank_pattern, key)
        alpha_key = _get_pattern_key(self.alpha_pattern, key)
        return self.rank_pattern.get(r_key, self.r), self.alpha_pattern.get(alpha_key, self.alpha)

    # -- which modules the config names ----------------------------------------------------------

    def _supported_keys(self) -> dict[str, tuple[int, str]]:
        return {
            f"model.layers.{i}.{_BLOCK_OF[m]}.{m}": (i, m)
            for i in range(self.num_layers)
            for m in TARGET_MODULES
        }

    def _unsupported_keys(self) -> list[str]:
        layer_keys = [
            f"model.layers.{i}.{k}" for i in range(self.num_layers) for k in _UNSUPPORTED_LAYER_KEYS
        ]
        return [*_UNSUPPORTED_TOP_KEYS, *layer_keys]

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
                raise self._bad(
                    f"target_modules {entry!r} targets {bad[0].rsplit('.', 1)[-1]!r}, which the server "
                    f"does not support (supported: {allowed})"
                )
            if not any(matches(k) for k in supported):
                raise self._bad(
                    f"target_modules {entry!r} is not a module the server supports (supported: {allowed})"
                )

    def declared_modules(self) -> list[str]:
        """Module names the config adapts in at least one layer, in TARGET_MODULES order."""
        names = {m for key, (_, m) in self._supported_keys().items() if self.targets(key)}
        return [m for m in TARGET_MODULES if m in names]


def _get_pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    """peft.utils.other.get_pattern_key, verbatim semantics."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _load_tensors(weights_bytes: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(weights_bytes)
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise _error(name, f"{WEIGHTS_FILE} is not a valid safetensors file (corrupt): {e}") from None


def _group_tensors(
    tensors: dict[str, torch.Tensor], spec: _LoraSpec, model: ModelConfig, name: str
) -> dict[tuple[int, str], tuple[str, dict[str, torch.Tensor]]]:
    """(layer, module) -> (model-relative module key, {"A": tensor, "B": tensor})."""
    pairs: dict[tuple[int, str], tuple[str, dict[str, torch.Tensor]]] = {}
    for key in sorted(tensors):
        match = _LORA_KEY.match(key)
        if match is None:
            raise _error(name, _describe_foreign_key(key, spec))
        path, ab = match.group("path"), match.group("ab")
        module = path.rsplit(".", 1)[-1]
        if module not in TARGET_MODULES:
            raise _error(
                name,
                f"tensor {key!r} targets {module!r}, which the server does not support "
                f"(supported: {', '.join(TARGET_MODULES)})",
            )
        loc = _LAYER_PATH.match(path)
        if loc is None or loc.group("block") != _BLOCK_OF[module] or loc.group("module") != module:
            raise _error(name, f"unexpected tensor key {key!r} (not a decoder-layer {module})")
        layer = int(loc.group("layer"))
        if layer >= model.num_layers:
            raise _error(
                name,
                f"tensor {key!r}: layer index {layer} is out of range (the base model has "
                f"{model.num_layers} layers)",
            )
        if not spec.targets(path):
            raise _error(name, f"tensor {key!r} is for a module that {CONFIG_FILE} does not target")
        stored_path, ab_tensors = pairs.setdefault((layer, module), (path, {}))
        if ab in ab_tensors or stored_path != path:
            raise _error(
                name,
                f"duplicate tensors for layers.{layer}.{_BLOCK_OF[module]}.{module} "
                f"(unexpected tensor key {key!r})",
            )
        ab_tensors[ab] = tensors[key]
    return pairs


def _describe_foreign_key(key: str, spec: _LoraSpec) -> str:
    """The reason a tensor key is not a LoRA A/B weight, as specific as the key allows."""
    if ".lora_embedding_" in key:
        return f"tensor {key!r} is a LoRA on 'embed_tokens', which the server does not support"
    if ".lora_magnitude_vector" in key:
        return f"tensor {key!r} is a DoRA magnitude vector; DoRA is not supported"
    if ".lora_B." in key and key.endswith(".bias"):
        return f"tensor {key!r} is a lora_B bias (lora_bias), which is not supported"
    if key.endswith(".bias") and spec.bias != "none":
        return (
            f"bias={spec.bias!r} trains bias tensors of the base model ({key!r}), which the server "
            "does not apply; train with bias='none'"
        )
    return f"unexpected tensor key {key!r}"


def _check_shapes(
    a: torch.Tensor,
    b: torch.Tensor,
    in_out: tuple[int, int],
    max_rank: int,
    where: str,
    name: str,
) -> int:
    """The rank of a module's pair after checking it against the base model; raises otherwise."""
    in_features, out_features = in_out
    if a.ndim != 2 or b.ndim != 2:
        raise _error(
            name,
            f"{where}: lora_A and lora_B must be matrices, got shapes {list(a.shape)} and {list(b.shape)}",
        )
    r = a.shape[0]
    if b.shape[1] != r:
        raise _error(
            name,
            f"{where}: rank mismatch between lora_A {list(a.shape)} and lora_B {list(b.shape)} "
            f"(A/B rank mismatch)",
        )
    if r < 1:
        raise _error(name, f"{where}: rank 0 tensors")
    if r > max_rank:
        raise _error(name, f"rank {r} of {where} exceeds the server's max_lora_rank {max_rank}")
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise _error(
            name,
            f"{where}: shapes lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the base model "
            f"(expected [{r}, {in_features}] / [{out_features}, {r}])",
        )
    return r


def max_gain(model: ModelConfig) -> float:
    """The largest gain a module's LoRA may have on `model` (see _check_gain), a bound that keeps
    every activation finite in float32 and bfloat16, which share float32's exponent range.

    The residual stream must stay below sqrt(max / hidden): RMSNorm squares and sums it. Each
    block reads a normalised input, so gains do not compound across layers, only within one: q/k/v
    and gate/up see unit-RMS inputs (gain g), o_proj a mix of value rows (g^2), down_proj the
    product gate * up (g^3). Layers add up, so num_layers * g^3 <= sqrt(max / hidden), i.e.
    g <= (sqrt(max / hidden) / num_layers)^(1/3): 2.9e5 for SmolLM2-135M (576 wide, 30 layers).
    Trained adapters have gains of about 1 to 1e3, the overflowing ones of issue 15 above 1e29.
    float16 has a far smaller range, which base models alone can exceed; it is not covered.
    """
    limit = math.sqrt(torch.finfo(torch.float32).max / model.hidden_size)
    return (limit / model.num_layers) ** (1 / 3)


def _check_gain(a: torch.Tensor, b: torch.Tensor, scale: float, bound: float, where: str, name: str) -> None:
    """Refuse a module whose LoRA could overflow the serving dtype once applied.

    For an input row x of RMS 1 (so |x|_2 = sqrt(in)), Cauchy-Schwarz gives the exact worst cases
        shrink  |(x @ A^T)_i|            <= |A_i|_2 * sqrt(in)
        output  |scale * (x @ A^T @ B^T)_j| <= |scale| * |(B @ A)_j|_2 * sqrt(in)      (the gain)
    and, for the expand alone on an intermediate of RMS 1, |scale| * |B_j|_2 * sqrt(r). Each of
    these, and |scale| itself, must stay within `bound` (max_gain). |(B @ A)_j|^2 is computed as
    B_j (A A^T) B_j^T, which costs r^2 (in + out) instead of the r * in * out of forming B @ A.
    Squares are taken in float32, so weights beyond ~1e19 make a gain inf and are refused whatever
    the scale; such weights are absurd for any model.
    """
    r, in_features = a.shape
    row_gain = float(((b @ (a @ a.T)) * b).sum(dim=1).max()) ** 0.5  # max_j |(B @ A)_j|_2
    gains = {
        "scale (lora_alpha / r)": abs(scale),
        "lora_A gain": float(a.norm(dim=1).max()) * math.sqrt(in_features),
        "lora_B gain (scale * lora_B)": abs(scale) * float(b.norm(dim=1).max()) * math.sqrt(r),
        "gain (scale * lora_B @ lora_A)": abs(scale) * row_gain * math.sqrt(in_features),
    }
    for what, gain in gains.items():
        if not gain <= bound:  # also refuses inf and NaN
            raise _error(
                name,
                f"{where}: the {what} is {gain:.3g}, beyond the bound {bound:.3g} that keeps the model's "
                "activations finite (a unit-RMS input could overflow float32/bfloat16); retrain or rescale "
                "the adapter",
            )


def _to_float32(t: torch.Tensor, where: str, name: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise _error(name, f"{where} has dtype {t.dtype}; floating-point weights are required")
    t = t.to(torch.float32).contiguous()
    if not bool(torch.isfinite(t).all()):
        raise _error(name, f"{where} contains non-finite values (nan or inf)")
    return t

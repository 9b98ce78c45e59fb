"""A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) into the normalised set.

Everything a client can upload passes through here, so every refusal is an AdapterError whose
message names the adapter and the reason, and nothing that reaches the engine can mis-shape a
kernel call. The files are read and decoded here; the config's kind (slserve/adapters/kinds.py)
picks the converter that validates them against the base model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from slserve.adapters import kinds
from slserve.adapters.checks import max_gain
from slserve.adapters.dora import BaseWeights, resolve_weight_norms
from slserve.adapters.weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    LoRAAdapter,
    LoRAWeights,
    OutputScale,
    adapter_error,
)
from slserve.config import ModelConfig

# Pickle checkpoints run arbitrary code on load; they are refused, never opened.
PICKLE_FILES = ("adapter_model.bin",)

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterError",
    "LoRAAdapter",
    "LoRAWeights",
    "OutputScale",
    "convert_peft_adapter",
    "load_peft_adapter",
    "max_gain",
    "parse_peft_adapter",
    "read_adapter_dir",
]


def read_adapter_dir(path: str | os.PathLike, name: str) -> tuple[bytes, bytes]:
    """(config bytes, weights bytes) of an adapter directory, refusing pickle checkpoints.

    Both files are opened relative to one directory descriptor, so a directory renamed away
    mid-read (an adapter being replaced) still yields a consistent pair.
    """
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise adapter_error(name, f"adapter directory {str(path)!r} does not exist") from None
    except NotADirectoryError:
        raise adapter_error(name, f"{str(path)!r} is not a directory") from None
    except OSError as e:
        raise adapter_error(name, f"cannot open the adapter directory: {e}") from None
    try:
        return _read_files(dir_fd, name)
    except OSError as e:
        raise adapter_error(name, f"cannot read the adapter files: {e}") from None
    finally:
        os.close(dir_fd)


def _read_files(dir_fd: int, name: str) -> tuple[bytes, bytes]:
    entries = set(os.listdir(dir_fd))
    pickles = [f for f in PICKLE_FILES if f in entries]
    if pickles:
        raise adapter_error(
            name,
            f"pickle weights ({pickles[0]}) are refused because loading them can run arbitrary "
            f"code; save the adapter with safetensors ({WEIGHTS_FILE})",
        )
    if WEIGHTS_FILE not in entries:
        raise adapter_error(name, f"{WEIGHTS_FILE} is missing (only safetensors weights are accepted)")
    if CONFIG_FILE not in entries:
        raise adapter_error(name, f"{CONFIG_FILE} is missing")
    opener = lambda p, flags: os.open(p, flags, dir_fd=dir_fd)
    with open(CONFIG_FILE, "rb", opener=opener) as f:
        config_bytes = f.read()
    with open(WEIGHTS_FILE, "rb", opener=opener) as f:
        weights_bytes = f.read()
    return config_bytes, weights_bytes


def load_peft_adapter(path: str | os.PathLike, model: ModelConfig, max_rank: int, name: str,
                      base: BaseWeights | None = None) -> LoRAAdapter:
    """Load and validate the adapter saved by peft's save_pretrained in directory `path`."""
    config_bytes, weights_bytes = read_adapter_dir(path, name)
    return parse_peft_adapter(config_bytes, weights_bytes, model, max_rank, name, base)


def parse_peft_adapter(
    config_bytes: bytes, weights_bytes: bytes, model: ModelConfig, max_rank: int, name: str,
    base: BaseWeights | None = None,
) -> LoRAAdapter:
    """An adapter the engine serves, given as the bytes of its two files (an upload); raises
    AdapterError. `base`: the base model's weights, which DoRA's norms need (adapters/dora.py)."""
    config = _parse_config_json(config_bytes, name)
    kind = kinds.kind_of(config, name)
    adapter = kind.convert(config, _load_tensors(weights_bytes, name), model, max_rank, name)
    return resolve_weight_norms(adapter, base)


def convert_peft_adapter(
    config_bytes: bytes, weights_bytes: bytes, model: ModelConfig, max_rank: int, name: str
) -> LoRAAdapter:
    """Any known kind, validated and converted; DoRA's norms left unresolved (no base weights)."""
    config = _parse_config_json(config_bytes, name)
    kind = kinds.kind_of(config, name)
    return kind.convert(config, _load_tensors(weights_bytes, name), model, max_rank, name)


def _parse_config_json(config_bytes: bytes, name: str) -> dict:
    def no_constants(token: str) -> Any:
        # Python's json accepts NaN/Infinity, which would slip a non-finite alpha through.
        raise ValueError(f"{token} is not valid JSON")

    try:
        config = json.loads(config_bytes.decode("utf-8"), parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise adapter_error(name, f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise adapter_error(name, f"{CONFIG_FILE} must hold a JSON object, got {type(config).__name__}")
    return config


def _load_tensors(weights_bytes: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(weights_bytes)
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise adapter_error(name, f"{WEIGHTS_FILE} is not a valid safetensors file (corrupt): {e}") from None

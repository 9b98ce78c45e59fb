"""Real PEFT adapters for tests, made with the `peft` library against a real base model."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(
    base,
    path: Path,
    r: int,
    targets: list[str],
    seed: int,
    alpha: int | None = None,
    std: float = 0.02,
    **lora_kwargs,
) -> Path:
    """Attach a fresh LoRA to `base`, give lora_B nonzero values, save it, and detach it again."""
    from peft import LoraConfig

    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets, lora_dropout=0.0, **lora_kwargs)
    return make_peft_kind_adapter(base, path, cfg, seed, {"lora_A": 0.1, "lora_B": std})


def make_peft_kind_adapter(
    base,
    path: Path,
    config,
    seed: int,
    std: dict[str, float],
    edit: Callable[[object], None] | None = None,
) -> Path:
    """Attach a fresh adapter of any PEFT kind (`config`, a PeftConfig) to `base`, fill every
    parameter whose name contains a key of `std` with N(0, std[key]) values, let `edit` change the
    peft model (e.g. prune AdaLoRA triplets), save it, and detach it again."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = next((k for k in std if k in name), None)
            if key is not None:
                p.copy_(torch.randn(p.shape, generator=g) * std[key])
        if edit is not None:
            edit(model)
    model.save_pretrained(str(path))
    if not config.is_prompt_learning:  # prompt learning leaves the base model's modules alone
        model.unload()
    return path


def peft_generate(base, adapter_path: Path | None, prompt_ids: list[int], max_new_tokens: int,
                  device: torch.device | str = "cpu") -> list[int]:
    """Greedy tokens from transformers (+ peft when an adapter is given), one prompt alone."""
    from peft import PeftModel

    ids = torch.tensor([prompt_ids], device=device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if adapter_path is None:
            return base.generate(ids, **kwargs)[0, len(prompt_ids):].tolist()
        model = PeftModel.from_pretrained(base, str(adapter_path))
        try:
            return model.generate(input_ids=ids, **kwargs)[0, len(prompt_ids):].tolist()
        finally:
            if not model.active_peft_config.is_prompt_learning:  # prompt learning left base alone
                model.unload()


def peft_logprobs(base, adapter_path: Path | None, ids: list[int]) -> torch.Tensor:
    """Log-probabilities of ids[1:] given their prefixes, from transformers (+ peft when an
    adapter is given): one forward over the whole sequence."""
    from peft import PeftModel

    x = torch.tensor([ids])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if adapter_path is None:
            logits = base(x).logits[0]
        else:
            model = PeftModel.from_pretrained(base, str(adapter_path))
            try:
                logits = model(x).logits[0]
            finally:
                model.unload()
    return logits[:-1].log_softmax(-1).gather(1, x[0, 1:, None])[:, 0]


def peft_forward_greedy(base, adapter_path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of a prompt-learning adapter from peft's own forward over the whole sequence,
    one token per forward. peft 0.21's generate with transformers 5 drops a prefix-tuning
    adapter's keys and values (its tokens are the base model's) and decodes prompt tuning wrongly
    from the cache after the first generated token; its forward puts the virtual tokens (or the
    prefix as past_key_values) before the sequence as documented."""
    from peft import PeftModel

    seq = list(prompt_ids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, str(adapter_path)).eval()
        for _ in range(max_new_tokens):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt_ids):]

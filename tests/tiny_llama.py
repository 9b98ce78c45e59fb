"""A small random-weight Llama written by transformers, with the embedded model's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_llama(root: Path, hidden: int = 128, layers: int = 2, heads: int = 8, kv_heads: int = 4,
                     inter: int = 256, seed: int = 0, tokenizer_dir: Path | None = None, std: float = 0.08,
                     tie: bool = False, max_positions: int = 2048, **extra) -> Path:
    """`tokenizer_dir`: where the tokenizer files are (default: the embedded model's); `extra`:
    more LlamaConfig fields (attention_bias=True, say)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slserve.model.loader import resolve_model

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or resolve_model(None)))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **extra)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a wider spread of logits than the default init: fewer near-ties
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("_proj.bias"):
                p.normal_(0, std)
    d = root / "tiny-llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d

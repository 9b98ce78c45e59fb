"""Our Llama-family decoder (Llama, Mistral, Qwen2) over a flat varlen batch and the paged cache.

Prefill chunks and decode tokens of many sequences run in one forward: every tensor below is
[T, ...] over the step's tokens; attention is the only place where sequences are told apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slserve.batch import ForwardBatch
from slserve.config import ModelConfig
from slserve.memory.kv_cache import KVCache
from slserve.model.layers import Linear, RMSNorm, Rotary, apply_rotary, dense

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ForwardBatch, float], torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], i: int):
        super().__init__()
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        qkv_w = torch.cat([state[attn + f"{n}_proj.weight"] for n in "qkv"])
        qkv_b = torch.cat([state[attn + f"{n}_proj.bias"] for n in "qkv"]) if cfg.qkv_bias else None
        self.qkv = Linear(qkv_w, qkv_b, i, "qkv")
        self.o = Linear(state[attn + "o_proj.weight"], None, i, "o")
        gate_up = torch.cat([state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]])
        self.gate_up = Linear(gate_up, None, i, "gate_up")
        self.down = Linear(state[mlp + "down_proj.weight"], None, i, "down")
        self.input_norm = RMSNorm(state[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        self.post_norm = RMSNorm(state[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        self.index = i
        self.split = (cfg.q_size, cfg.kv_size, cfg.kv_size)
        self.heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.inter = cfg.intermediate_size

    def forward(self, x, cos, sin, batch: ForwardBatch, kv: KVCache, write_index, attention: AttentionFn):
        T = x.shape[0]
        H, KVH, D = self.heads
        qkv = self.qkv(self.input_norm(x), batch.lora)  # [T, q + 2 kv]
        # q and k are adjacent columns: rotate both heads at once.
        qk = apply_rotary(qkv[:, : self.split[0] + self.split[1]].view(T, H + KVH, D), cos, sin)
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, self.split[0] + self.split[1] :].view(T, KVH, D)
        kv.write(self.index, k, v, write_index)
        o = attention(q, kv.k[self.index], kv.v[self.index], batch, D**-0.5)  # [T, H, D]
        x = x + self.o(o.view(T, H * D), batch.lora)
        gu = self.gate_up(self.post_norm(x), batch.lora)  # [T, 2 * inter]
        act = F.silu(gu[:, : self.inter]) * gu[:, self.inter :]
        return x + self.down(act, batch.lora)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], device, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(state["model.embed_tokens.weight"], requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, state, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(state["model.norm.weight"], cfg.rms_norm_eps)
        lm_head = state["model.embed_tokens.weight"] if cfg.tie_word_embeddings else state["lm_head.weight"]
        self.lm_head = nn.Parameter(lm_head, requires_grad=False)
        self.rotary = Rotary(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device)
        self.to(device)
        for module in self.modules():
            if isinstance(module, Linear):
                module.finalize()
        self._lm_head = dense(self.lm_head.data)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache, attention: AttentionFn) -> torch.Tensor:
        """Logits (float32) for the tokens in batch.logits_index: [R, vocab]."""
        x = F.embedding(batch.input_ids, self.embed)  # [T, hidden]
        cos, sin = self.rotary.tables(batch.positions, x.dtype)
        write_index = kv.write_index(batch.slot_pages, batch.slot_offsets)
        for layer in self.layers:
            x = layer(x, cos, sin, batch, kv, write_index, attention)
        x = self.norm(x[batch.logits_index])
        return self._lm_head(x).float()

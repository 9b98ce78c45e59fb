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
from slserve.model.layers import Linear, RMSNorm, Rotary, dense
from slserve.model.ops import TorchOps

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
        self.heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def forward(self, delta, residual, cos, sin, batch: ForwardBatch, kv: KVCache, write_index,
                attention: AttentionFn, ops: TorchOps):
        """residual: the running sum of the embedding and every earlier layer's output, updated
        in place where the ops allow; delta: the previous layer's output, not yet added (None
        before the first layer). Returns this layer's (delta, residual)."""
        T = residual.shape[0]
        H, _, D = self.heads
        residual, h = ops.add_norm(residual, delta, self.input_norm)
        qkv = self.qkv(h, batch.lora)  # [T, q + 2 kv]
        q = ops.rotary_kv(qkv, cos, sin, self.heads, kv, self.index, write_index)
        o = attention(q, kv.k[self.index], kv.v[self.index], batch, D**-0.5)  # [T, H, D]
        residual, h = ops.add_norm(residual, self.o(o.view(T, H * D), batch.lora), self.post_norm)
        act = ops.silu_mul(self.gate_up(h, batch.lora))  # [T, inter]
        return self.down(act, batch.lora), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], device, max_positions: int,
                 ops: TorchOps | None = None):
        super().__init__()
        self.cfg = cfg
        self.ops = ops or TorchOps()
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
        residual = F.embedding(batch.input_ids, self.embed)  # [T, hidden]
        cos, sin = self.rotary.tables(batch.positions, residual.dtype)
        write_index = kv.write_index(batch.slot_pages, batch.slot_offsets)
        delta = None
        for layer in self.layers:
            delta, residual = layer(delta, residual, cos, sin, batch, kv, write_index, attention, self.ops)
        rows = batch.logits_index
        _, h = self.ops.add_norm(residual[rows], delta[rows], self.norm)
        return self._lm_head(h).float()

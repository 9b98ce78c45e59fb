"""Our Llama-family decoder (Llama, Mistral, Qwen2) over a flat varlen batch and the paged cache.

Prefill chunks and decode tokens of many sequences run in one forward: every tensor below is
[T, ...] over the step's tokens; attention is the only place where sequences are told apart.
Under tensor parallelism each rank holds its shard (parallel.py): its heads, its intermediate
columns, its vocabulary rows; `state` already holds only that shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from slserve.config import ModelConfig
from slserve.memory.kv_cache import KVCache
from slserve.model.layers import Linear, RMSNorm, Rotary, vocab_head
from slserve.model.ops import CpuOps, TorchOps
from slserve.model.quant import cat_weights, head_copy_key, quantized_matmul
from slserve.parallel import Collectives, Shard

if TYPE_CHECKING:
    from slserve.backends import Backend, ForwardContext


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], i: int, reduce=None):
        """cfg: this rank's config (its heads); reduce: the row-parallel all-reduce under TP."""
        super().__init__()
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        qkv_w = cat_weights([state[attn + f"{n}_proj.weight"] for n in "qkv"])
        qkv_b = torch.cat([state[attn + f"{n}_proj.bias"] for n in "qkv"]) if cfg.qkv_bias else None
        self.qkv = Linear(qkv_w, qkv_b, i, "qkv")
        self.o = Linear(state[attn + "o_proj.weight"], None, i, "o", reduce)
        gate_up = cat_weights([state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]])
        self.gate_up = Linear(gate_up, None, i, "gate_up")
        self.down = Linear(state[mlp + "down_proj.weight"], None, i, "down", reduce)
        self.input_norm = RMSNorm(state[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        self.post_norm = RMSNorm(state[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        self.index = i
        self.heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def forward(self, delta, residual, cos, sin, ctx: ForwardContext, kv: KVCache, backend: Backend,
                ops: TorchOps):
        """residual: the running sum of the embedding and every earlier layer's output, updated
        in place where the ops allow; delta: the previous layer's output, not yet added (None
        before the first layer). Returns this layer's (delta, residual)."""
        T = residual.shape[0]
        H, _, D = self.heads
        residual, h = ops.add_norm(residual, delta, self.input_norm)
        if ctx.norms is not None:
            ctx.norms.apply(h, residual, self.index, "input_layernorm")
        qkv = self.qkv(h, ctx.lora)  # [T, q + 2 kv]
        q = ops.rotary_kv(qkv, cos, sin, self.heads, kv, self.index, ctx.write_index)
        o = backend.attention(q, kv.k[self.index], kv.v[self.index], ctx, D**-0.5)  # [T, H, D]
        residual, h = ops.add_norm(residual, self.o(o.view(T, H * D), ctx.lora), self.post_norm)
        if ctx.norms is not None:
            ctx.norms.apply(h, residual, self.index, "post_attention_layernorm")
        act = ops.silu_mul(self.gate_up(h, ctx.lora))  # [T, inter]
        return self.down(act, ctx.lora), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], device, max_positions: int,
                 ops: TorchOps | None = None, shard: Shard | None = None, comm: Collectives | None = None):
        """cfg: the whole model's config; state: this rank's shard of the weights (projection
        weights already quantized under --quantization, model/quant.py)."""
        super().__init__()
        self.cfg = cfg
        self.shard = shard = shard or Shard()
        self.comm = comm or Collectives(shard)
        self.vocab = shard.vocab(cfg)
        self.ops = ops or TorchOps()
        self.embed = nn.Parameter(state["model.embed_tokens.weight"], requires_grad=False)
        reduce = self.comm.all_reduce if shard.parallel else None
        local = shard.local_config(cfg)
        self.layers = nn.ModuleList(DecoderLayer(local, state, i, reduce) for i in range(cfg.num_layers))
        self.norm = RMSNorm(state["model.norm.weight"], cfg.rms_norm_eps)
        head_key = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        quantized_head = state.get(head_copy_key(head_key))  # --quantization w8a8
        if quantized_head is None:
            self.lm_head = nn.Parameter(state[head_key], requires_grad=False)
        self.rotary = Rotary(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device)
        self.to(device)
        cpu_ops = self.ops.ops if isinstance(self.ops, CpuOps) else None
        for module in self.modules():
            if isinstance(module, Linear):
                module.finalize(device, cpu_ops)
        self._lm_head = (vocab_head(self.lm_head.data) if quantized_head is None
                         else quantized_matmul(quantized_head.to(device), None, cpu_ops))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.shard.parallel:
            return F.embedding(ids, self.embed)
        # Vocabulary-parallel: each rank embeds the ids in its rows, zeros elsewhere; one sum.
        v0, v1 = self.vocab.start, self.vocab.stop
        mine = (ids >= v0) & (ids < v1)
        out = F.embedding((ids - v0).clamp(0, v1 - v0 - 1), self.embed) * mine[:, None].to(self.embed.dtype)
        return self.comm.all_reduce(out)

    @torch.inference_mode()
    def forward(self, ctx: ForwardContext, kv: KVCache, backend: Backend) -> torch.Tensor | None:
        """Logits, in the model's dtype, for the tokens in ctx.logits_index: [R, vocab], on rank 0
        (None on the others). The sampler widens them to float32 where it needs more than argmax."""
        residual = self.embed_tokens(ctx.input_ids)  # [T, hidden]
        if ctx.virtual is not None:  # an adapter's virtual tokens (prompt tuning) replace theirs
            rows, embeds = ctx.virtual
            residual[rows] = embeds.to(residual.dtype)
        cos, sin = self.rotary.tables(ctx.positions, residual.dtype)
        delta = None
        for layer in self.layers:
            delta, residual = layer(delta, residual, cos, sin, ctx, kv, backend, self.ops)
        rows = ctx.logits_index
        x, h = self.ops.add_norm(residual[rows], delta[rows], self.norm)
        if ctx.norms is not None:
            ctx.norms.apply_final(h, x)
        return self.comm.gather_vocab(self._lm_head(h), self.cfg.vocab_size)

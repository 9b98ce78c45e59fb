"""The KV cache as an owner of the unified pool.

Page layout: [num_layers, 2 (K, V), page_tokens, num_kv_heads, head_dim]. Token i of a sequence
lives in page block_table[i // page_tokens] at offset i % page_tokens, for every layer at once.
For layer l the cache is the strided view data[:, l, 0] (K) / data[:, l, 1] (V) of shape
[num_pages, page_tokens, num_kv_heads, head_dim]: no copy, one block table for all layers.

`KVBlocks` is the accounting half (rank 0: block tables grow and shrink through the allocator);
`KVCache` is the storage half (every rank: views of its pool region, with its own KV heads).
"""

from __future__ import annotations

import torch

from slserve.config import ModelConfig
from slserve.memory.pool import Owner, PagePool


def kv_page_elems(model: ModelConfig, page_tokens: int) -> int:
    return model.num_layers * 2 * page_tokens * model.num_kv_heads * model.head_dim


class KVCache:
    """One rank's K/V views of its pool region `data: [num_pages, page_elems]`; `model` is the
    rank's local config (its KV heads)."""

    def __init__(self, data: torch.Tensor, model: ModelConfig, page_tokens: int):
        assert data.shape[1] == kv_page_elems(model, page_tokens)
        self.page_tokens = page_tokens
        view = data.view(data.shape[0], model.num_layers, 2, page_tokens, model.num_kv_heads, model.head_dim)
        self.k = [view[:, layer, 0] for layer in range(model.num_layers)]
        self.v = [view[:, layer, 1] for layer in range(model.num_layers)]
        # Rows of one token's K (or V) for one layer: writes are one index_copy_ per layer.
        self.rows = data.view(-1, model.num_kv_heads, model.head_dim)
        self._row_offsets = (torch.arange(model.num_layers * 2) * page_tokens).view(model.num_layers, 2, 1)
        self._rows_per_page = model.num_layers * 2 * page_tokens

    def write_index(self, pages: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """[num_layers, 2, T] row of each new token's K and V in every layer (computed once a step)."""
        base = pages * self._rows_per_page + offsets
        return base[None, None, :] + self._row_offsets.to(base.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> None:
        """k, v: [T, KVH, D] of the step's new tokens."""
        self.rows.index_copy_(0, index[layer, 0], k)
        self.rows.index_copy_(0, index[layer, 1], v)


class KVBlocks:
    """Block tables through the allocator: how many pages a sequence needs, growing (the scheduler
    releases them, minding the pages shared through the prefix cache)."""

    def __init__(self, pool: PagePool, page_tokens: int):
        self.pool = pool
        self.page_tokens = page_tokens

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_tokens)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend a block table in place so that it covers num_tokens tokens."""
        need = self.pages_for(num_tokens) - len(block_table)
        if need > 0:
            block_table.extend(self.pool.alloc(need, Owner.KV))

"""Key/value cache for incremental decoding.

Multi-query attention keeps one key and one value head per layer, so the cache is (layers, b, N, dim_head): `heads`
times smaller than a multi-head cache. Preallocated once per generate call; appending is a slice write.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    keys: Tensor  # (layers, b, max_len, d)
    values: Tensor  # (layers, b, max_len, d)
    length: int = 0

    @classmethod
    def empty(cls, model, batch: int, max_len: int, device) -> "KVCache":
        cfg = model.config
        dtype = next(model.parameters()).dtype
        shape = (cfg.depth, batch, max_len, cfg.dim_head)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v (b, n, d) for one layer; return everything cached so far for it (b, N, d)."""
        end = self.length + k.shape[1]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions; asked for {end}")
        self.keys[layer, :, self.length:end] = k
        self.values[layer, :, self.length:end] = v
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def advance(self, n: int) -> None:
        """Called once per forward pass, after every layer has appended its n positions."""
        self.length += n

"""Key/value cache of the committed clean prefix, one preallocated buffer for all layers.

Sampling writes the keys/values of the block being denoised into the slots after the committed prefix
*without* committing them (the next step overwrites them); once a block is finished, the next call runs the clean
block ahead of the next noisy block, and :meth:`KVCache.commit` keeps the clean block's keys/values (see
:mod:`bd3lm.sampling.cache_policy`). This mirrors the x_0 stream
of training, where each block is encoded clean before later blocks read it (Arriola et al. 2025, §3.2).
Keys are stored after rotary, so no position is ever rotated twice.

The buffers are allocated once, on the first write, in the dtype of the keys the model computes (bf16 under
autocast, the parameters' dtype otherwise), so no write or read converts them. A cache lives for one generation,
during which the weights do not change: :attr:`KVCache.constants` holds what depends on the weights only (the
adaLN modulations of a model run without a time input).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer keys and values of shape (batch, heads, capacity, head_dim).

    Args:
        n_layers: number of transformer blocks.
        batch_size: number of sequences.
        n_heads: attention heads.
        head_dim: size of one head.
        capacity: the most positions the cache holds (the attention window).
        dtype: storage dtype; ``None`` = the dtype of the first keys written (the compute dtype).
        device: storage device.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype | None,
        device: torch.device | str,
    ):
        self.shape = (n_layers, batch_size, n_heads, capacity, head_dim)
        self.device = torch.device(device)
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        if dtype is not None:
            self._allocate(dtype)
        self.capacity = capacity
        self.length = 0  # committed positions
        self.pending = 0  # positions written after ``length`` by the last forward
        self.constants: dict[str, object] = {}

    def _allocate(self, dtype: torch.dtype) -> None:
        # uninitialised: a slot is read only after a write (reads stop at the written prefix)
        self.k = torch.empty(self.shape, dtype=dtype, device=self.device)
        self.v = torch.empty(self.shape, dtype=dtype, device=self.device)

    @property
    def batch_size(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> torch.dtype | None:
        """Storage dtype (``None`` until the first write of a lazily allocated cache)."""
        return None if self.k is None else self.k.dtype

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new keys/values (B, H, m, D) after the committed prefix; return prefix + new, (B, H, length+m, D)."""
        m = k.shape[2]
        end = self.length + m
        if self.k is None:
            self._allocate(k.dtype)
        if end > self.capacity:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {m} new positions exceed the capacity {self.capacity}"
            )
        self.k[layer, :, :, self.length : end] = k.to(self.k.dtype)
        self.v[layer, :, :, self.length : end] = v.to(self.v.dtype)
        self.pending = m
        return self.k[layer, :, :, :end].to(k.dtype), self.v[layer, :, :, :end].to(v.dtype)

    def commit(self, n: int | None = None) -> None:
        """Keep the positions written by the last forward as part of the prefix: all of them (a finished clean
        block), or only the first ``n`` (a clean prefix encoded together with a noisy block)."""
        n = self.pending if n is None else n
        if not 0 <= n <= self.pending:
            raise ValueError(f"cannot commit {n} positions; the last forward wrote {self.pending}")
        self.length += n
        self.pending = 0

    def drop_oldest(self, m: int) -> None:
        """Forget the ``m`` oldest committed positions, keeping the others' (now stale) keys and values.

        Used only by the approximate streaming mode; the exact mode re-encodes the window instead.
        """
        if not 0 <= m <= self.length:
            raise ValueError(f"cannot drop {m} positions from a cache holding {self.length}")
        keep = self.length - m
        if self.k is None or m == 0:
            self.length, self.pending = keep, 0
            return
        self.k[:, :, :, :keep] = self.k[:, :, :, m : self.length].clone()
        self.v[:, :, :, :keep] = self.v[:, :, :, m : self.length].clone()
        self.length, self.pending = keep, 0

    def select(self, rows: Tensor) -> None:
        """Keep only the sequences ``rows`` (finished sequences stop costing compute)."""
        self.shape = (self.shape[0], int(rows.numel()), *self.shape[2:])
        if self.k is not None:
            self.k = self.k[:, rows]
            self.v = self.v[:, rows]

    def reset(self) -> None:
        """Forget every position."""
        self.length, self.pending = 0, 0

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (0 before a lazily allocated cache is written)."""
        return 0 if self.k is None else self.k.numel() * self.k.element_size() * 2

"""The cache policy of :func:`~bd3lm.sampling.generate`: what the KV cache holds, and what the next network call
must encode before it can denoise.

The cache holds keys/values of *clean* columns only, computed block-causally as the x_0 stream of training
computes them (Arriola et al. 2025, §3.2). Clean columns reach it in exactly one way: they are fed to a network
call ahead of the noisy block (or, for AR models, as the newest tokens) and committed by that call. The prompt
prefill, a window re-encode and a finished block all take this path, so no network call is spent on committing
alone: block size 1 costs one call per token, like an AR model, and every block size saves one call per block.
"""

from __future__ import annotations

from torch import Tensor

from bd3lm.cache import KVCache
from bd3lm.sampling.layout import WindowPolicy

__all__ = ["CachePolicy"]


class CachePolicy:
    """Bookkeeping of one generation's :class:`~bd3lm.cache.KVCache`.

    Invariant: the cache holds the keys/values of columns ``[c0, end)`` of every row, encoded with the window
    starts ``encoded_with`` (in the exact mode these equal the current starts, so the keys/values equal a
    from-scratch encoding of the window). The clean columns ``[end, cur)`` are not cached yet: the next network
    call feeds them ahead of its noisy block and :meth:`commit` records them.
    """

    def __init__(self, model, batch_size: int, capacity: int, window: WindowPolicy) -> None:
        self.cache: KVCache = model.new_cache(batch_size, capacity=capacity)
        self.capacity = capacity
        self.window = window
        self.c0 = 0  # column stored in cache slot 0
        self.end = 0  # first column not in the cache
        self.encoded_with: Tensor | None = None

    def prepare(self, ws: Tensor, in_end: int, oldest: int) -> None:
        """Before a network call whose inputs end at column ``in_end`` with window starts ``ws`` and whose
        queries attend no column before ``oldest``: re-encode (exact mode, when a window start moved) or drop
        the oldest columns (streaming mode, when full)."""
        if self.window.needs_reencode(ws, self.encoded_with):
            self.cache.reset()
            self.c0 = self.end = int(ws.min())
            self.encoded_with = ws.clone()
        elif in_end - self.c0 > self.capacity:
            # Streaming, when full: columns before ``oldest`` are masked for every query, so they can go (until
            # then they stay, masked); the surviving keys/values were computed while the dropped columns were
            # visible (approximate).
            self.cache.drop_oldest(min(oldest, self.end) - self.c0)
            self.c0, self.end = oldest, max(self.end, oldest)

    def commit(self, n: int) -> None:
        """The last call's first ``n`` inputs were the clean columns ``[end, end + n)``: keep them."""
        self.cache.commit(n)
        self.end += n

    def select(self, rows: Tensor) -> None:
        """Keep only the sequences ``rows`` (CPU indices)."""
        self.cache.select(rows.to(self.cache.device))
        if self.encoded_with is not None:
            self.encoded_with = self.encoded_with[rows]

    @staticmethod
    def full_attention(ws: Tensor, c0: int, single_block: bool) -> bool:
        """Whether every query of a call may attend every key (no mask needed): no key before any query's window
        start ``ws``, and all queries in one block."""
        return single_block and int(ws.max()) <= c0

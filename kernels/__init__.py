"""Attention backends (installed as ``bd3lm.kernels``).

``attention(q, k, v, mask, backend)`` computes softmax(q kᵀ / √d) v over heads with one of

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with a dense boolean mask (default; the only
  backend that trains on CPU),
- ``flex``: FlexAttention with a ``BlockMask`` built from the index predicates of :mod:`bd3lm.masks`
  (compiled on CUDA, where it trains; forward-only and eager on CPU),
- ``flash_attn``: FlashAttention 2 (CUDA, only for mask-free bidirectional or causal attention),
- ``reference``: explicit softmax in float32, for tests.
"""

from bd3lm.kernels.attention import (
    BACKENDS,
    StructuredMask,
    attention,
    backend_available,
    resolve_backend,
)

__all__ = ["BACKENDS", "StructuredMask", "attention", "backend_available", "resolve_backend"]

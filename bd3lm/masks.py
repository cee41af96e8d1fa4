"""Attention masks of block diffusion, written once as index predicates.

Training reads the two-stream input ``[x_t ; x_0]`` of length 2n (Arriola et al. 2025, §3.2, Fig. 2).
For positions ``q, kv`` in ``[0, 2n)`` let ``f(i) = 1[i >= n]`` (0 = noisy stream, 1 = clean stream) and
``b(i) = (i - n f(i)) // L'`` (the block index). Attention is allowed iff

- ``M_BD``  (block diagonal):          ``b(q) == b(kv)  and f(q) == f(kv)``
- ``M_OBC`` (offset block-causal):     ``f(q) == 0 and f(kv) == 1 and b(kv) <  b(q)``
- ``M_BC``  (block-causal):            ``f(q) == 1 and f(kv) == 1 and b(kv) <= b(q)``

Sampling reads a plain sequence with the block-causal mask ``b(kv) <= b(q)``; block size 1 is the causal
mask of an autoregressive model and block size n is full bidirectional attention (MDLM).

The predicates use integer arithmetic only (products and sums of 0/1 integers, one final comparison): with
boolean ``&``/``|`` FlexAttention's ``create_block_mask(..., _compile=True)`` fails in Inductor.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


def check_block_size(n: int, block_size: int) -> None:
    """Raise a one-line ``ValueError`` unless ``block_size`` divides the sequence length ``n``."""
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer; got {block_size}")
    if n % block_size != 0:
        raise ValueError(f"sequence length {n} is not a multiple of block_size {block_size}")


def two_stream_predicate(q: Tensor, kv: Tensor, n: int, block_size: int) -> Tensor:
    """``M_BD ∪ M_OBC ∪ M_BC`` over the 2n positions of ``[x_t ; x_0]`` (paper eq. for the vectorised pass)."""
    f_q = q // n
    f_kv = kv // n
    b_q = (q - n * f_q) // block_size
    b_kv = (kv - n * f_kv) // block_size
    same_block = (b_q == b_kv).to(torch.int32)
    same_stream = (f_q == f_kv).to(torch.int32)
    m_bd = same_block * same_stream
    m_obc = (1 - f_q) * f_kv * (b_kv < b_q).to(torch.int32)
    m_bc = f_q * f_kv * (b_kv <= b_q).to(torch.int32)
    return (m_bd + m_obc + m_bc) > 0


def block_causal_predicate(q: Tensor, kv: Tensor, block_size: int) -> Tensor:
    """Block-causal mask ``kv // L' <= q // L'`` used by sampling (and, with ``L' = 1``, by AR models)."""
    return (kv // block_size) <= (q // block_size)


def two_stream_mask(n: int, block_size: int, device: torch.device | str | None = None) -> Tensor:
    """Dense boolean (2n, 2n) training mask, ``True`` = attend."""
    check_block_size(n, block_size)
    idx = torch.arange(2 * n, device=device)
    return two_stream_predicate(idx[:, None], idx[None, :], n, block_size)


def block_causal_mask(
    n_kv: int, block_size: int, q_start: int = 0, n_q: int | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Dense boolean block-causal mask for queries ``[q_start, q_start + n_q)`` over keys ``[0, n_kv)``.

    The last block may be partial (a prompt shorter than a block is still one block).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer; got {block_size}")
    n_q = n_kv - q_start if n_q is None else n_q
    q = torch.arange(q_start, q_start + n_q, device=device)
    kv = torch.arange(n_kv, device=device)
    return block_causal_predicate(q[:, None], kv[None, :], block_size)


@lru_cache(maxsize=32)
def cached_two_stream_mask(n: int, block_size: int, device: str) -> Tensor:
    """Memoised :func:`two_stream_mask` (built once per shape and device, never per forward)."""
    return two_stream_mask(n, block_size, device)


@lru_cache(maxsize=32)
def cached_block_causal_mask(n: int, block_size: int, device: str) -> Tensor:
    """Memoised square :func:`block_causal_mask`."""
    return block_causal_mask(n, block_size, device=device)


def allowed_fraction(n: int, block_size: int) -> float:
    """Closed-form fraction of the (2n)^2 training mask that is allowed.

    With B = n / L' blocks: M_BD has 2·B·L'^2 entries, M_OBC has L'^2·B(B-1)/2, M_BC has L'^2·B(B+1)/2 and the
    last two overlap M_BD nowhere except M_BC's diagonal blocks (counted once).
    """
    check_block_size(n, block_size)
    n_blocks = n // block_size
    tile = block_size * block_size
    m_bd = 2 * n_blocks * tile
    m_obc = tile * n_blocks * (n_blocks - 1) // 2
    m_bc_off_diagonal = tile * n_blocks * (n_blocks - 1) // 2
    return (m_bd + m_obc + m_bc_off_diagonal) / float((2 * n) ** 2)

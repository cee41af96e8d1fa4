"""The forward process of BD3-LM: per-block time sampling and clipped masking (the schedules: :mod:`bd3lm.schedules`).

The forward (absorbing / masked) process of MDLM and BD3-LM corrupts each clean token independently:

    q(x_t | x_0) = Cat(x_t; alpha_t * x_0 + (1 - alpha_t) * m),                                   (1)

where ``m`` is the one-hot mask token and ``alpha_t`` decreases from ``alpha_0 = 1`` to ``alpha_1 ~ 0``. The
continuous-time NELBO (MDLM eq. 10, BD3-LM eq. 8, applied to every block ``b``) is

    L^inf = sum_b E_{t ~ U[0, 1]} E_q [ alpha'_t / (1 - alpha_t) * log p_theta(x^b | x_t^b, x^{<b}) ],    (2)

so each schedule exposes the (positive) loss weight ``w(t) = -alpha'_t / (1 - alpha_t)``.

Training draws one noise level per block (BD3-LM sec. 3.2 / 5.3), stratified over all batch x block cells
(antithetic sampling), optionally inside a clip interval ``[beta, omega]``, and the number of masked tokens of
each block can be forced into that interval. The official implementation enforces the latter with a
rejection ``while`` loop that spins forever for an infeasible interval; :func:`sample_mask` instead samples
the loop's stationary distribution in closed form (a truncated binomial count and a uniform subset of
positions).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from bd3lm.schedules import NoiseSchedule, as_time

__all__ = [
    "check_interval",
    "feasible_counts",
    "rank_generator",
    "sample_mask",
    "sample_t",
]

#: Absolute tolerance when comparing k / L' with clip endpoints. It absorbs float32 rounding of endpoints
#: (0.3 stored as 0.30000001192092896 is 1.2e-8 above 3/10; float32 spacing is <= 6e-8 on [0, 1]) while
#: staying far below the 1 / L' spacing of the fractions for any realistic block size.
_INTERVAL_TOL: float = 1e-6


# ----------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    """Format an interval endpoint: two decimals when that is exact to 1e-6, else 6 significant digits."""
    if abs(x - round(x, 2)) < 1e-6:
        return f"{x:.2f}"
    return f"{x:.6g}"


def _check_bounds(interval: tuple[float, float], what: str) -> tuple[float, float]:
    """Check ``0 <= beta <= omega <= 1`` for a (beta, omega) pair; return it as Python floats."""
    try:
        beta, omega = (float(v) for v in interval)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a pair (beta, omega) of numbers; got {interval!r}") from err
    if not (0.0 <= beta <= 1.0 and 0.0 <= omega <= 1.0):
        raise ValueError(f"{what} [{_fmt(beta)}, {_fmt(omega)}] must lie inside [0, 1]")
    if beta > omega:
        raise ValueError(f"{what} [{_fmt(beta)}, {_fmt(omega)}] has beta > omega ({beta!r} > {omega!r})")
    return beta, omega


def _check_positive_int(value: int, name: str) -> int:
    """Check that ``value`` is an integer >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Time sampling
# ----------------------------------------------------------------------------------------------------------


def sample_t(
    batch_size: int,
    n_blocks: int,
    *,
    interval: tuple[float, float] = (1e-3, 1.0),
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw one noise level per block, stratified over all ``batch_size * n_blocks`` cells (BD3-LM sec. 5.3).

    With ``N = batch_size * n_blocks`` cells in row-major order ``k = b * n_blocks + j``, draw
    ``u_k ~ U(0, 1)``; with ``antithetic`` set ``u_k <- (u_k + k) / N`` so each stratum ``[k/N, (k+1)/N)``
    holds exactly one draw (noise levels then increase along blocks and across rows). Finally
    ``t = beta + u * (omega - beta)`` with ``(beta, omega) = interval``, clamped into ``[beta, omega]``
    against rounding; ``beta == omega`` gives that constant.

    The arithmetic is done in float64 (float32 on MPS) and the result cast to ``dtype``. Draws come from
    ``generator`` (see :func:`rank_generator` for distinct streams per DDP rank); ``device`` defaults to
    the generator's device, else CPU.

    Returns:
        Tensor of shape ``(batch_size, n_blocks)``.
    """
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(n_blocks, "n_blocks")
    beta, omega = _check_bounds(interval, "time interval")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    work = torch.float32 if device.type == "mps" else torch.float64
    n = batch_size * n_blocks
    u = torch.rand(n, generator=generator, device=device, dtype=work)
    if antithetic:
        u = (u + torch.arange(n, device=device, dtype=work)) / n
    t = (beta + u * (omega - beta)).clamp(beta, omega)
    return t.view(batch_size, n_blocks).to(dtype)


def _mix_seed(seed: int, rank: int) -> int:
    """Hash ``(seed, rank)`` into a 63-bit seed, stable across processes and Python versions."""
    digest = hashlib.blake2b(f"bd3lm-noise:{int(seed)}:{int(rank)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def rank_generator(seed: int, rank: int, device: torch.device | str | None = None) -> torch.Generator:
    """Return a ``torch.Generator`` seeded from a hash of ``(seed, rank)``.

    Each DDP rank gets its own reproducible stream, unlike the official code, which seeds every rank
    identically and thus draws the same t and masks on every GPU.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an integer >= 0; got {rank!r}")
    gen = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    gen.manual_seed(_mix_seed(seed, rank))
    return gen


# ----------------------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------------------


def feasible_counts(block_size: int, interval: tuple[float, float]) -> Tensor:
    """Integer counts ``k in {0, ..., L'}`` with ``beta <= k / L' <= omega`` (tolerance 1e-6), as int64.

    May be empty; :func:`check_interval` turns that into an error. ``L' = block_size``.
    """
    _check_positive_int(block_size, "block_size")
    beta, omega = _check_bounds(interval, "clip interval")
    k = torch.arange(block_size + 1, dtype=torch.int64)
    frac = k.to(torch.float64) / block_size
    ok = (frac >= beta - _INTERVAL_TOL) & (frac <= omega + _INTERVAL_TOL)
    return k[ok]


def check_interval(block_size: int, interval: tuple[float, float]) -> None:
    """Raise ``ValueError`` unless ``interval`` is a valid clip interval for blocks of ``block_size`` tokens.

    Valid means ``0 <= beta <= omega <= 1`` and at least one whole count ``k`` with
    ``beta <= k / block_size <= omega`` (see :func:`feasible_counts`).
    """
    if feasible_counts(block_size, interval).numel() == 0:
        beta, omega = (float(v) for v in interval)
        raise ValueError(
            f"clip interval [{_fmt(beta)}, {_fmt(omega)}] admits no whole number of masked tokens in a block "
            f"of {block_size} (need beta <= k/{block_size} <= omega)"
        )


def _block_times(t: Tensor | float, batch_size: int, n_blocks: int) -> Tensor:
    """Broadcast ``t`` (scalar, or 2-D with each dim equal to the target or 1) to (batch_size, n_blocks)."""
    t = as_time(t)
    ok = t.dim() == 0 or (t.dim() == 2 and t.shape[0] in (1, batch_size) and t.shape[1] in (1, n_blocks))
    if not ok:
        raise ValueError(
            f"t must have shape (batch_size, n_blocks) = ({batch_size}, {n_blocks}) "
            f"(or broadcast to it); got {tuple(t.shape)}"
        )
    return t.expand(batch_size, n_blocks)


def _truncated_binomial_counts(
    p: Tensor, block_size: int, feasible: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Draw ``K ~ Binomial(L', p)`` conditioned on ``K in feasible``, elementwise over ``p``.

    The pmf ``C(L', k) p^k (1-p)^(L'-k)`` is built in float64 log space (lgamma / xlogy), infeasible counts
    are zeroed and the rest renormalised before ``torch.multinomial``. If ``p`` is exactly 0 or 1 and its
    only count is infeasible, the p -> 0 / p -> 1 limit is used: the smallest / largest feasible count.
    """
    device = p.device
    p64 = p.to(torch.float64).reshape(-1, 1)
    k = torch.arange(block_size + 1, device=device, dtype=torch.float64)
    log_binom = math.lgamma(block_size + 1) - torch.lgamma(k + 1) - torch.lgamma(block_size - k + 1)
    logits = log_binom + torch.xlogy(k, p64) + torch.xlogy(block_size - k, 1 - p64)
    allowed = torch.zeros(block_size + 1, dtype=torch.bool, device=device)
    allowed[feasible.to(device)] = True
    logits = logits.masked_fill(~allowed, -math.inf)
    dead = torch.isneginf(logits.amax(dim=-1, keepdim=True))
    limit_k = torch.where(p64 < 0.5, feasible.min().item(), feasible.max().item()).to(torch.float64)
    limit_logits = torch.where(k == limit_k, 0.0, -math.inf)
    logits = torch.where(dead, limit_logits, logits)
    probs = torch.softmax(logits, dim=-1)
    counts = torch.multinomial(probs, 1, generator=generator)
    return counts.view(p.shape)


def sample_mask(
    batch_size: int,
    seq_len: int,
    block_size: int,
    t: Tensor,
    schedule: NoiseSchedule,
    *,
    clip: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample which tokens the forward process (1) masks, one noise level per block.

    ``t`` has shape ``(batch_size, n_blocks)`` with ``n_blocks = seq_len // block_size`` (a scalar or size-1
    dims broadcast); block ``j`` covers tokens ``[j L', (j+1) L')``.

    * ``clip=None``: token ``i`` of block ``j`` is masked independently with probability
      ``schedule.mask_prob(t[:, j])`` (so a block's count is ``Binomial(L', 1 - alpha_t)``).
    * ``clip=(beta, omega)``: each block's masked count is drawn from ``Binomial(L', 1 - alpha_t)``
      truncated to :func:`feasible_counts` (both ends enforced, ``beta <= k / L' <= omega``) and the masked
      positions are a uniformly random subset of that size. This is exactly the stationary distribution of
      the official "resample blocks until their masked fraction is in range" loop, drawn without a loop.
      The NELBO weight is not adjusted (as in the official code).

    Draws use ``generator`` (which must live on ``t``'s device). Returns a bool tensor
    ``(batch_size, seq_len)``, ``True`` = masked.
    """
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(seq_len, "seq_len")
    _check_positive_int(block_size, "block_size")
    if seq_len % block_size:
        raise ValueError(f"seq_len={seq_len} is not a multiple of block_size={block_size}")
    n_blocks = seq_len // block_size
    t = _block_times(t, batch_size, n_blocks)
    p = schedule.mask_prob(t)
    device = p.device
    work = torch.promote_types(p.dtype, torch.float32)

    if clip is None:
        u = torch.rand(batch_size, n_blocks, block_size, generator=generator, device=device, dtype=work)
        return (u < p.to(work).unsqueeze(-1)).view(batch_size, seq_len)

    check_interval(block_size, clip)
    feasible = feasible_counts(block_size, clip)
    counts = _truncated_binomial_counts(p, block_size, feasible, generator)  # (batch, n_blocks)
    noise = torch.rand(
        batch_size, n_blocks, block_size, generator=generator, device=device, dtype=torch.float64
    )
    order = noise.argsort(dim=-1)  # a uniformly random permutation of the block's positions
    take = torch.arange(block_size, device=device) < counts.unsqueeze(-1)
    mask = torch.empty_like(take).scatter_(-1, order, take)
    return mask.view(batch_size, seq_len)

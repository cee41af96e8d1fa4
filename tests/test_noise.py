"""Tests for bd3lm.noise: stratified per-block time sampling and clipped masking (schedules: test_schedules.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bd3lm.noise import check_interval, feasible_counts, rank_generator, sample_mask, sample_t
from bd3lm.schedules import SCHEDULES, get_schedule

NAMES = sorted(SCHEDULES)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _chi2_threshold(df: int) -> float:
    """Loose upper bound for a chi-square(df) statistic: mean + 6 standard deviations."""
    return df + 6 * math.sqrt(2 * df)


def _chi2(observed: torch.Tensor, probs: list[float]) -> tuple[float, int]:
    """Pearson statistic of integer counts against ``probs`` (cells with zero probability must be empty)."""
    n = int(observed.sum())
    stat = 0.0
    cells = 0
    for obs, prob in zip(observed.tolist(), probs, strict=True):
        if prob == 0:
            assert obs == 0
            continue
        expected = n * prob
        stat += (obs - expected) ** 2 / expected
        cells += 1
    return stat, cells - 1


# ----------------------------------------------------------------------------------------------------------
# Time sampling
# ----------------------------------------------------------------------------------------------------------


def test_sample_t_antithetic_one_draw_per_stratum() -> None:
    k_batch, n_blocks = 8, 16
    n = k_batch * n_blocks
    u = sample_t(k_batch, n_blocks, interval=(0.0, 1.0), generator=_gen(3), dtype=torch.float64)
    assert u.shape == (k_batch, n_blocks)
    strata = torch.floor(u.flatten().sort().values * n).long()
    assert torch.equal(strata, torch.arange(n))
    # Row-major cell k is in stratum k: levels increase along blocks and across rows.
    assert torch.equal(torch.floor(u.flatten() * n).long(), torch.arange(n))


def test_sample_t_clipped_interval_is_stratified_affine_image() -> None:
    beta, omega = 0.3, 0.8
    t = sample_t(4, 32, interval=(beta, omega), generator=_gen(4), dtype=torch.float64)
    assert bool(((t >= beta) & (t <= omega)).all())
    u = (t.flatten() - beta) / (omega - beta)
    assert torch.equal(torch.floor(u.sort().values * t.numel()).long(), torch.arange(t.numel()))
    t32 = sample_t(16, 64, interval=(0.30000001192092896, 0.800000011920929), generator=_gen(5))
    assert t32.dtype == torch.float32
    assert bool(((t32 >= 0.30000001192092896) & (t32 <= 0.800000011920929)).all())


def test_sample_t_plain_uniform_and_degenerate_interval() -> None:
    t = sample_t(64, 32, antithetic=False, generator=_gen(6))
    assert bool(((t >= 1e-3) & (t <= 1.0)).all())
    assert not bool((t.flatten()[1:] >= t.flatten()[:-1]).all())  # not sorted: no stratification
    const = sample_t(3, 5, interval=(1.0, 1.0), generator=_gen(7))
    assert torch.equal(const, torch.ones(3, 5))


def test_rank_generators_differ_and_reproduce() -> None:
    a = sample_t(4, 8, generator=rank_generator(1234, 0))
    b = sample_t(4, 8, generator=rank_generator(1234, 1))
    a_again = sample_t(4, 8, generator=rank_generator(1234, 0))
    other_seed = sample_t(4, 8, generator=rank_generator(1235, 0))
    assert not torch.equal(a, b)
    assert torch.equal(a, a_again)
    assert not torch.equal(a, other_seed)
    with pytest.raises(ValueError, match="rank.*-1"):
        rank_generator(0, -1)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"interval": (0.7, 0.2)}, r"beta > omega.*0\.7"),
        ({"interval": (-0.1, 0.5)}, r"-0\.10"),
        ({"interval": (0.1, 1.2)}, r"1\.20"),
        ({"batch_size": 0}, r"batch_size.*0"),
        ({"n_blocks": 0}, r"n_blocks.*0"),
    ],
)
def test_sample_t_errors(kwargs: dict, pattern: str) -> None:
    args = {"batch_size": 2, "n_blocks": 3} | kwargs
    with pytest.raises(ValueError, match=pattern):
        sample_t(args.pop("batch_size"), args.pop("n_blocks"), **args)


# ----------------------------------------------------------------------------------------------------------
# Feasible counts
# ----------------------------------------------------------------------------------------------------------


def test_feasible_counts() -> None:
    assert feasible_counts(8, (0.25, 0.75)).tolist() == [2, 3, 4, 5, 6]
    assert feasible_counts(4, (0.0, 1.0)).tolist() == [0, 1, 2, 3, 4]
    # float32 endpoints from the official clip grid: 0.3 and 0.8 stored as 0.30000001192..., 0.80000001192...
    assert feasible_counts(10, (0.30000001192092896, 0.800000011920929)).tolist() == [3, 4, 5, 6, 7, 8]
    assert feasible_counts(4, (0.0010000000474974513, 0.5)).tolist() == [1, 2]
    assert feasible_counts(4, (0.4, 0.45)).numel() == 0
    check_interval(4, (0.25, 0.25))  # a single feasible count is fine


def test_check_interval_messages() -> None:
    msg = r"clip interval \[0\.40, 0\.45\] admits no whole number of masked tokens in a block of 4"
    with pytest.raises(ValueError, match=msg):
        check_interval(4, (0.4, 0.45))
    with pytest.raises(ValueError, match=r"\[0\.60, 0\.40\] has beta > omega"):
        check_interval(4, (0.6, 0.4))
    with pytest.raises(ValueError, match=r"\[0\.10, 1\.50\] must lie inside \[0, 1\]"):
        check_interval(4, (0.1, 1.5))
    with pytest.raises(ValueError, match="block_size.*0"):
        check_interval(0, (0.1, 0.5))


# ----------------------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["loglinear", "cosine", "linear"])
def test_unclipped_mask_fraction_matches_mask_prob(name: str) -> None:
    sched = get_schedule(name)
    batch, block, levels = 4000, 16, torch.tensor([0.05, 0.3, 0.6, 0.95])
    t = levels.expand(batch, -1)
    mask = sample_mask(batch, block * len(levels), block, t, sched, generator=_gen(8))
    assert mask.dtype == torch.bool and mask.shape == (batch, block * len(levels))
    per_block = mask.view(batch, len(levels), block).sum(-1)  # (batch, n_blocks)
    n = batch * block
    p = sched.mask_prob(levels).double()
    z = (per_block.sum(0).double() - n * p) / torch.sqrt(n * p * (1 - p))
    assert bool((z.abs() < 5).all()), z
    # Each block's count is Binomial(L', p): independent tokens, not just the right mean.
    for j in range(len(levels)):
        pj = p[j].item()
        probs = [math.comb(block, k) * pj**k * (1 - pj) ** (block - k) for k in range(block + 1)]
        hist = torch.bincount(per_block[:, j], minlength=block + 1)
        keep = [k for k in range(block + 1) if batch * probs[k] >= 5]
        rest = [k for k in range(block + 1) if k not in keep]  # pool the tiny tails into one cell
        obs = torch.cat([hist[keep], hist[rest].sum().view(1)]) if rest else hist[keep]
        exp_probs = [probs[k] for k in keep] + ([sum(probs[k] for k in rest)] if rest else [])
        stat, df = _chi2(obs, exp_probs)
        assert stat < _chi2_threshold(df), (j, stat, df)


def test_unclipped_extremes() -> None:
    for name in NAMES:
        sched = get_schedule(name)
        ones = torch.ones(3, 4)
        if name != "linear":  # alpha_1 = 0 exactly
            assert bool(sample_mask(3, 32, 8, ones, sched, generator=_gen(9)).all())
        assert not bool(sample_mask(3, 32, 8, torch.zeros(3, 4), sched, generator=_gen(9)).any())


def test_t_equal_one_loglinear_masks_everything() -> None:
    sched = get_schedule("loglinear")
    assert bool(sample_mask(5, 64, 4, torch.ones(5, 16), sched, generator=_gen(10)).all())
    assert bool(sample_mask(5, 64, 4, torch.ones(5, 16), sched, clip=(0.5, 1.0), generator=_gen(10)).all())
    assert bool(sample_mask(5, 64, 1, torch.tensor(1.0), sched, clip=(1.0, 1.0), generator=_gen(10)).all())


@pytest.mark.parametrize(
    ("block", "clip"),
    [
        (4, (0.25, 0.5)),
        (4, (0.0010000000474974513, 0.5)),
        (8, (0.30000001192092896, 0.800000011920929)),
        (16, (0.5, 1.0)),
        (16, (0.25, 0.25)),
        (1, (1.0, 1.0)),
    ],
)
def test_clipped_mask_fraction_always_inside_interval(block: int, clip: tuple[float, float]) -> None:
    batch, n_blocks = 256, 8
    t = sample_t(batch, n_blocks, generator=_gen(11))  # t over all of [1e-3, 1]: many blocks need truncation
    mask = sample_mask(
        batch, n_blocks * block, block, t, get_schedule("loglinear"), clip=clip, generator=_gen(12)
    )
    frac = mask.view(batch, n_blocks, block).double().mean(-1)
    assert bool((frac >= clip[0] - 1e-6).all()) and bool((frac <= clip[1] + 1e-6).all())


@pytest.mark.parametrize(
    ("block", "clip", "p"), [(8, (0.25, 0.75), 0.3), (8, (0.0, 0.5), 0.9), (5, (0.4, 1.0), 0.1)]
)
def test_clipped_count_distribution_is_truncated_binomial(
    block: int, clip: tuple[float, float], p: float
) -> None:
    batch, n_blocks = 2000, 20
    t = torch.full((batch, n_blocks), p)
    mask = sample_mask(
        batch, n_blocks * block, block, t, get_schedule("loglinear"), clip=clip, generator=_gen(13)
    )
    counts = mask.view(-1, block).sum(-1)
    raw = [math.comb(block, k) * p**k * (1 - p) ** (block - k) for k in range(block + 1)]
    feasible = [clip[0] <= k / block <= clip[1] for k in range(block + 1)]
    total = sum(r for r, ok in zip(raw, feasible, strict=True) if ok)
    probs = [r / total if ok else 0.0 for r, ok in zip(raw, feasible, strict=True)]
    stat, df = _chi2(torch.bincount(counts, minlength=block + 1), probs)
    assert stat < _chi2_threshold(df), (stat, df)
    # Given its count, the masked subset is uniform: every position has the same marginal frequency.
    n = counts.numel()
    mean_frac = sum(k * pk for k, pk in enumerate(probs)) / block
    per_pos = mask.view(-1, block).double().mean(0)
    # The marginal of one position is Bernoulli(mean_frac); its sd over n blocks bounds the deviation.
    sd = math.sqrt(mean_frac * (1 - mean_frac) / n)
    assert bool(((per_pos - mean_frac).abs() < 6 * sd).all()), (per_pos, mean_frac)


def test_clipped_limits_when_binomial_mass_is_infeasible() -> None:
    sched = get_schedule("loglinear")
    # p = 1 puts all binomial mass on k = 4, which (0.25, 0.5) forbids; the p -> 1 limit is k = 2.
    full = sample_mask(6, 16, 4, torch.ones(6, 4), sched, clip=(0.25, 0.5), generator=_gen(14))
    assert torch.equal(full.view(6, 4, 4).sum(-1), torch.full((6, 4), 2))
    empty = sample_mask(6, 16, 4, torch.zeros(6, 4), sched, clip=(0.25, 0.5), generator=_gen(14))
    assert torch.equal(empty.view(6, 4, 4).sum(-1), torch.full((6, 4), 1))


def test_sample_mask_reproducible_with_generator() -> None:
    sched = get_schedule("loglinear")
    t = sample_t(4, 8, generator=_gen(15))
    for clip in (None, (0.25, 0.75)):
        a = sample_mask(4, 64, 8, t, sched, clip=clip, generator=_gen(16))
        b = sample_mask(4, 64, 8, t, sched, clip=clip, generator=_gen(16))
        assert torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    block=st.integers(1, 12),
    lo=st.floats(0, 1, allow_nan=False),
    width=st.floats(0, 1, allow_nan=False),
    seed=st.integers(0, 2**31 - 1),
)
def test_clip_property(block: int, lo: float, width: float, seed: int) -> None:
    clip = (lo, min(1.0, lo + width))
    feasible = [k for k in range(block + 1) if clip[0] - 1e-6 <= k / block <= clip[1] + 1e-6]
    if not feasible:
        with pytest.raises(ValueError, match="admits no whole number"):
            check_interval(block, clip)
        return
    assert feasible_counts(block, clip).tolist() == feasible
    t = sample_t(8, 4, generator=_gen(seed))
    mask = sample_mask(8, 4 * block, block, t, get_schedule("cosine"), clip=clip, generator=_gen(seed + 1))
    counts = mask.view(8, 4, block).sum(-1)
    assert bool(torch.isin(counts, torch.tensor(feasible)).all())


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"clip": (0.4, 0.45)}, r"\[0\.40, 0\.45\] admits no whole number.*block of 4"),
        ({"clip": (0.6, 0.4)}, r"\[0\.60, 0\.40\] has beta > omega"),
        ({"t": torch.full((2, 4), 1.25)}, r"t must lie in \[0, 1\]; got min=1\.25, max=1\.25"),
        ({"t": torch.full((2, 4), -0.5)}, r"min=-0\.5"),
        ({"seq_len": 18}, r"seq_len=18 is not a multiple of block_size=4"),
        ({"t": torch.rand(2, 3)}, r"\(2, 4\).*got \(2, 3\)"),
        ({"t": torch.rand(2)}, r"got \(2,\)"),
    ],
)
def test_sample_mask_errors(kwargs: dict, pattern: str) -> None:
    args = {
        "batch_size": 2,
        "seq_len": 16,
        "block_size": 4,
        "t": torch.rand(2, 4),
        "schedule": get_schedule("loglinear"),
    } | kwargs
    with pytest.raises(ValueError, match=pattern):
        sample_mask(
            args.pop("batch_size"),
            args.pop("seq_len"),
            args.pop("block_size"),
            args.pop("t"),
            args.pop("schedule"),
            **args,
        )

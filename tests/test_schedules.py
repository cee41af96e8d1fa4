"""Tests for bd3lm.schedules: the masking schedules alpha_t, their NELBO weights and total noise sigma(t)."""

from __future__ import annotations

import math

import pytest
import torch

from bd3lm.schedules import DEFAULT_SIGMA_MAX, SCHEDULES, LogLinearSchedule, NoiseSchedule, get_schedule

NAMES = sorted(SCHEDULES)
#: schedules with alpha_0 = 1 exactly (geometric starts at sigma_min > 0, see test_geometric_schedule)
MASKING = [n for n in NAMES if n != "geometric"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(SCHEDULES) == {"loglinear", "linear", "cosine", "square", "square_root", "log", "geometric"}
    for name in NAMES:
        sched = get_schedule(name)
        assert isinstance(sched, NoiseSchedule) and not isinstance(sched, torch.nn.Module)
        assert sched.name == name


@pytest.mark.parametrize("name", MASKING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_endpoints(name: str, dtype: torch.dtype) -> None:
    sched = get_schedule(name)
    ends = torch.tensor([0.0, 1.0], dtype=dtype)
    alpha = sched.alpha(ends)
    assert abs(alpha[0].item() - 1.0) <= 1e-6
    assert 0.0 <= alpha[1].item() <= 1e-3 + 1e-9  # linear: alpha_1 = eps = 1e-3 up to rounding


@pytest.mark.parametrize("name", NAMES)
def test_mask_prob_is_one_minus_alpha(name: str) -> None:
    sched = get_schedule(name)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    torch.testing.assert_close(sched.mask_prob(t), 1 - sched.alpha(t), rtol=0, atol=1e-12)
    alpha = sched.alpha(t)
    assert bool(((alpha >= 0) & (alpha <= 1)).all())
    assert bool((alpha[1:] <= alpha[:-1]).all()), "alpha must be non-increasing"


@pytest.mark.parametrize("name", NAMES)
def test_weight_is_minus_alpha_prime_over_mask_prob(name: str) -> None:
    sched = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 199, dtype=torch.float64)
    expected = -sched.alpha_prime(t) / (1 - sched.alpha(t))
    torch.testing.assert_close(sched.weight(t), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_alpha_prime_matches_central_differences(name: str) -> None:
    sched = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 199, dtype=torch.float64)
    h = 1e-6
    fd = (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(sched.alpha_prime(t), fd, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_finite_and_positive_on_half_open_unit_interval(name: str, dtype: torch.dtype) -> None:
    sched = get_schedule(name)
    tiny = torch.tensor([1e-7, 1e-5, 1e-3, 0.5, 1 - 1e-6, 1.0], dtype=dtype)
    grid = torch.linspace(0, 1, 4097, dtype=dtype)[1:]
    for t in (tiny, grid):
        w = sched.weight(t)
        assert w.dtype == dtype and w.shape == t.shape
        assert bool(torch.isfinite(w).all()) and bool((w > 0).all())


def test_loglinear_weight_is_exactly_one_over_t() -> None:
    sched = get_schedule("loglinear")
    for dtype in (torch.float32, torch.float64):
        t = torch.rand(1000, generator=_gen(1), dtype=dtype).clamp_min(1e-6)
        assert torch.equal(sched.weight(t), 1 / t)
        assert torch.equal(sched.mask_prob(t), t)


@pytest.mark.parametrize(
    ("name", "closed_form"),
    [
        ("square", lambda t: 2 / t),
        ("square_root", lambda t: 1 / (2 * t)),
        ("log", lambda t: 1 / ((1 + t) * torch.log(1 + t))),
        ("cosine", lambda t: (math.pi / 2) * torch.sin(math.pi * t / 2) / (1 - torch.cos(math.pi * t / 2))),
    ],
)
def test_weight_closed_forms(name: str, closed_form) -> None:
    t = torch.linspace(0.05, 1.0, 96, dtype=torch.float64)
    torch.testing.assert_close(get_schedule(name).weight(t), closed_form(t), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", MASKING)
def test_sigma_is_minus_log_alpha_and_capped(name: str) -> None:
    sched = get_schedule(name)
    t = torch.linspace(0, 1, 513, dtype=torch.float64)
    sigma = sched.sigma(t)
    assert bool(torch.isfinite(sigma).all()) and bool((sigma >= 0).all())
    assert bool((sigma[1:] >= sigma[:-1]).all())
    assert sigma[0].item() == 0.0
    assert sigma[-1].item() == pytest.approx(sched.sigma_max, rel=1e-12)
    alpha = sched.alpha(t)
    uncapped = alpha > math.exp(-sched.sigma_max)
    torch.testing.assert_close(sigma[uncapped], -torch.log(alpha[uncapped]), rtol=1e-9, atol=1e-12)


def test_linear_schedule_total_noise_is_linear() -> None:
    sched = get_schedule("linear", eps=1e-4)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(sched.sigma(t), -math.log(1e-4) * t)
    assert sched.alpha(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(1e-4, rel=1e-12)
    assert get_schedule("loglinear").sigma_max == DEFAULT_SIGMA_MAX


@pytest.mark.parametrize("name", NAMES)
def test_dtype_and_shape_preserved(name: str) -> None:
    sched = get_schedule(name)
    for dtype in (torch.float32, torch.float64):
        t = torch.rand(3, 5, generator=_gen(2), dtype=dtype)
        for fn in (sched.alpha, sched.mask_prob, sched.alpha_prime, sched.weight, sched.sigma):
            out = fn(t)
            assert out.dtype == dtype and out.shape == t.shape


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("bad", "pattern"), [(-0.25, r"min=-0\.25"), (1.5, r"max=1\.5"), (math.nan, "nan")])
def test_schedule_rejects_t_outside_unit_interval(name: str, bad: float, pattern: str) -> None:
    sched = get_schedule(name)
    t = torch.tensor([0.5, bad])
    for fn in (sched.alpha, sched.mask_prob, sched.alpha_prime, sched.weight, sched.sigma):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\].*" + pattern):
            fn(t)


def test_unknown_schedule_names_value_and_choices() -> None:
    with pytest.raises(ValueError, match=r"'bogus'.*cosine.*geometric.*loglinear.*square_root"):
        get_schedule("bogus")


def test_geometric_schedule_closed_form() -> None:
    """sigma(t) = sigma_min^(1-t) sigma_max^t (SEDD), checked at the endpoints and the midpoint (geometric mean)."""
    sched = get_schedule("geometric", sigma_min=1e-3, sigma_max=10.0)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sched.sigma(t), torch.tensor([1e-3, 0.1, 10.0], dtype=torch.float64))
    torch.testing.assert_close(sched.alpha(t), torch.exp(-sched.sigma(t)))
    with pytest.raises(ValueError, match="sigma_min"):
        get_schedule("geometric", sigma_min=2.0, sigma_max=1.0)


def test_bad_schedule_parameters() -> None:
    with pytest.raises(ValueError, match="eps"):
        get_schedule("linear", eps=1.5)
    with pytest.raises(ValueError, match="sigma_max"):
        LogLinearSchedule(sigma_max=math.inf)

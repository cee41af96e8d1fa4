"""Masking schedules ``alpha_t`` of the absorbing forward process and their NELBO weights (MDLM §3, BD3-LM §3).

Each schedule gives ``alpha_t`` (probability that a token is still clean at time t), ``alpha'_t``, the
continuous-time NELBO weight ``w(t) = -alpha'_t / (1 - alpha_t)`` and the total noise ``sigma(t) = -log alpha_t``
(the score-entropy family's σ, :mod:`bd3lm.graphs`). Time sampling and clipped masking are in :mod:`bd3lm.noise`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_SIGMA_MAX",
    "SCHEDULES",
    "CosineSchedule",
    "GeometricSchedule",
    "LinearSchedule",
    "LogLinearSchedule",
    "LogSchedule",
    "NoiseSchedule",
    "SquareRootSchedule",
    "SquareSchedule",
    "as_time",
    "get_schedule",
]

#: Default cap on the total noise sigma(t) = -log(alpha_t): -log(1e-3) ~ 6.91, the value of the official
#: log-linear schedule's ``sigma_max`` (total noise at t = 1 with eps = 1e-3).
DEFAULT_SIGMA_MAX: float = -math.log(1e-3)

_LN2: float = math.log(2.0)


def as_time(t: Tensor | float) -> Tensor:
    """Return ``t`` as a floating tensor after checking that every element lies in [0, 1].

    Python numbers and integer tensors are converted to the default floating dtype; floating tensors keep
    their dtype and device. Raises ``ValueError`` naming the offending range (NaN counts as outside).
    """
    if not isinstance(t, Tensor):
        t = torch.tensor(t, dtype=torch.get_default_dtype())
    elif not torch.is_floating_point(t):
        t = t.to(torch.get_default_dtype())
    if t.numel() > 0 and not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"t must lie in [0, 1]; got min={t.min().item():.6g}, max={t.max().item():.6g}")
    return t


# ----------------------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------------------


class NoiseSchedule(ABC):
    """A masking schedule ``alpha_t`` of the absorbing forward process, eq. (1).

    Every public method takes a floating tensor ``t`` with all elements in [0, 1] (``ValueError`` otherwise),
    computes elementwise in ``t``'s dtype and device and returns a tensor of the same shape.

    Subclasses implement ``_alpha``, ``_alpha_prime`` and ``_weight`` (and override ``_mask_prob`` /
    ``_sigma`` when a more accurate closed form exists); those private versions skip validation.

    Args:
        sigma_max: finite cap of :meth:`sigma`, the total noise fed to optional time conditioning.
    """

    name: ClassVar[str] = ""

    def __init__(self, sigma_max: float = DEFAULT_SIGMA_MAX) -> None:
        sigma_max = float(sigma_max)
        if not (math.isfinite(sigma_max) and sigma_max > 0):
            raise ValueError(f"sigma_max must be finite and > 0; got {sigma_max!r}")
        self.sigma_max = sigma_max

    # -- public API -----------------------------------------------------------------------------------------

    def alpha(self, t: Tensor) -> Tensor:
        """Probability that a token is still clean at time t: ``alpha_t`` of eq. (1)."""
        return self._alpha(as_time(t))

    def mask_prob(self, t: Tensor) -> Tensor:
        """Probability that a token is masked at time t: ``1 - alpha_t`` (eq. (1)), computed stably."""
        return self._mask_prob(as_time(t))

    def alpha_prime(self, t: Tensor) -> Tensor:
        """Time derivative ``d alpha_t / dt`` (<= 0), which enters the NELBO weight of eq. (2)."""
        return self._alpha_prime(as_time(t))

    def weight(self, t: Tensor) -> Tensor:
        """Continuous-time NELBO weight ``-alpha'_t / (1 - alpha_t)`` of eq. (2) (MDLM L^inf).

        Finite and positive on (0, 1]; it diverges as t -> 0 for every schedule here.
        """
        return self._weight(as_time(t))

    def sigma(self, t: Tensor) -> Tensor:
        """Total noise ``sigma(t) = -log alpha_t``, clamped to ``sigma_max`` (finite even where alpha = 0)."""
        return self._sigma(as_time(t))

    # -- implementation hooks -----------------------------------------------------------------------------

    @abstractmethod
    def _alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _alpha_prime(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _weight(self, t: Tensor) -> Tensor: ...

    def _mask_prob(self, t: Tensor) -> Tensor:
        return 1 - self._alpha(t)

    def _sigma(self, t: Tensor) -> Tensor:
        # -log(alpha) = -log1p(-(1 - alpha)); accurate for small t when mask_prob is.
        return torch.neg(torch.log1p(-self._mask_prob(t))).clamp(max=self.sigma_max)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_max={self.sigma_max:.6g})"


class LogLinearSchedule(NoiseSchedule):
    """Log-linear schedule ``alpha_t = 1 - t`` (BD3-LM / MDLM default).

    ``1 - alpha_t = t``, ``alpha'_t = -1`` and the weight of eq. (2) is exactly ``1 / t``;
    ``sigma(t) = -log(1 - t)``.
    """

    name = "loglinear"

    def _alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def _mask_prob(self, t: Tensor) -> Tensor:
        return t.clone()

    def _alpha_prime(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -1.0)

    def _weight(self, t: Tensor) -> Tensor:
        return 1 / t


class LinearSchedule(NoiseSchedule):
    """Total noise linear in t: ``sigma(t) = sigma_max * t``, ``alpha_t = exp(-sigma(t))``.

    ``sigma_max = -log(eps)`` so ``alpha_1 = eps``. ``1 - alpha_t = -expm1(-sigma_max t)``,
    ``alpha'_t = -sigma_max exp(-sigma_max t)`` and the weight of eq. (2) is
    ``sigma_max / expm1(sigma_max t)``.

    Args:
        eps: clean probability at t = 1, in (0, 1).
    """

    name = "linear"

    def __init__(self, eps: float = 1e-3) -> None:
        eps = float(eps)
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must lie in (0, 1); got {eps!r}")
        self.eps = eps
        super().__init__(sigma_max=-math.log(eps))

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-self.sigma_max * t)

    def _mask_prob(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.sigma_max * t)

    def _alpha_prime(self, t: Tensor) -> Tensor:
        return -self.sigma_max * torch.exp(-self.sigma_max * t)

    def _weight(self, t: Tensor) -> Tensor:
        return self.sigma_max / torch.expm1(self.sigma_max * t)

    def _sigma(self, t: Tensor) -> Tensor:
        return self.sigma_max * t

    def __repr__(self) -> str:
        return f"LinearSchedule(eps={self.eps:.6g})"


class CosineSchedule(NoiseSchedule):
    """Cosine schedule ``alpha_t = cos(pi t / 2)``.

    Computed as ``sin(pi (1 - t) / 2)`` so that ``alpha_1 = 0`` exactly; ``1 - alpha_t = 2 sin^2(pi t / 4)``,
    ``alpha'_t = -(pi / 2) sin(pi t / 2)`` and the weight of eq. (2) simplifies to ``(pi / 2) cot(pi t / 4)``.
    """

    name = "cosine"

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.sin((math.pi / 2) * (1 - t))

    def _mask_prob(self, t: Tensor) -> Tensor:
        return 2 * torch.sin((math.pi / 4) * t) ** 2

    def _alpha_prime(self, t: Tensor) -> Tensor:
        return -(math.pi / 2) * torch.sin((math.pi / 2) * t)

    def _weight(self, t: Tensor) -> Tensor:
        return (math.pi / 2) / torch.tan((math.pi / 4) * t)


class SquareSchedule(NoiseSchedule):
    """Square schedule ``alpha_t = 1 - t^2``: ``alpha'_t = -2t``, weight of eq. (2) ``= 2 / t``."""

    name = "square"

    def _alpha(self, t: Tensor) -> Tensor:
        return 1 - t * t

    def _mask_prob(self, t: Tensor) -> Tensor:
        return t * t

    def _alpha_prime(self, t: Tensor) -> Tensor:
        return -2 * t

    def _weight(self, t: Tensor) -> Tensor:
        return 2 / t


class SquareRootSchedule(NoiseSchedule):
    """Square-root schedule ``alpha_t = 1 - sqrt(t)``: ``alpha'_t = -1 / (2 sqrt(t))`` (-inf at t = 0),
    weight of eq. (2) ``= 1 / (2t)``."""

    name = "square_root"

    def _alpha(self, t: Tensor) -> Tensor:
        return 1 - torch.sqrt(t)

    def _mask_prob(self, t: Tensor) -> Tensor:
        return torch.sqrt(t)

    def _alpha_prime(self, t: Tensor) -> Tensor:
        return -0.5 / torch.sqrt(t)

    def _weight(self, t: Tensor) -> Tensor:
        return 0.5 / t


class LogSchedule(NoiseSchedule):
    """Log schedule ``alpha_t = 1 - log(1 + t) / log 2``.

    ``alpha'_t = -1 / ((1 + t) log 2)`` and the weight of eq. (2) is ``1 / ((1 + t) log1p(t))``.
    ``alpha`` is clamped at 0 against rounding at t = 1.
    """

    name = "log"

    def _alpha(self, t: Tensor) -> Tensor:
        return (1 - self._mask_prob(t)).clamp(min=0)

    def _mask_prob(self, t: Tensor) -> Tensor:
        return (torch.log1p(t) / _LN2).clamp(max=1)

    def _alpha_prime(self, t: Tensor) -> Tensor:
        return -1 / ((1 + t) * _LN2)

    def _weight(self, t: Tensor) -> Tensor:
        return 1 / ((1 + t) * torch.log1p(t))


class GeometricSchedule(NoiseSchedule):
    """SEDD's geometric total noise ``sigma(t) = sigma_min^(1-t) sigma_max^t`` (Lou et al. 2024, used with the
    uniform graph), ``alpha_t = exp(-sigma(t))``, ``sigma'(t) = sigma(t) log(sigma_max / sigma_min)``.

    ``sigma(0) = sigma_min > 0``: the data at t = 0 already carries a little noise (1e-4 by default), and
    ``sigma(1) = sigma_max`` is finite, which the uniform graph's J2 bound needs.
    """

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"geometric schedule needs 0 < sigma_min < sigma_max; got {sigma_min!r}, {sigma_max!r}")
        self.sigma_min = sigma_min
        super().__init__(sigma_max=sigma_max)

    def _sig(self, t: Tensor) -> Tensor:
        return self.sigma_min ** (1 - t) * self.sigma_max**t

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-self._sig(t))

    def _mask_prob(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self._sig(t))

    def _alpha_prime(self, t: Tensor) -> Tensor:
        s = self._sig(t)
        return -s * math.log(self.sigma_max / self.sigma_min) * torch.exp(-s)

    def _weight(self, t: Tensor) -> Tensor:
        s = self._sig(t)
        return s * math.log(self.sigma_max / self.sigma_min) / torch.expm1(s)

    def _sigma(self, t: Tensor) -> Tensor:
        return self._sig(t)

    def __repr__(self) -> str:
        return f"GeometricSchedule(sigma_min={self.sigma_min:.6g}, sigma_max={self.sigma_max:.6g})"


#: Registry of schedule names -> classes, used by :func:`get_schedule`.
SCHEDULES: dict[str, type[NoiseSchedule]] = {
    cls.name: cls
    for cls in (
        LogLinearSchedule,
        LinearSchedule,
        CosineSchedule,
        SquareSchedule,
        SquareRootSchedule,
        LogSchedule,
        GeometricSchedule,
    )
}


def get_schedule(name: str, **kw: float) -> NoiseSchedule:
    """Build the schedule registered as ``name`` in :data:`SCHEDULES`, passing ``kw`` to its constructor.

    Raises ``ValueError`` for an unknown name, listing the valid ones.
    """
    try:
        cls = SCHEDULES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown noise schedule {name!r}; valid names: {', '.join(sorted(SCHEDULES))}"
        ) from None
    return cls(**kw)

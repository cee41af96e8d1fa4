"""SEDD's samplers inside a block: the Euler and analytic (Tweedie τ-leaping) predictors and the final denoiser
(Lou et al. 2024, §4.1), for any graph of :mod:`bd3lm.graphs`.

Unlike the absorbing rules (which reveal masked positions and freeze them), these rules *rewrite* the block at
every step: each free position moves from ``x_t`` to ``x_s ~ p(x_s | x_t)`` independently (the τ-leaping
factorisation), which on the uniform and roulette graphs can change an already-decoded token ("prediction
refinement"). The grid is ``t_k = linspace(1 - 1e-6, eps, steps + 1)`` (σ(1) = ∞ for the log-linear schedule);
``steps`` predictor calls go from ``t_k`` to ``t_{k+1}``, then one denoising call jumps from ``eps`` to σ = 0 and
drops the mask. So a block costs ``steps + 1`` network calls.

- **analytic**: ``p(y) ∝ [exp(-Δσ Q) s]_y · exp(Δσ Q)[x, y]`` with ``Δσ = σ(t_k) - σ(t_{k+1})`` (exact for one
  token with exact ratios);
- **euler**: ``p(y) = δ_{x y} + Δt σ'(t_k) Q[x, y] s_y`` (clipped at 0 and renormalised).

On the absorbing graph with the log-linear schedule both equal MDLM's DDPM step (each masked position is
revealed with probability ``Δt / t``). Ratios ``s`` come from the network through
:func:`bd3lm.score_objectives.model_ratios` (SEDD's log-score output, or a clean-token distribution mapped to
ratios). A time-conditioned network is called with σ(t_k) on the block and 0 on the clean prefix.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from bd3lm.sampling.processing import TokenSampler, sample_categorical
from bd3lm.sampling.rules import BlockRule
from bd3lm.schedules import NoiseSchedule, get_schedule

__all__ = ["AnalyticRule", "EulerRule", "ScoreRule"]

T_TOP = 1.0 - 1e-6


class ScoreRule(BlockRule):
    """A rewriting rule: ``steps`` predictor steps then the denoiser, every free position updated each call.

    Args:
        steps: predictor steps per block (>= 1).
        schedule: the noise schedule the model was trained with (default: the model's ``noise_schedule``, read
            again at every :meth:`bind`).
        eps: the last time of the grid, where the denoiser takes over (SEDD: 1e-5).
    """

    rewrites: ClassVar[bool] = True
    predictor: ClassVar[str] = ""

    def __init__(self, steps: int, schedule: NoiseSchedule | str | None = None, eps: float = 1e-5) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if not 0.0 < float(eps) < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5); got {eps!r}")
        self.steps, self.eps = steps, float(eps)
        self.given_schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
        self.schedule = self.given_schedule
        self.model = None
        self.graph = None

    def bind(self, model) -> None:
        """Attach the model (its graph, output parameterisation and, by default, its schedule)."""
        from bd3lm.score_objectives import graph_of

        self.model, self.graph = model, graph_of(model)
        own = getattr(model.config, "noise_schedule", None) or "loglinear"
        self.schedule = self.given_schedule or get_schedule(own)
        t = torch.linspace(T_TOP, self.eps, self.steps + 1, dtype=torch.float64)
        alpha = self.schedule.alpha(t)
        self.t = t
        self.sigma = -torch.log(alpha)
        self.rate = -self.schedule.alpha_prime(t) / alpha
        self.cond_sigma = self.sigma.float()  # σ(t) itself, as fed to time conditioning in training

    @property
    def n_calls(self) -> int:
        """Network calls per block: the predictor steps and the denoiser."""
        return self.steps + 1

    def timestep(self, k: int) -> float:
        """σ fed to a time-conditioned network at call ``k``."""
        return float(self.cond_sigma[min(k, self.steps)])

    def init_block(self, x: Tensor, free: Tensor, sampler: TokenSampler) -> Tensor:
        """The free positions start at a draw from the graph's limit (all mask, or uniform tokens)."""
        draw = self.graph.sample_limit(tuple(x.shape), x.device, sampler.generator)
        return torch.where(free, draw, x)

    def update(self, logits: Tensor, x: Tensor, free: Tensor, k: int, sampler: TokenSampler) -> Tensor:
        """Call ``k``'s transition of the free positions of ``x`` (B, L') given the block's logits (B, L', V)."""
        graph = self.graph
        sigma_t = self.sigma[min(k, self.steps)].to(x.device)
        s = _ratios(self.model, graph, logits, x, sigma_t)
        if k >= self.steps:
            probs = graph.denoise_probs(s, x, sigma_t)
        else:
            probs = self.step_probs(s, x, k)
        if sampler.greedy:  # temperature 0: the most likely transition at every call (the start is still a draw)
            new = probs.argmax(-1)
        else:
            new = sample_categorical(torch.log(probs), sampler.generator)
        return torch.where(free, new, x)

    def step_probs(self, s: Tensor, x: Tensor, k: int) -> Tensor:
        raise NotImplementedError

    def step(self, logits: Tensor, todo: Tensor, sampler: TokenSampler) -> tuple[Tensor, Tensor]:
        raise TypeError(f"{type(self).__name__} rewrites whole blocks: the engine calls update(), not step()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, schedule={self.schedule!r}, eps={self.eps:g})"


def _ratios(model, graph, logits: Tensor, x: Tensor, sigma_t: Tensor) -> Tensor:
    from bd3lm.score_objectives import model_ratios

    return model_ratios(model, graph, logits, x, sigma_t.expand(x.shape))


class AnalyticRule(ScoreRule):
    """SEDD's analytic predictor (Tweedie τ-leaping) with the final denoiser."""

    name = "analytic"

    def step_probs(self, s: Tensor, x: Tensor, k: int) -> Tensor:
        dsigma = (self.sigma[k] - self.sigma[k + 1]).to(x.device)
        return self.graph.analytic_probs(s, x, dsigma)


class EulerRule(ScoreRule):
    """SEDD's Euler predictor with the final denoiser."""

    name = "euler"

    def step_probs(self, s: Tensor, x: Tensor, k: int) -> Tensor:
        h = ((self.t[k] - self.t[k + 1]) * self.rate[k]).to(x.device)
        return self.graph.euler_probs(s, x, h)

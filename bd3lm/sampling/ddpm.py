"""Ancestral (DDPM-style) sampler of the absorbing process, T steps per block (MDLM §3.2.3, BD3-LM §4).

The reverse step from time t to s < t of the masked process factorises over positions: a masked position stays
masked with probability ``(1 - alpha_s) / (1 - alpha_t)`` and otherwise becomes a token drawn from
``p_theta(x0)``, i.e. it is revealed with probability ``(alpha_s - alpha_t) / (1 - alpha_t)``; revealed tokens
are kept (carry-over). The grid has T + 1 points ``t_i = 1 - i / T`` (i = 0..T) and step i goes from ``t_i``
to ``s = t_{i+1}``, so the last step has ``s = 0`` (``alpha_0 = 1``) and reveals everything left; ``t`` is
never 0 and nothing divides by zero (the official code's ``linspace(1, 0, T)`` grid reaches t = 0 and produces
NaN). For the log-linear schedule ``alpha_t = 1 - t`` the reveal probability is
``(t - s) / t = 1 / (T - i)``, computed exactly.

A step that reveals nothing leaves the block unchanged, so the engine reuses the previous ``p_theta(x0)`` and
makes no new network call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bd3lm.sampling.processing import TokenSampler
from bd3lm.sampling.rules import BlockRule, scatter_tokens

if TYPE_CHECKING:
    from bd3lm.schedules import NoiseSchedule

__all__ = ["DDPMRule"]


class DDPMRule(BlockRule):
    """T-step ancestral update per block.

    Args:
        steps: T >= 1, the number of steps per block (default in :func:`~bd3lm.sampling.generate`: L').
        schedule: the masking schedule ``alpha_t``; ``None`` = log-linear (closed form ``1 / (T - i)``).
    """

    name = "ddpm"

    def __init__(self, steps: int, schedule: NoiseSchedule | None = None) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        self.steps = steps
        self.schedule = schedule
        self.i = 0

    def start_block(self, todo: Tensor) -> None:
        self.i = 0

    def reveal_prob(self, i: int) -> float:
        """``(alpha_s - alpha_t) / (1 - alpha_t)`` at step i (t = 1 - i/T, s = 1 - (i+1)/T); 1 at the end."""
        t_steps = self.steps
        if i >= t_steps - 1:
            return 1.0
        if self.schedule is None:
            return 1.0 / (t_steps - i)
        t = torch.tensor([1.0 - i / t_steps], dtype=torch.float64)
        s = torch.tensor([1.0 - (i + 1) / t_steps], dtype=torch.float64)
        a_t, a_s = self.schedule.alpha(t), self.schedule.alpha(s)
        return float(((a_s - a_t) / self.schedule.mask_prob(t)).clamp(0.0, 1.0))

    def step(self, logits: Tensor, todo: Tensor, sampler: TokenSampler) -> tuple[Tensor, Tensor]:
        prob = self.reveal_prob(self.i)
        self.i += 1
        reveal = todo & (sampler.uniform(tuple(todo.shape), todo.device) < prob)
        tokens = scatter_tokens(todo, reveal, sampler.sample(logits[reveal]))
        return tokens, reveal

    def __repr__(self) -> str:
        return f"DDPMRule(steps={self.steps}, schedule={self.schedule!r})"

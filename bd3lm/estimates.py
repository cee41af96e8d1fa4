"""Pieces every Monte-Carlo objective shares (the block-diffusion NELBO of :mod:`bd3lm.objectives` and the
score-entropy family of :mod:`bd3lm.score_objectives`): the result of a loss, stratified per-block times and the
schedule a model was trained with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bd3lm.noise import sample_t
from bd3lm.schedules import NoiseSchedule, get_schedule

__all__ = ["LossOutput", "model_schedule", "stratified_t"]


@dataclass
class LossOutput:
    """``loss``: scalar to backpropagate (nats/token); the rest detached."""

    loss: Tensor
    nll_sum: Tensor
    n_tokens: int
    per_block: Tensor
    nll_per_seq: Tensor


def model_schedule(model, schedule: str | NoiseSchedule | None) -> NoiseSchedule:
    """``schedule`` as an object; ``None`` = the model's ``config.noise_schedule`` (log-linear by default)."""
    if schedule is None:
        schedule = getattr(model.config, "noise_schedule", None) or "loglinear"
    return get_schedule(schedule) if isinstance(schedule, str) else schedule


def stratified_t(
    batch_size: int, n_blocks: int, interval: tuple[float, float], generator: torch.Generator | None, device=None
) -> Tensor:
    """One t per (sequence, block), one per stratum of [β, ω], strata randomly assigned to cells."""
    t = sample_t(batch_size, n_blocks, interval=interval, antithetic=True, generator=generator, device=device)
    perm = torch.randperm(t.numel(), generator=generator, device=generator.device if generator else None)
    return t.reshape(-1)[perm.to(t.device)].reshape(t.shape)

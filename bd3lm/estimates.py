"""Pieces every Monte-Carlo objective shares (the block-diffusion NELBO of :mod:`bd3lm.objectives` and the
score-entropy family of :mod:`bd3lm.score_objectives`): the check of their token ids, the result of a loss,
stratified per-block times and the schedule a model was trained with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bd3lm.noise import sample_t
from bd3lm.schedules import NoiseSchedule, get_schedule

__all__ = ["LossOutput", "check_token_ids", "model_schedule", "stratified_t"]


def check_token_ids(x: object, name: str = "x0") -> None:
    """A one-line error unless ``x`` is a tensor of integer token ids (int64 / int32, what embeddings take)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a (batch, length) tensor of token ids; got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must hold integer token ids (int64 or int32); got dtype {x.dtype}")


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

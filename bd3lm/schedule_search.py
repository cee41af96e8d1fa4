"""Data-driven clipped noise schedules (Arriola et al. 2025, §5.3): pick [β, ω] minimising the estimator variance.

For each candidate interval the clipped objective is evaluated on a few validation batches; the variance of the
per-block loss (nats/token of each (sequence, block) cell) over all cells of a batch — gathered across ranks —
is summed over batches, and the interval with the smallest sum wins. The paper uses this variance as a proxy for
the variance of the gradient.

Cost: ``len(candidates) × len(batches)`` forward passes without gradient (the default grid has 36 candidates;
4 batches is 144 forwards, about the cost of 50 training steps). Keep ``batches`` small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bd3lm.noise import feasible_counts
from bd3lm.objectives import FULL_RANGE, diffusion_loss
from bd3lm.schedules import NoiseSchedule, get_schedule


def default_candidates(
    block_size: int, widths: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9)
) -> list[tuple[float, float]]:
    """The official grid: [1e-3, 1] plus, per width w, intervals [max(i, 1e-3), i + w] for i = 0, 0.05, …, 1 - w.

    Block size 1 has only two candidates: the full range and t ≡ 1 (every token masked, the AR loss).
    """
    if block_size == 1:
        return [FULL_RANGE, (1.0, 1.0)]
    out = [FULL_RANGE]
    for w in widths:
        if not 0.0 < w <= 1.0:
            raise ValueError(f"clip width {w} must lie in (0, 1]")
        n_lo = int(round((1.0 - w) / 0.05))
        for j in range(n_lo + 1):
            lo = round(j * 0.05, 4)
            out.append((max(lo, FULL_RANGE[0]), round(min(lo + w, 1.0), 4)))
    return out


@dataclass
class SearchResult:
    """``best``: the winning interval; ``table``: one row per candidate (interval, variance, mean)."""

    best: tuple[float, float]
    table: list[dict] = field(default_factory=list)


@torch.no_grad()
def clipped_schedule_search(
    model,
    batches: Sequence[Tensor],
    *,
    candidates: Sequence[tuple[float, float]] | None = None,
    schedule: str | NoiseSchedule = "loglinear",
    generator: torch.Generator | None = None,
    all_gather: Callable[[Tensor], Tensor] | None = None,
) -> SearchResult:
    """Evaluate every candidate interval on ``batches`` and return the one with the smallest summed variance.

    Candidates that admit no whole number of masked tokens per block are skipped (listed with variance ``inf``).
    """
    if len(batches) == 0:
        raise ValueError("the schedule search needs at least one validation batch; got none")
    sched = get_schedule(schedule) if isinstance(schedule, str) else schedule
    bs = model.config.block_size
    candidates = list(candidates) if candidates is not None else default_candidates(bs)
    was_training = model.training
    model.eval()
    table = []
    try:
        for lo, hi in candidates:
            clip = sched.mask_prob(torch.tensor([lo, hi], dtype=torch.float64)).tolist()
            if not (lo >= 1.0 or feasible_counts(bs, tuple(clip)).numel()):
                table.append({"interval": (lo, hi), "variance": float("inf"), "mean": float("nan")})
                continue
            var_sum, mean_sum = 0.0, 0.0
            for x0 in batches:
                per_block = diffusion_loss(model, x0, schedule=sched, interval=(lo, hi), generator=generator,
                                           ignore_first=bool(getattr(model.config, "ignore_bos", False))).per_block
                if all_gather is not None:
                    per_block = all_gather(per_block).reshape(-1)
                cells = per_block.reshape(-1).double()
                var_sum += float(cells.var()) if cells.numel() > 1 else 0.0
                mean_sum += float(cells.mean())
            table.append({"interval": (lo, hi), "variance": var_sum, "mean": mean_sum / len(batches)})
    finally:
        model.train(was_training)
    best = min(table, key=lambda row: row["variance"])
    return SearchResult(best=tuple(best["interval"]), table=table)

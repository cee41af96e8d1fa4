"""Confidence-threshold parallel decoding inside a block (Fast-dLLM, Wu et al. 2025, §3.3 "confidence-aware
parallel decoding"; used inside BD3 blocks as in Fast-dLLM v2 / SDAR's ``low_confidence_dynamic``).

At every step a candidate token is drawn (or taken greedily) at every masked position of the block from the
processed distribution; its *confidence* is the model probability ``p_theta(x0 = token)`` at temperature 1
with no top-k/top-p (SUBS, so the mask has probability 0). Every masked position whose confidence is ``>=
tau`` is revealed, and at least one per row — the most confident — so each step makes progress. ``tau = 1``
reveals one token per step (the first-hitting NFE); a smaller ``tau`` reveals several tokens per network call.
With temperature 0 the rule is deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bd3lm.sampling.processing import TokenSampler
from bd3lm.sampling.rules import BlockRule, scatter_tokens

__all__ = ["ConfidenceRule", "check_threshold"]


def check_threshold(threshold: float) -> float:
    """Return ``threshold`` as a float if it lies in (0, 1]; else a one-line ``ValueError`` naming it."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1]; got {threshold!r}")
    return float(threshold)


class ConfidenceRule(BlockRule):
    """Reveal every masked position with confidence ``>= threshold``, and at least the most confident one."""

    name = "confidence"
    always_reveals = True

    def __init__(self, threshold: float = 0.9) -> None:
        self.threshold = check_threshold(threshold)

    def step(self, logits: Tensor, todo: Tensor, sampler: TokenSampler) -> tuple[Tensor, Tensor]:
        cand_logits = logits[todo]  # (M, V)
        cand = sampler.sample(cand_logits)
        conf = sampler.model_probs(cand_logits).gather(-1, cand[:, None]).squeeze(-1)
        conf_full = torch.full(todo.shape, -1.0, dtype=torch.float64, device=todo.device)
        conf_full[todo] = conf
        reveal = todo & (conf_full >= self.threshold)
        best = conf_full.argmax(dim=-1)
        rows = torch.arange(todo.shape[0], device=todo.device)
        reveal[rows, best] |= todo[rows, best]
        return scatter_tokens(todo, todo, cand), reveal

    def __repr__(self) -> str:
        return f"ConfidenceRule(threshold={self.threshold})"

"""The within-block update rules by name: :data:`RULES` and :func:`make_rule`."""

from __future__ import annotations

from bd3lm.sampling.confidence import ConfidenceRule
from bd3lm.sampling.ddpm import DDPMRule
from bd3lm.sampling.first_hitting import FirstHittingRule
from bd3lm.sampling.rules import BlockRule

__all__ = ["RULES", "make_rule"]

def _registry() -> dict[str, type[BlockRule]]:
    return {r.name: r for r in (FirstHittingRule, DDPMRule, ConfidenceRule)}


RULES: tuple[str, ...] = ("first_hitting", "ddpm", "confidence")


def make_rule(
    sampler: str | BlockRule, block_size: int, steps: int | None, threshold: float | None
) -> BlockRule:
    """Build the rule named ``sampler`` (first_hitting, ddpm, confidence) or pass an instance through.

    ``steps`` (DDPM steps per block, default L') applies only to ``ddpm``; ``threshold`` (default 0.9) only to
    ``confidence``. Raises a one-line ``ValueError`` otherwise.
    """
    if isinstance(sampler, BlockRule):
        if steps is not None or threshold is not None:
            raise ValueError(
                "steps/threshold configure a sampler given by name; pass them to the rule instance"
            )
        return sampler
    rules = _registry()
    if sampler not in rules:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(RULES)} or a BlockRule")
    if steps is not None and sampler != "ddpm":
        raise ValueError(f"steps={steps!r} applies only to sampler='ddpm'; got sampler={sampler!r}")
    if threshold is not None and sampler != "confidence":
        raise ValueError(
            f"threshold={threshold!r} applies only to sampler='confidence'; got sampler={sampler!r}"
        )
    if sampler == "ddpm":
        return rules[sampler](steps=block_size if steps is None else steps)
    if sampler == "confidence":
        return rules[sampler](threshold=0.9 if threshold is None else threshold)
    return rules[sampler]()

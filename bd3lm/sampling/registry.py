"""The within-block update rules by name: :data:`RULES` and :func:`make_rule`."""

from __future__ import annotations

from bd3lm.sampling.confidence import ConfidenceRule
from bd3lm.sampling.ddpm import DDPMRule
from bd3lm.sampling.first_hitting import FirstHittingRule
from bd3lm.sampling.rules import BlockRule
from bd3lm.sampling.score_rules import AnalyticRule, EulerRule

__all__ = ["ABSORBING_RULES", "RULES", "make_rule"]

def _registry() -> dict[str, type[BlockRule]]:
    return {r.name: r for r in (FirstHittingRule, DDPMRule, ConfidenceRule, AnalyticRule, EulerRule)}


RULES: tuple[str, ...] = ("first_hitting", "ddpm", "confidence", "analytic", "euler")
#: Rules that reveal masked positions and freeze them: they need the absorbing graph.
ABSORBING_RULES: tuple[str, ...] = ("first_hitting", "ddpm", "confidence")
#: Steps per block of a stepped rule, when not given: L' (ddpm), or L' predictor steps (+ 1 denoiser call).
STEPPED: tuple[str, ...] = ("ddpm", "analytic", "euler")


def make_rule(
    sampler: str | BlockRule, block_size: int, steps: int | None, threshold: float | None
) -> BlockRule:
    """Build the rule named ``sampler`` (first_hitting, ddpm, confidence, analytic, euler) or pass an instance
    through.

    ``steps`` (steps per block, default L') applies to ``ddpm``, ``analytic`` and ``euler``; ``threshold``
    (default 0.9) only to ``confidence``. Raises a one-line ``ValueError`` otherwise.
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
    if steps is not None and sampler not in STEPPED:
        raise ValueError(f"steps={steps!r} applies only to sampler ddpm, analytic or euler; got sampler={sampler!r}")
    if threshold is not None and sampler != "confidence":
        raise ValueError(
            f"threshold={threshold!r} applies only to sampler='confidence'; got sampler={sampler!r}"
        )
    if sampler in STEPPED:
        return rules[sampler](steps=block_size if steps is None else steps)
    if sampler == "confidence":
        return rules[sampler](threshold=0.9 if threshold is None else threshold)
    return rules[sampler]()


def resolve_rule(
    model,
    sampler: str | BlockRule | None,
    block_size: int,
    steps: int | None,
    threshold: float | None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> BlockRule:
    """:func:`make_rule` for ``model``: the default rule of its graph (``None``: first_hitting for a time-agnostic
    network on the absorbing graph — MDLM / BD3-LM —, else analytic, which feeds σ to a time-conditioned network),
    a score rule bound to the model, and one-line errors for a rule the graph cannot use or token filters a score
    rule cannot apply."""
    cfg = model.config
    graph = getattr(cfg, "graph", "absorbing") or "absorbing"
    if sampler is None:
        agnostic = graph == "absorbing" and not cfg.time_conditioning
        sampler = "first_hitting" if agnostic or cfg.causal else "analytic"
    rule = make_rule(sampler, block_size, steps, threshold)
    if cfg.causal:
        return rule
    if getattr(rule, "rewrites", False):
        if top_k or top_p < 1.0 or temperature not in (0.0, 1.0):
            raise ValueError(
                f"sampler {rule.name!r} draws from the reverse process: temperature must be 1 (or 0: greedy final "
                f"step) and top_k/top_p off; got temperature={temperature}, top_k={top_k}, top_p={top_p}"
            )
        rule.bind(model)
    elif graph != "absorbing":
        raise ValueError(
            f"sampler {rule.name!r} reveals masked positions and needs the absorbing graph; this model's graph is "
            f"{graph!r} (use sampler=analytic or sampler=euler)"
        )
    return rule

"""Sampling for BD3-LM: :func:`generate` and its pluggable within-block update rules.

- :mod:`bd3lm.sampling.engine` — the block loop, exact incremental KV cache, windows, batching, stopping;
- :mod:`bd3lm.sampling.first_hitting`, :mod:`~bd3lm.sampling.ddpm`, :mod:`~bd3lm.sampling.confidence` — rules;
- :mod:`bd3lm.sampling.processing` — temperature / top-k / top-p and float64 categorical sampling;
- :mod:`bd3lm.sampling.layout` — block-aligned left padding and the sliding-window policy.
"""

from bd3lm.sampling.confidence import ConfidenceRule
from bd3lm.sampling.ddpm import DDPMRule
from bd3lm.sampling.engine import GenerationResult, generate
from bd3lm.sampling.first_hitting import FirstHittingRule
from bd3lm.sampling.processing import TokenSampler, sample_categorical, top_k_filter, top_p_filter
from bd3lm.sampling.rules import RULES, BlockRule, make_rule

__all__ = [
    "RULES",
    "BlockRule",
    "ConfidenceRule",
    "DDPMRule",
    "FirstHittingRule",
    "GenerationResult",
    "TokenSampler",
    "generate",
    "make_rule",
    "sample_categorical",
    "top_k_filter",
    "top_p_filter",
]

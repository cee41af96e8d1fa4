"""Sampling for BD3-LM: :func:`generate` and its pluggable within-block update rules.

- :mod:`bd3lm.sampling.generation` — :func:`generate`: arguments, prompts, the run and its result;
- :mod:`bd3lm.sampling.engine` — the block loop over a batch sharing one column grid;
- :mod:`bd3lm.sampling.cache_policy` — what the KV cache holds and what the next call must encode;
- :mod:`bd3lm.sampling.stopping` — which rows are done (EOS, budget, entropy) and what they generated;
- :mod:`bd3lm.sampling.first_hitting`, :mod:`~bd3lm.sampling.ddpm`, :mod:`~bd3lm.sampling.confidence` — rules
  (:mod:`~bd3lm.sampling.rules`: the interface; :mod:`~bd3lm.sampling.registry`: by name);
- :mod:`bd3lm.sampling.processing` — temperature / top-k / top-p and float64 categorical sampling;
- :mod:`bd3lm.sampling.layout` — block-aligned left padding and the sliding-window policy (and its stride).
"""

from bd3lm.sampling.confidence import ConfidenceRule
from bd3lm.sampling.ddpm import DDPMRule
from bd3lm.sampling.first_hitting import FirstHittingRule
from bd3lm.sampling.generation import GenerationResult, generate
from bd3lm.sampling.processing import TokenSampler, sample_categorical, top_k_filter, top_p_filter
from bd3lm.sampling.registry import RULES, make_rule
from bd3lm.sampling.rules import BlockRule

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

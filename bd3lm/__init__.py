"""bd3lm: block discrete diffusion language models (BD3-LM) — training, sampling and evaluation.

>>> import bd3lm
>>> model = bd3lm.BD3LM(bd3lm.BD3LMConfig(vocab_size=..., model_length=L, block_size=Lp, ...))
>>> nll = bd3lm.nelbo(model, x0, num_samples=K)            # (B,) nats per sequence
>>> res = bd3lm.generate(model, input_ids=prompts, max_new_tokens=N)

The score-entropy family (SEDD, CEDD; absorbing, uniform, roulette graphs) is the same model class with
``BD3LMConfig(graph=..., loss=..., p_m=...)``: :func:`loss` and :func:`nelbo` dispatch to
:mod:`bd3lm.score_objectives`, :func:`generate` to SEDD's samplers (``sampler="analytic" | "euler"``).
"""

import os as _os

_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bd3lm.cache import KVCache  # noqa: E402
from bd3lm.model import BD3LM, BD3LMConfig, BD3LMOutput  # noqa: E402
from bd3lm.objectives import LossOutput, ar_loss, diffusion_loss, exact_nll, loss, nelbo  # noqa: E402
from bd3lm.score_objectives import score_bound, score_loss  # noqa: E402


def generate(model, *args, **kwargs):
    """Block-by-block generation; see :func:`bd3lm.sampling.generate`."""
    from bd3lm.sampling import generate as _generate

    return _generate(model, *args, **kwargs)


__all__ = [
    "BD3LM", "BD3LMConfig", "BD3LMOutput", "KVCache", "LossOutput", "ar_loss", "diffusion_loss", "exact_nll",
    "generate", "loss", "nelbo", "score_bound", "score_loss",
]
__version__ = "0.1.0"

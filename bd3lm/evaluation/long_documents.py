"""Long documents: quality and speed of samples longer than the training context.

For each length factor ``f`` (1, 4, 10: samples of ``f x model_length`` tokens, BOS included) and each window mode
(``exact``: the window is re-encoded whenever it slides, so logits equal a from-scratch recomputation;
``streaming``: stale keys/values are kept, never re-encoded), generate samples and judge the **last**
``model_length`` generated tokens (their gen-PPL and unigram entropy), and measure generated tokens/s. A model
whose quality collapses past its context shows it here as a gen-PPL that rises, or an entropy that falls, with f.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from bd3lm.evaluation.checks import check_int
from bd3lm.evaluation.judge import Judge
from bd3lm.evaluation.sample_quality import score_ids, to_judge_ids

__all__ = ["MODES", "long_documents"]

MODES = ("exact", "streaming")


def long_documents(
    model,
    tokenizer,
    judge: Judge,
    *,
    factors: Sequence[int] = (1, 4, 10),
    modes: Sequence[str] = MODES,
    num_samples: int = 8,
    seed: int = 0,
    **generate_kwargs,
) -> list[dict]:
    """One row per (factor, mode): ``gen_ppl_last``, ``entropy_last``, ``tokens_per_s``, ``nfe`` and settings."""
    from bd3lm.sampling import generate

    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {m!r}")
    for f in factors:
        check_int(f, "every length factor")
    check_int(num_samples, "num_samples")
    length = model.config.model_length
    bos = tokenizer.bos_token_id
    prompt = None if bos is None else torch.tensor([bos])
    rows = []
    for f in factors:
        for mode in modes:
            n_new = f * length - (0 if prompt is None else len(prompt))  # prompt + new = f contexts exactly
            res = generate(model, prompt, max_new_tokens=n_new, num_samples=num_samples, seed=seed,
                           streaming=mode == "streaming", **generate_kwargs)
            ppls, ents = [], []
            for j, seq in enumerate(res.sequences):
                k = res.num_new_tokens[j]
                last = seq[len(seq) - k :][-length:].tolist()
                sc = score_ids(judge, to_judge_ids(last, tokenizer, judge))
                if sc.tokens:
                    ppls.append(sc.ppl)
                    ents.append(sc.entropy)
            tokens = sum(res.num_new_tokens)
            rows.append({
                "factor": f,
                "mode": mode,
                "new_tokens": n_new,
                "gen_ppl_last": statistics.fmean(ppls) if ppls else math.nan,
                "gen_ppl_last_se": statistics.stdev(ppls) / math.sqrt(len(ppls)) if len(ppls) > 1 else math.nan,
                "entropy_last": statistics.fmean(ents) if ents else math.nan,
                "tokens_per_s": tokens / res.seconds if res.seconds > 0 else math.nan,
                "nfe": res.nfe,
                "num_samples": num_samples,
            })
    return rows

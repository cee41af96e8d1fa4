"""Variable-length generation: the distribution of sample lengths and stop reasons (BD3-LM Table 6 protocol).

Many unconditional samples are drawn with EOS stopping on (and optionally the entropy stop, the official rule
uses 4.0 nats over the last 256 tokens), each capped at ``max_new_tokens``; the paper reports the median and the
maximum length.
"""

from __future__ import annotations

import statistics
from collections import Counter

import torch

from bd3lm.evaluation.checks import check_int

__all__ = ["length_statistics"]


def length_statistics(
    model,
    tokenizer,
    *,
    num_samples: int = 32,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    stop_entropy: float | None = None,
    seed: int = 0,
    **generate_kwargs,
) -> dict:
    """Lengths (generated tokens, EOS included) and stop reasons of ``num_samples`` EOS-stopped samples."""
    from bd3lm.sampling import generate

    check_int(num_samples, "num_samples")
    check_int(batch_size, "batch_size")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: variable-length generation stops at EOS")
    cap = 10 * model.config.model_length if max_new_tokens is None else max_new_tokens
    bos = tokenizer.bos_token_id
    prompt = None if bos is None else torch.tensor([bos])
    lengths: list[int] = []
    reasons: Counter = Counter()
    for i in range(0, num_samples, batch_size):
        res = generate(model, prompt, max_new_tokens=cap, num_samples=min(batch_size, num_samples - i),
                       seed=seed + i, stop=tokenizer.eos_token_id, stop_entropy=stop_entropy, **generate_kwargs)
        lengths += res.num_new_tokens
        reasons.update(res.stop_reasons)
    q = statistics.quantiles(lengths, n=10) if len(lengths) > 1 else [float(lengths[0])] * 9
    return {
        "num_samples": num_samples,
        "max_new_tokens": cap,
        "stop_entropy": stop_entropy,
        "median": float(statistics.median(lengths)),
        "mean": statistics.fmean(lengths),
        "min": min(lengths),
        "max": max(lengths),
        "p10": q[0],
        "p90": q[-1],
        "stop_reasons": dict(reasons),
        "lengths": lengths,
    }

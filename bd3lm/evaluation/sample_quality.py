"""Sample quality: generative perplexity under a judge LM, unigram entropy, NFE and lengths (BD3-LM §6 protocol).

1. Generate ``num_samples`` samples with :func:`bd3lm.generate` (any sampler option).
2. Convert each sample to judge tokens (:func:`to_judge_ids`): split the generated ids at the model's EOS/BOS,
   decode each piece, re-tokenise it with the judge's tokenizer, and join the pieces with the judge's separator
   (which also starts the text, as ``<|endoftext|>`` starts every official sample).
3. Score with the judge's sliding window (:func:`bd3lm.evaluation.judge.sliding_window_nll`); separator targets
   are not counted.
4. Report the **mean of per-sample perplexities** ``mean_i exp(mean NLL_i)`` (the paper's number), the
   token-pooled perplexity ``exp(Σ NLL / Σ tokens)``, the mean per-sample unigram entropy (nats) of the judge
   tokens, NFE per sample, tokens per forward and length statistics.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from bd3lm.evaluation.checks import check_int
from bd3lm.evaluation.judge import Judge, sliding_window_nll
from bd3lm.sampling.stopping import unigram_entropy

__all__ = ["SampleQuality", "TextScore", "sample_quality", "score_texts", "to_judge_ids", "unigram_entropy"]


@dataclass
class TextScore:
    """Judge score of one text: ``ppl = exp(nll / tokens)``; ``entropy`` of its counted judge tokens."""

    ppl: float
    nll: float
    tokens: int
    entropy: float


def to_judge_ids(model_ids: Sequence[int], tokenizer, judge: Judge) -> list[int]:
    """The judge-token sequence of generated model ids (documents split at the model's EOS/BOS)."""
    specials = {t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None}
    pieces: list[list[int]] = [[]]
    for t in model_ids:
        if int(t) in specials:
            pieces.append([])
        else:
            pieces[-1].append(int(t))
    out = [judge.sep_id]
    for k, piece in enumerate(pieces):
        if k:
            out.append(judge.sep_id)
        if piece:
            out.extend(judge.encode(tokenizer.decode(piece, skip_special_tokens=True)))
    return out


def score_ids(judge: Judge, ids: Sequence[int], context: int | None = None, stride: int | None = None,
              skip_first: int = 0) -> TextScore:
    """Judge score of judge-token ``ids``; the first ``skip_first`` positions are context only (not counted)."""
    nll, counted = sliding_window_nll(judge, ids, context=context, stride=stride)
    counted[:skip_first] = False
    nll[:skip_first] = 0.0
    n = int(counted.sum())
    total = float(nll.sum())
    targets = [int(t) for t, c in zip(ids, counted.tolist(), strict=True) if c]
    ppl = math.exp(total / n) if n else float("nan")
    return TextScore(ppl=ppl, nll=total, tokens=n, entropy=unigram_entropy(targets))


def score_texts(judge: Judge, texts: Sequence[str], context: int | None = None,
                stride: int | None = None) -> list[TextScore]:
    """Judge scores of plain texts (each started with the judge's separator)."""
    return [score_ids(judge, [judge.sep_id, *judge.encode(t)], context, stride) for t in texts]


@dataclass
class SampleQuality:
    """Generative perplexity and friends over ``num_samples`` samples (see the module docstring)."""

    gen_ppl: float
    gen_ppl_se: float
    pooled_ppl: float
    entropy: float
    nfe_per_sample: float
    nfe: int
    tokens_per_forward: float  # mean over samples of new tokens / the network calls that sample took part in
    tokens_per_s: float
    length_mean: float
    length_median: float
    length_max: int
    judge_tokens_mean: float
    stop_reasons: dict[str, int]
    judge: str
    settings: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self, samples: bool = False) -> dict:
        d = asdict(self)
        if not samples:
            d.pop("samples")
        return d


def sample_quality(
    model,
    tokenizer,
    judge: Judge,
    *,
    num_samples: int = 32,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    prompt: str | None = None,
    seed: int = 0,
    context: int | None = None,
    stride: int | None = None,
    stop_at_eos: bool = False,
    **generate_kwargs,
) -> SampleQuality:
    """Generate and judge ``num_samples`` samples of ``max_new_tokens`` tokens (default: the rest of one context,
    ``model_length`` minus the prompt, so that every model — MDLM included — samples exactly one window).

    ``prompt``: text after the BOS token (default: unconditional, BOS only); the judge reads the prompt as context
    but scores only the continuation (from the judge token where the prompt's own encoding ends).
    ``stop_at_eos``: stop a sample at EOS (fixed length otherwise, as in the paper's gen-PPL tables).
    Other keyword arguments go to :func:`bd3lm.generate` (sampler, steps, threshold, top_p, top_p_rule, ...).
    """
    from bd3lm.sampling import generate

    check_int(num_samples, "num_samples")
    check_int(batch_size, "batch_size")
    bos = tokenizer.bos_token_id
    prompt_ids = ([bos] if bos is not None else []) + (
        list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    )
    n_new = max(1, model.config.model_length - len(prompt_ids)) if max_new_tokens is None else max_new_tokens
    stop = tokenizer.eos_token_id if stop_at_eos else None
    body = prompt_ids[1:] if bos is not None else prompt_ids
    n_context = len(to_judge_ids(body, tokenizer, judge)) if body else 0
    samples: list[dict] = []
    nfe = 0
    seconds = 0.0
    for i in range(0, num_samples, batch_size):
        b = min(batch_size, num_samples - i)
        res = generate(model, [torch.tensor(prompt_ids, dtype=torch.long)] if prompt_ids else None,
                       max_new_tokens=n_new, num_samples=b, seed=seed + i, stop=stop, **generate_kwargs)
        nfe += res.nfe
        seconds += res.seconds
        for j, seq in enumerate(res.sequences):
            k = res.num_new_tokens[j]
            new = seq[len(seq) - k :].tolist()
            jids = to_judge_ids(body + new, tokenizer, judge)
            sc = score_ids(judge, jids, context, stride, skip_first=n_context)
            samples.append({"ppl": sc.ppl, "nll": sc.nll, "judge_tokens": sc.tokens, "entropy": sc.entropy,
                            "new_tokens": k, "nfe": res.nfe_per_sequence[j], "stop_reason": res.stop_reasons[j],
                            "text": tokenizer.decode(new, skip_special_tokens=False), "token_ids": new})
    scored = [s for s in samples if s["judge_tokens"] > 0]
    ppls = [s["ppl"] for s in scored]
    total_tokens = sum(s["new_tokens"] for s in samples)
    lengths = [s["new_tokens"] for s in samples]
    judge_tokens = sum(s["judge_tokens"] for s in scored)
    return SampleQuality(
        gen_ppl=statistics.fmean(ppls) if ppls else float("nan"),
        gen_ppl_se=statistics.stdev(ppls) / math.sqrt(len(ppls)) if len(ppls) > 1 else float("nan"),
        pooled_ppl=math.exp(sum(s["nll"] for s in scored) / judge_tokens) if judge_tokens else float("nan"),
        entropy=statistics.fmean(s["entropy"] for s in scored) if scored else float("nan"),
        nfe_per_sample=statistics.fmean(s["nfe"] for s in samples),
        nfe=nfe,
        tokens_per_forward=statistics.fmean(s["new_tokens"] / max(s["nfe"], 1) for s in samples),
        tokens_per_s=total_tokens / seconds if seconds > 0 else float("nan"),
        length_mean=statistics.fmean(lengths),
        length_median=float(statistics.median(lengths)),
        length_max=max(lengths),
        judge_tokens_mean=judge_tokens / max(len(scored), 1),
        stop_reasons=dict(Counter(s["stop_reason"] for s in samples)),
        judge=judge.name,
        settings={"num_samples": num_samples, "max_new_tokens": n_new, "prompt": prompt, "seed": seed,
                  "context": context or judge.context, "stride": stride or max(1, (context or judge.context) // 2),
                  "stop_at_eos": stop_at_eos, **{k: v for k, v in generate_kwargs.items()}},
        samples=samples,
    )

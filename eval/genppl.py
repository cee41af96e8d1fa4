"""Sample quality: generative perplexity of a checkpoint's samples under an offline judge LM.

    python -m eval.genppl checkpoint=runs/quickstart/hf num_samples=32 top_p=0.9 top_p_rule=official
    python -m eval.genppl checkpoint=DIR judge=runs/ar/hf        # one of our AR checkpoints as the judge

Wraps :func:`bd3lm.evaluation.sample_quality` (the protocol is in its docstring). Reports the mean of
per-sample perplexities (the paper's number), the token-pooled perplexity, unigram entropy, NFE, tokens per
forward and length statistics. Every key is documented in ``configs/eval/genppl.yaml``. Bad input (a judge that
cannot be loaded offline, a missing extra, bad values) is one ``error:`` line on stderr and exit code 2; values
and files are checked before the judge or the model is loaded.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from eval.common import (
    RUNTIME,
    SAMPLERS,
    TOP_P_RULES,
    boolean,
    check_sampler_options,
    checkpoint,
    choice,
    integer,
    judge,
    log,
    number,
    optional,
    output,
    set_threads,
    text,
    write_json,
)
from eval.config_checks import hydra_main, validate

GENERATE_KEYS = ("sampler", "steps", "threshold", "temperature", "top_k", "top_p", "top_p_rule", "kv_cache",
                 "window_stride", "streaming")
#: Every key of configs/eval/genppl.yaml and its check.
KEYS = {
    "checkpoint": checkpoint(tokenizer=True),
    "judge": judge,
    "judge_context": optional(integer(2)),
    "judge_stride": optional(integer()),
    "num_samples": integer(),
    "batch_size": integer(),
    "max_new_tokens": optional(integer()),
    "prompt": optional(text),
    "stop_at_eos": boolean,
    "sampler": optional(choice(*SAMPLERS)),
    "steps": optional(integer()),
    "threshold": optional(number(0, 1, low_open=True)),
    "temperature": number(0),
    "top_k": integer(0),
    "top_p": number(0, 1, low_open=True),
    "top_p_rule": choice(*TOP_P_RULES),
    "kv_cache": boolean,
    "window_stride": optional(integer()),
    "streaming": boolean,
    **RUNTIME,
    "output": optional(output()),
}


def run_genppl(cfg: DictConfig) -> dict[str, Any]:
    """Generate, judge and report; returns the summary dict (samples included)."""
    a = validate(cfg, KEYS)
    check_sampler_options(a)
    from bd3lm.evaluation import load_checkpoint, load_judge, sample_quality
    from eval.bench import resolve_device

    device = str(resolve_device(a["device"]))
    set_threads(a["threads"])
    jd = load_judge(a["judge"], context=a["judge_context"], device=device)
    model, tok = load_checkpoint(a["checkpoint"], device)
    gen = {k: a[k] for k in GENERATE_KEYS if a[k] is not None}
    res = sample_quality(model, tok, jd, num_samples=a["num_samples"], batch_size=a["batch_size"],
                         max_new_tokens=a["max_new_tokens"], prompt=a["prompt"], seed=a["seed"],
                         context=a["judge_context"], stride=a["judge_stride"], stop_at_eos=a["stop_at_eos"], **gen)
    out = {"checkpoint": a["checkpoint"], "block_size": model.config.block_size, **res.to_dict(samples=True)}
    print(
        f"gen-PPL {res.gen_ppl:.2f} ± {res.gen_ppl_se:.2f} (mean of {a['num_samples']} per-sample PPLs; pooled "
        f"{res.pooled_ppl:.2f}) under {res.judge}; entropy {res.entropy:.3f} nats; NFE {res.nfe_per_sample:.1f} "
        f"per sample; {res.tokens_per_forward:.2f} tokens/forward; {res.tokens_per_s:.1f} tokens/s; length mean "
        f"{res.length_mean:.1f} median {res.length_median:.0f} max {res.length_max}; stops {res.stop_reasons}"
    )
    if a["output"]:
        write_json(a["output"], out)
        log(f"wrote {a['output']}")
    return out


main = hydra_main("genppl", run_genppl)

if __name__ == "__main__":
    main()

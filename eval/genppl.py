"""Sample quality: generative perplexity of a checkpoint's samples under an offline judge LM.

    python -m eval.genppl checkpoint=runs/quickstart/hf num_samples=32 top_p=0.9 top_p_rule=official
    python -m eval.genppl checkpoint=DIR judge=runs/ar/hf        # one of our AR checkpoints as the judge

Wraps :func:`bd3lm.evaluation.sample_quality` (the protocol is in its docstring). Reports the mean of
per-sample perplexities (the paper's number), the token-pooled perplexity, unigram entropy, NFE, tokens per
forward and length statistics. Every key is documented in ``configs/eval/genppl.yaml``. Bad input (a judge that
cannot be loaded offline, a missing extra, bad values) is one ``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eval.common import checkpoint_of, cli_main, log, positive_int, set_threads, write_json

GENERATE_KEYS = ("sampler", "steps", "threshold", "temperature", "top_k", "top_p", "top_p_rule", "kv_cache",
                 "window_stride", "streaming")


def run_genppl(cfg: DictConfig) -> dict:
    """Generate, judge and report; returns the summary dict (samples included)."""
    ckpt = checkpoint_of(cfg)
    positive_int(cfg, "num_samples")
    positive_int(cfg, "batch_size")
    from bd3lm.evaluation import load_checkpoint, load_judge, sample_quality

    set_threads(cfg)
    judge = load_judge(str(cfg.judge), context=cfg.judge_context, device=str(cfg.device))
    model, tok = load_checkpoint(ckpt, str(cfg.device))
    gen = {k: cfg[k] for k in GENERATE_KEYS if cfg[k] is not None}
    res = sample_quality(model, tok, judge, num_samples=int(cfg.num_samples), batch_size=int(cfg.batch_size),
                         max_new_tokens=cfg.max_new_tokens, prompt=cfg.prompt, seed=int(cfg.seed),
                         context=cfg.judge_context, stride=cfg.judge_stride, stop_at_eos=bool(cfg.stop_at_eos),
                         **gen)
    out = {"checkpoint": str(ckpt), "block_size": model.config.block_size, **res.to_dict(samples=True)}
    print(
        f"gen-PPL {res.gen_ppl:.2f} ± {res.gen_ppl_se:.2f} (mean of {cfg.num_samples} per-sample PPLs; pooled "
        f"{res.pooled_ppl:.2f}) under {res.judge}; entropy {res.entropy:.3f} nats; NFE {res.nfe_per_sample:.1f} "
        f"per sample; {res.tokens_per_forward:.2f} tokens/forward; {res.tokens_per_s:.1f} tokens/s; length mean "
        f"{res.length_mean:.1f} median {res.length_median:.0f} max {res.length_max}; stops {res.stop_reasons}"
    )
    if cfg.output:
        write_json(cfg.output, out)
        log(f"wrote {cfg.output}")
    return out


@hydra.main(version_base=None, config_path="../configs/eval", config_name="genppl")
def main(cfg: DictConfig) -> None:
    cli_main(run_genppl, cfg)


if __name__ == "__main__":
    main()

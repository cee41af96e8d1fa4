"""Variable-length statistics: lengths and stop reasons of many unconstrained samples with EOS stopping on.

    python -m eval.lengths checkpoint=runs/quickstart/hf num_samples=32 max_factor=10 output=docs/results/lengths

Wraps :func:`bd3lm.evaluation.length_statistics` (the paper reports the median and the maximum length).
Keys: ``configs/eval/lengths.yaml``.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from eval.common import checkpoint_of, cli_main, positive_int, set_threads, write_report


def markdown(st: dict, title: str) -> str:
    return "\n".join([
        f"Variable-length generation ({title}): {st['num_samples']} samples, EOS stopping, cap "
        f"{st['max_new_tokens']} tokens", "",
        "| median | mean | p10 | p90 | min | max | stop reasons |", "|---|---|---|---|---|---|---|",
        f"| {st['median']:.0f} | {st['mean']:.1f} | {st['p10']:.0f} | {st['p90']:.0f} | {st['min']} | {st['max']} "
        f"| {', '.join(f'{k}: {v}' for k, v in sorted(st['stop_reasons'].items()))} |",
    ]) + "\n"


def report(st: dict, stem: str | os.PathLike | None, title: str) -> None:
    write_report(stem, {"title": title, **st}, markdown(st, title))


def run_lengths(cfg: DictConfig) -> dict:
    ckpt = checkpoint_of(cfg)
    mf = positive_int(cfg, "max_factor")
    positive_int(cfg, "num_samples")
    positive_int(cfg, "batch_size")
    from bd3lm.evaluation import length_statistics, load_checkpoint

    set_threads(cfg)
    model, tok = load_checkpoint(ckpt, str(cfg.device))
    st = length_statistics(model, tok, num_samples=cfg.num_samples, batch_size=int(cfg.batch_size),
                           max_new_tokens=mf * model.config.model_length, stop_entropy=cfg.stop_entropy,
                           seed=int(cfg.seed), sampler=str(cfg.sampler), top_p=float(cfg.top_p),
                           top_p_rule=str(cfg.top_p_rule))
    report(st, cfg.output, f"{ckpt}, L' = {model.config.block_size}")
    return st


@hydra.main(version_base=None, config_path="../configs/eval", config_name="lengths")
def main(cfg: DictConfig) -> None:
    cli_main(run_lengths, cfg)


if __name__ == "__main__":
    main()

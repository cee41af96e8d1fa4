"""Long documents: gen-PPL and entropy of the last model_length tokens of samples 1x, 4x, 10x the context.

    python -m eval.long_docs checkpoint=runs/quickstart/hf output=docs/results/long_docs

Wraps :func:`bd3lm.evaluation.long_documents`; compares the exact window (re-encoded when it slides) with
``streaming=True`` (stale keys/values kept), with tokens/s for each. Keys: ``configs/eval/long_docs.yaml``.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from eval.common import checkpoint_of, cli_main, positive_int, set_threads, write_report


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"Long documents ({title}): the last model_length tokens of each sample, judged", "",
             "| length | mode | gen-PPL (last L) | entropy (last L) | tokens/s | NFE |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['factor']}x ({r['new_tokens']}) | {r['mode']} | {r['gen_ppl_last']:.1f} ± "
                     f"{r['gen_ppl_last_se']:.1f} | {r['entropy_last']:.2f} | {r['tokens_per_s']:.0f} | {r['nfe']} |")
    return "\n".join(lines) + "\n"


def report(rows: list[dict], stem: str | os.PathLike | None, title: str) -> None:
    write_report(stem, {"title": title, "rows": rows}, markdown(rows, title))


def run_long_docs(cfg: DictConfig) -> list[dict]:
    ckpt = checkpoint_of(cfg)
    positive_int(cfg, "num_samples")
    from bd3lm.evaluation import load_checkpoint, load_judge, long_documents

    set_threads(cfg)
    judge = load_judge(str(cfg.judge), device=str(cfg.device))
    model, tok = load_checkpoint(ckpt, str(cfg.device))
    rows = long_documents(model, tok, judge, factors=list(cfg.factors), modes=list(cfg.modes),
                          num_samples=int(cfg.num_samples), seed=int(cfg.seed), sampler=str(cfg.sampler),
                          top_p=float(cfg.top_p), top_p_rule=str(cfg.top_p_rule), window_stride=cfg.window_stride)
    report(rows, cfg.output, f"{ckpt}, L = {model.config.model_length}, L' = {model.config.block_size}")
    return rows


@hydra.main(version_base=None, config_path="../configs/eval", config_name="long_docs")
def main(cfg: DictConfig) -> None:
    cli_main(run_long_docs, cfg)


if __name__ == "__main__":
    main()

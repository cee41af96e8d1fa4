"""Variable-length statistics: lengths and stop reasons of many unconstrained samples with EOS stopping on.

    python -m eval.lengths checkpoint=runs/quickstart/hf num_samples=32 max_factor=10 output=docs/results/lengths

Wraps :func:`bd3lm.evaluation.length_statistics` (the paper reports the median and the maximum length).
Keys: ``configs/eval/lengths.yaml``. Bad input is one ``error:`` line and exit code 2, before the model is loaded.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from eval.common import (
    RUNTIME,
    SAMPLERS,
    TOP_P_RULES,
    checkpoint,
    choice,
    integer,
    number,
    optional,
    output,
    set_threads,
    write_report,
)
from eval.config_checks import hydra_main, validate

#: Every key of configs/eval/lengths.yaml and its check.
KEYS = {
    "checkpoint": checkpoint(tokenizer=True),
    "num_samples": integer(),
    "batch_size": integer(),
    "max_factor": integer(),
    "stop_entropy": optional(number(0)),
    "sampler": choice(*SAMPLERS),
    "top_p": number(0, 1, low_open=True),
    "top_p_rule": choice(*TOP_P_RULES),
    **RUNTIME,
    "output": optional(output(".json", ".md")),
}


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
    a = validate(cfg, KEYS)
    from bd3lm.evaluation import length_statistics, load_checkpoint
    from eval.bench import resolve_device

    device = resolve_device(a["device"])
    set_threads(a["threads"])
    model, tok = load_checkpoint(a["checkpoint"], device)
    st = length_statistics(model, tok, num_samples=a["num_samples"], batch_size=a["batch_size"],
                           max_new_tokens=a["max_factor"] * model.config.model_length,
                           stop_entropy=a["stop_entropy"], seed=a["seed"], sampler=a["sampler"], top_p=a["top_p"],
                           top_p_rule=a["top_p_rule"])
    report(st, a["output"], f"{a['checkpoint']}, L' = {model.config.block_size}")
    return st


main = hydra_main("lengths", run_lengths)

if __name__ == "__main__":
    main()

"""Long documents: gen-PPL and entropy of the last model_length tokens of samples 1x, 4x, 10x the context.

    python -m eval.long_docs checkpoint=runs/quickstart/hf output=docs/results/long_docs

Wraps :func:`bd3lm.evaluation.long_documents`; compares the exact window (re-encoded when it slides) with
``streaming=True`` (stale keys/values kept), with tokens/s for each. Keys: ``configs/eval/long_docs.yaml``. Bad input
is one ``error:`` line and exit code 2, before the judge or the model is loaded.
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
    judge,
    list_of,
    number,
    optional,
    output,
    set_threads,
    write_report,
)
from eval.config_checks import hydra_main, validate

#: The modes of bd3lm.evaluation.long_documents.MODES.
MODES = ("exact", "streaming")
#: Every key of configs/eval/long_docs.yaml and its check.
KEYS = {
    "checkpoint": checkpoint(tokenizer=True),
    "judge": judge,
    "factors": list_of(integer(), "factors=[1,4,10]"),
    "modes": list_of(choice(*MODES), "modes=[exact,streaming]"),
    "num_samples": integer(),
    "sampler": choice(*SAMPLERS),
    "top_p": number(0, 1, low_open=True),
    "top_p_rule": choice(*TOP_P_RULES),
    "window_stride": optional(integer()),
    **RUNTIME,
    "output": optional(output(".json", ".md")),
}


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
    a = validate(cfg, KEYS)
    from bd3lm.evaluation import load_checkpoint, load_judge, long_documents
    from eval.bench import resolve_device

    device = str(resolve_device(a["device"]))
    set_threads(a["threads"])
    jd = load_judge(a["judge"], device=device)
    model, tok = load_checkpoint(a["checkpoint"], device)
    rows = long_documents(model, tok, jd, factors=a["factors"], modes=a["modes"], num_samples=a["num_samples"],
                          seed=a["seed"], sampler=a["sampler"], top_p=a["top_p"], top_p_rule=a["top_p_rule"],
                          window_stride=a["window_stride"])
    report(rows, a["output"], f"{a['checkpoint']}, L = {model.config.model_length}, L' = {model.config.block_size}")
    return rows


main = hydra_main("long_docs", run_long_docs)

if __name__ == "__main__":
    main()

"""Likelihood: the NELBO perplexity bound of a checkpoint, with its standard error and 95% interval.

    python -m eval.ppl checkpoint=runs/quickstart/hf                       # its run's validation split
    python -m eval.ppl checkpoint=DIR dataset=wiki.jsonl protocol=official  # zero-shot, the paper's protocol

Wraps :func:`bd3lm.evaluation.likelihood` (see it for the estimator and the protocols). Prints one line and a
table, writes JSON (``output=``). Every key is documented in ``configs/eval/ppl.yaml``. Bad input is one
``error:`` line on stderr and exit code 2, before the model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eval.common import (
    RUNTIME,
    CLIError,
    boolean,
    checkpoint,
    choice,
    dataset,
    integer,
    log,
    number,
    optional,
    output,
    set_threads,
    text,
    write_json,
)
from eval.config_checks import hydra_main, validate

#: The names of bd3lm.evaluation.PROTOCOLS (not imported: it pulls in torch).
PROTOCOLS = ("full", "official")
#: Every key of configs/eval/ppl.yaml and its check.
KEYS = {
    "checkpoint": checkpoint(tokenizer=True),
    "dataset": optional(text),  # the file is checked with text_field in check_ppl
    "text_field": text,
    "protocol": choice(*PROTOCOLS),
    "num_samples": optional(integer()),
    "ignore_first": optional(boolean),
    "t_min": optional(number(0, 1, high_open=True)),
    "estimator": optional(choice("j1", "j2")),
    "exact": optional(boolean),
    "insert_eos": optional(boolean),
    "chunk_special": boolean,
    "block_size": optional(integer()),
    "max_sequences": optional(integer()),
    "batch_size": integer(),
    **RUNTIME,
    "output": optional(output()),
}


def check_ppl(cfg: DictConfig) -> dict[str, Any]:
    """The checked settings (see :data:`KEYS`), the files included; raises :class:`CLIError`."""
    a = validate(cfg, KEYS)
    if a["estimator"] is not None and a["exact"]:
        raise CLIError(f"estimator={a['estimator']} is a Monte-Carlo bound; it cannot be combined with exact=true")
    if a["dataset"] is not None:
        a["dataset"] = dataset(a["dataset"], "dataset", text_field=a["text_field"])
    length = json.loads((Path(a["checkpoint"]) / "config.json").read_text(encoding="utf-8")).get("model_length")
    if a["block_size"] is not None and isinstance(length, int) and length % a["block_size"]:
        raise CLIError(f"block_size {a['block_size']} must divide the model's model_length {length}")
    if a["dataset"] is None:
        run_cfg = Path(a["checkpoint"]).parent / "config.yaml"
        if not run_cfg.is_file():
            raise CLIError(f"{a['checkpoint']} has no training run beside it ({run_cfg} is missing): give "
                           "dataset=FILE")
    return a


def run_ppl(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.checkpoint`` on ``cfg.dataset`` (or its validation split); returns the result as a dict."""
    a = check_ppl(cfg)
    from bd3lm.evaluation import PROTOCOLS as LIBRARY_PROTOCOLS
    from bd3lm.evaluation import chunks_from_file, likelihood, load_checkpoint, validation_chunks
    from eval.bench import resolve_device

    ckpt = Path(a["checkpoint"])
    device = resolve_device(a["device"])
    set_threads(a["threads"])
    model, tok = load_checkpoint(ckpt, device)
    if a["block_size"] is not None:
        bs = a["block_size"]
        if model.config.model_length % bs:
            raise CLIError(f"block_size {bs} must divide the model's model_length {model.config.model_length}")
        model.config.block_size = bs
    protocol = LIBRARY_PROTOCOLS[a["protocol"]]
    if a["dataset"] is None:
        chunks = validation_chunks(OmegaConf.load(ckpt.parent / "config.yaml"), tok)
        source = f"validation split of {ckpt.parent}"
    else:
        eos = protocol.insert_eos if a["insert_eos"] is None else a["insert_eos"]
        chunks = chunks_from_file(a["dataset"], tok, model.config.model_length, insert_eos=eos,
                                  chunk_special=a["chunk_special"], text_field=a["text_field"])
        source = a["dataset"]
    log(f"eval.ppl: {chunks.shape[0]} chunks of {chunks.shape[1]} tokens from {source}")
    res = likelihood(model, chunks, protocol=protocol, num_samples=a["num_samples"], ignore_first=a["ignore_first"],
                     t_min=a["t_min"], exact=a["exact"], max_sequences=a["max_sequences"],
                     batch_size=a["batch_size"], seed=a["seed"], estimator=a["estimator"])
    out = {"checkpoint": str(ckpt), "dataset": source, "block_size": model.config.block_size, **res.to_dict()}
    print(res.describe())
    if a["output"]:
        write_json(a["output"], out)
        log(f"wrote {a['output']}")
    return out


main = hydra_main("ppl", run_ppl)

if __name__ == "__main__":
    main()

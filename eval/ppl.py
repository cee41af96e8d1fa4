"""Likelihood: the NELBO perplexity bound of a checkpoint, with its standard error and 95% interval.

    python -m eval.ppl checkpoint=runs/quickstart/hf                       # its run's validation split
    python -m eval.ppl checkpoint=DIR dataset=wiki.jsonl protocol=official  # zero-shot, the paper's protocol

Wraps :func:`bd3lm.evaluation.likelihood` (see it for the estimator and the protocols). Prints one line and a
table, writes JSON (``output=``). Every key is documented in ``configs/eval/ppl.yaml``. Bad input is one
``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from eval.common import CLIError, check_int, checkpoint_of, cli_main, log, set_threads, write_json


def run_ppl(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.checkpoint`` on ``cfg.dataset`` (or its validation split); returns the result as a dict."""
    from bd3lm.evaluation import PROTOCOLS

    ckpt = checkpoint_of(cfg)
    if str(cfg.protocol) not in PROTOCOLS:
        raise CLIError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {cfg.protocol!r}")
    k = cfg.num_samples if cfg.num_samples is None else check_int(cfg.num_samples, "num_samples (K)")
    from bd3lm.evaluation import chunks_from_file, likelihood, load_checkpoint, validation_chunks

    set_threads(cfg)
    model, tok = load_checkpoint(ckpt, str(cfg.device))
    if cfg.block_size is not None:
        bs = int(cfg.block_size)
        if bs < 1 or model.config.model_length % bs:
            raise CLIError(f"block_size {bs} must divide the model's model_length {model.config.model_length}")
        model.config.block_size = bs
    protocol = PROTOCOLS[str(cfg.protocol)]
    if cfg.dataset is None:
        run_cfg = ckpt.parent / "config.yaml"
        if not run_cfg.is_file():
            raise CLIError(f"{ckpt} has no training run beside it ({run_cfg} is missing): give dataset=FILE")
        chunks = validation_chunks(OmegaConf.load(run_cfg), tok)
        source = f"validation split of {ckpt.parent}"
    else:
        eos = protocol.insert_eos if cfg.insert_eos is None else bool(cfg.insert_eos)
        chunks = chunks_from_file(str(cfg.dataset), tok, model.config.model_length, insert_eos=eos,
                                  chunk_special=bool(cfg.chunk_special), text_field=str(cfg.text_field))
        source = str(cfg.dataset)
    log(f"eval.ppl: {chunks.shape[0]} chunks of {chunks.shape[1]} tokens from {source}")
    res = likelihood(model, chunks, protocol=protocol, num_samples=k, ignore_first=cfg.ignore_first,
                     t_min=cfg.t_min, exact=cfg.exact, max_sequences=cfg.max_sequences,
                     batch_size=int(cfg.batch_size), seed=int(cfg.seed),
                     estimator=None if cfg.get("estimator") is None else str(cfg.estimator))
    out = {"checkpoint": str(ckpt), "dataset": source, "block_size": model.config.block_size, **res.to_dict()}
    print(res.describe())
    if cfg.output:
        write_json(cfg.output, out)
        log(f"wrote {cfg.output}")
    return out


@hydra.main(version_base=None, config_path="../configs/eval", config_name="ppl")
def main(cfg: DictConfig) -> None:
    cli_main(run_ppl, cfg)


if __name__ == "__main__":
    main()

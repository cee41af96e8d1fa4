"""Train a BD3-LM (or its MDLM / AR baselines) with Lightning, configured by Hydra.

    python train.py experiment=smoke run_dir=DIR [key=value ...]
    python train.py experiment=quickstart                 # the demo model, into runs/quickstart
    python train.py experiment=smoke algo=mdlm run_dir=PRE   # pretrain at block size L (MDLM)
    python train.py experiment=smoke init_from=PRE/hf algo.block_size=4   # fine-tune it at L' = 4
    python train.py experiment=smoke run_dir=DIR mode=export  # re-export DIR/hf from its last.ckpt
    python train.py experiment=smoke --cfg                 # print the composed configuration

Everything a run writes is under ``run_dir``: ``checkpoints/{last,best-*}.ckpt``, ``hf/`` (the EMA weights in
the Hugging Face layout + tokenizer), ``tokenizer/``, ``csv/metrics.csv``, ``tb/`` (TensorBoard),
``config.yaml``, ``training_curves.png``, ``clip_search.jsonl``, ``ranks/``. Running the same command again
resumes from ``last.ckpt`` (a resume may change only the settings listed in ``bd3lm/run_dir.py``). One
process at a time owns a run_dir (``run_dir/.lock``). SIGTERM/SIGINT stop at the end of the current step
with a checkpoint (exit status 143/130; no export); a NaN/inf loss or weight stops the run without saving.
Errors are one ``error: ...`` line on stderr with exit status 1, or 2 when the run is refused (run_dir in
use, configuration changed on resume); set ``BD3LM_DEBUG=1`` for the traceback. Configuration groups live
in ``configs/`` (``train.yaml`` is the root).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent
CONFIG_DIR = REPO / "configs"


class ConfigError(ValueError):
    """Invalid configuration or command line."""


def one_line(exc: BaseException) -> str:
    """An exception as one line (multi-line Hydra/torch messages are joined)."""
    msg = " ".join(str(exc).split())
    for tail in (" Set the environment variable HYDRA_FULL_ERROR=1", " Config search path:"):
        msg = msg.split(tail)[0]
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).split()[0] not in msg:
        msg += f" ({str(cause).strip().splitlines()[0].strip()})"
    return msg or type(exc).__name__


def compose_config(argv: list[str]):
    """Compose ``configs/train.yaml`` with the command-line overrides.

    Hydra's compose API: nothing is written to the working directory and errors stay exceptions.
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
        return compose(config_name="train", overrides=list(argv))


def _positive(cfg, key: str) -> int:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer; got {value!r}")
    return value


def validate_config(cfg) -> None:
    """Cheap checks before anything is written (so bad input leaves no partial run behind)."""
    for key in (
        "model.length",
        "algo.block_size",
        "model.hidden_dim",
        "model.n_blocks",
        "model.n_heads",
        "model.cond_dim",
        "data.batch_size",
        "data.eval_batch_size",
        "trainer.max_steps",
        "trainer.val_every",
        "trainer.log_every",
        "trainer.accumulate_grad_batches",
    ):
        _positive(cfg, key)
    if cfg.model.length % cfg.algo.block_size:
        raise ConfigError(
            f"model.length {cfg.model.length} is not a multiple of algo.block_size {cfg.algo.block_size}"
        )
    if cfg.mode not in ("train", "export"):
        raise ConfigError(f"mode must be 'train' or 'export'; got {cfg.mode!r}")
    if cfg.strategy.name not in ("auto", "ddp", "fsdp"):
        raise ConfigError(f"strategy must be auto, ddp or fsdp; got {cfg.strategy.name!r}")
    if cfg.trainer.progress_bar not in ("auto", "rich", "lines", "none"):
        raise ConfigError(
            f"trainer.progress_bar must be auto, rich, lines or none; got {cfg.trainer.progress_bar!r}"
        )
    if cfg.strategy.name == "fsdp" and cfg.ema.decay:
        raise ConfigError(
            "the EMA (ema.decay) is not implemented for sharded weights: with strategy=fsdp set "
            "ema.decay=null, or use strategy=ddp"
        )
    if cfg.trainer.ckpt_every is not None:
        _positive(cfg, "trainer.ckpt_every")
    from bd3lm.graphs import check_family
    from bd3lm.schedules import get_schedule

    get_schedule(cfg.noise.name)
    a = cfg.algo
    graph, loss = str(a.get("graph", "absorbing")), str(a.get("loss", "subs"))
    try:
        check_family(graph, loss, a.get("p_m"))
    except ValueError as e:
        raise ConfigError(f"algo: {e}") from None
    if loss != "subs" and bool(a.causal):
        raise ConfigError(f"algo.loss={loss} needs a diffusion model; the autoregressive algo (causal) has none")
    if loss != "subs" and bool(a.var_min):
        raise ConfigError(f"algo.var_min (the clipped-schedule search) applies to loss=subs; got algo.loss={loss}")
    if str(a.get("cedd_weight", "one")) not in ("one", "log"):
        raise ConfigError(f"algo.cedd_weight must be one or log; got {a.get('cedd_weight')!r}")


def prepare_run_dir(cfg) -> tuple[Path, bool]:
    """Create ``run_dir`` and check that it is writable; returns it and whether it was created now."""
    run_dir = Path(os.path.expanduser(str(cfg.run_dir))).resolve()
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} is not writable ({e.strerror or e})") from None
    return run_dir, created


def cache_dir_of(cfg) -> Path:
    from bd3lm.data import resolve_cache_dir

    return resolve_cache_dir(cfg.data.cache_dir)


def init_source(cfg, resume: bool) -> str | None:
    """Where a fresh start takes its weights and tokenizer from; None for a start from scratch or a resume.

    The one place that interprets ``init_from``: a local directory or Lightning ``.ckpt`` file as given, else a
    Hugging Face Hub id resolved through the local Hub cache (:func:`bd3lm.hub.resolve_model_dir`; downloaded only
    when not offline), e.g. ``init_from=kuleshov-group/bd3lm-owt-block_size1024-pretrain``.
    """
    if resume or not cfg.init_from:
        return None
    name = str(cfg.init_from)
    if os.path.exists(os.path.expanduser(name)):
        return os.path.expanduser(name)
    from bd3lm.hub import resolve_model_dir

    try:
        return str(resolve_model_dir(name))
    except OSError as exc:
        raise ConfigError(f"init_from: {one_line(exc)}") from None


def group_defaults(stored: Mapping) -> dict:
    """The default configuration of the config groups ``stored`` was composed from (for the keys an old
    ``config.yaml`` lacks, see :func:`bd3lm.run_dir.check_resume_config`)."""
    from omegaconf import OmegaConf

    overrides = [
        f"{group}={stored[group]['name']}"
        for group in ("model", "algo", "noise", "data", "strategy")
        if isinstance(stored.get(group), Mapping)
        and (CONFIG_DIR / group / f"{stored[group].get('name')}.yaml").is_file()
    ]
    return OmegaConf.to_container(compose_config(overrides), resolve=True)


def export_from_checkpoint(cfg, run_dir: Path, tokenizer) -> Path:
    """``mode=export``: write ``run_dir/hf`` from ``last.ckpt`` (EMA weights) without training."""
    from bd3lm.lit_build import build_model
    from bd3lm.lit_checkpoint import export_hf, inspect_checkpoint, read_state_dict

    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"nothing to export: {last} does not exist")
    ckpt = inspect_checkpoint(last)
    model = build_model(cfg, tokenizer)
    model.load_state_dict(read_state_dict(last), strict=True)
    state = ckpt["bd3lm"]
    info = {"step": int(ckpt.get("global_step", 0)), **{k: v for k, v in state.get("last_val", {}).items()}}
    return export_hf(model, run_dir / "hf", tokenizer=tokenizer, info=info)


def run(cfg) -> dict:
    """Train (or export) according to ``cfg``; returns the summary dict (also printed on rank 0).

    Holds the run_dir lock throughout (global rank 0) and refuses a configuration the run_dir was not started
    with, before writing anything; a start that fails leaves the run_dir as it was.
    """
    validate_config(cfg)
    from omegaconf import OmegaConf

    from bd3lm.faults import Interrupted
    from bd3lm.run_dir import check_resume_config, owns_run_dir, run_dir_lock

    run_dir, created = prepare_run_dir(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    owner = owns_run_dir()
    try:
        with run_dir_lock(run_dir, created=created, owner=owner):
            resume = last.is_file()
            new = OmegaConf.to_container(cfg, resolve=True)
            check_resume_config(run_dir, new, resuming=resume, defaults=group_defaults)
            return _run(cfg, run_dir, resume=resume, owner=owner)
    except Interrupted as e:  # raised by the signal handlers of main() outside the training loop
        raise e.located(step=None, checkpoint=last) from None


def commit_start(cfg, run_dir: Path, tokenizer, *, global_zero: bool) -> None:
    """Write what a start leaves in ``run_dir`` -- the tokenizer (first start) and ``config.yaml`` -- once
    everything it needs has loaded: a start that fails earlier writes nothing that a rerun would reuse."""
    from omegaconf import OmegaConf

    from bd3lm.atomic import write_text_atomic
    from bd3lm.lit_data import local_rank_from_env, save_run_tokenizer

    if local_rank_from_env() == 0:
        save_run_tokenizer(tokenizer, run_dir)
    if global_zero:
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _run(cfg, run_dir: Path, *, resume: bool, owner: bool) -> dict:
    import lightning as L
    from transformers.utils import logging as hf_logging

    from bd3lm.lit_build import build_model, build_trainer, quiet_lightning, resolve_precision, train_settings

    quiet_lightning()
    hf_logging.disable_progress_bar()

    from bd3lm.lit import BD3LMLit
    from bd3lm.lit_callbacks import Throughput, plot_metrics
    from bd3lm.lit_checkpoint import clean_stale_temporaries, export_hf, inspect_checkpoint, load_init_weights
    from bd3lm.lit_data import ChunkDataModule, local_rank_from_env, prepare_datasets, prepare_tokenizer

    t0 = time.perf_counter()
    seed = int(cfg.seed)
    cache_dir = cache_dir_of(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    if owner:
        clean_stale_temporaries(run_dir)
    if resume:  # fail early, before anything else is written, on a corrupt checkpoint
        resumed_step = int(inspect_checkpoint(last).get("global_step", 0))
    init_from = init_source(cfg, resume)
    tokenizer = prepare_tokenizer(cfg.data, run_dir=run_dir, cache_dir=cache_dir, seed=seed, init_from=init_from)
    if cfg.mode == "export":
        out = export_from_checkpoint(cfg, run_dir, tokenizer)
        print(f"exported {out}")
        return {"export": str(out)}
    train, valid = prepare_datasets(cfg.data, tokenizer, cfg.model.length, cache_dir=cache_dir, seed=seed)

    L.seed_everything(seed, workers=True, verbose=False)
    model = build_model(cfg, tokenizer)
    init_info = load_init_weights(model, init_from) if init_from else None
    lit = BD3LMLit(model, train_settings(cfg, run_dir, init_info))
    dm = ChunkDataModule(
        train,
        valid,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        seed=seed,
        num_workers=cfg.data.num_workers,
    )
    precision = resolve_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    trainer = build_trainer(cfg, run_dir, precision)
    rank0 = local_rank_from_env() == 0 and trainer.is_global_zero
    commit_start(cfg, run_dir, tokenizer, global_zero=rank0)
    n_params = sum(p.numel() for p in model.parameters())
    if rank0:
        what = (
            f"resuming from {last} (step {resumed_step})"
            if resume
            else (f"warm start from {init_from}" if init_info else "fresh start")
        )
        print(
            f"bd3lm: {cfg.algo.name} L={cfg.model.length} L'={cfg.algo.block_size}, {n_params / 1e6:.2f}M "
            f"parameters, vocabulary {len(tokenizer)}, "
            f"{len(train)} training / {len(valid)} validation chunks, "
            f"precision {precision}; {what}; run_dir {run_dir}",
            flush=True,
        )
    trainer.fit(lit, datamodule=dm, ckpt_path=str(last) if resume else None, weights_only=True)
    if lit.last_val_step != trainer.global_step:
        trainer.validate(lit, datamodule=dm, verbose=False)
    export_model = model
    if cfg.strategy.name == "fsdp":  # gather the sharded weights (a collective: every rank takes part)
        full = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            export_model = build_model(cfg, tokenizer)
            export_model.load_state_dict(
                {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}
            )
    if not trainer.is_global_zero:
        return {}

    tput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    tokens = lit.batches_seen * cfg.data.batch_size * cfg.model.length * trainer.world_size
    nll = lit.last_val.get("val/nll", float("nan"))
    lo, hi = lit.interval()
    summary = {
        "step": int(trainer.global_step),
        "tokens": int(tokens),
        "val_nll": nll,
        "val_ppl": math.exp(nll) if math.isfinite(nll) else float("nan"),
        "interval": [lo, hi] if lit.searches else None,
        "parameters": int(n_params),
        "seconds": time.perf_counter() - t0,
        "tokens_per_second": tput.tokens_per_second() if tput else None,
        "precision": precision,
        "run_dir": str(run_dir),
        "metrics": str(run_dir / "csv" / "metrics.csv"),
    }
    if cfg.export:
        info = {k: summary[k] for k in ("step", "tokens", "val_nll", "val_ppl", "interval")}
        summary["export"] = str(
            export_hf(export_model, run_dir / "hf", ema=lit.ema, tokenizer=tokenizer, info=info)
        )
    png = plot_metrics(
        run_dir / "csv" / "metrics.csv",
        run_dir / "training_curves.png",
        title=f"{cfg.name}: {cfg.algo.name} L={cfg.model.length} L'={cfg.algo.block_size}",
    )
    summary["plot"] = str(png) if png else None
    print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    tps = f", {s['tokens_per_second']:.0f} tokens/s" if s.get("tokens_per_second") else ""
    parts = [
        f"Trained {s['step']} steps on {s['tokens']:,} tokens (this session: {s['seconds']:.0f}s{tps}; "
        f"{s['parameters'] / 1e6:.2f}M parameters, {s['precision']})."
    ]
    if math.isfinite(s["val_nll"]):
        parts.append(
            f"Final validation NELBO {s['val_nll']:.4f} nats/token, perplexity <= {s['val_ppl']:.2f}."
        )
    if s.get("interval"):
        parts.append(f"Training clip interval [{s['interval'][0]:.3g}, {s['interval'][1]:.3g}].")
    if s.get("export"):
        parts.append(f"Model exported to {s['export']} (load with BD3LM.from_pretrained or generate.py).")
    parts.append(
        f"Metrics: {s['metrics']} (TensorBoard: {s['run_dir']}/tb)"
        + (f"; curves: {s['plot']}." if s.get("plot") else ".")
    )
    print("\n" + " ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    show_cfg = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    try:
        cfg = compose_config(argv)
        if show_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg, resolve=True))
            return 0
        from bd3lm.faults import interrupt_handlers

        with interrupt_handlers():  # SIGTERM/SIGINT -> Interrupted (the training loop stops at a step boundary)
            run(cfg)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the top level turns every failure into one line
        if os.environ.get("BD3LM_DEBUG"):
            traceback.print_exc()
        if getattr(e, "signum", None):  # bd3lm.faults.Interrupted: not an error; every rank stopped, one says so
            from bd3lm.run_dir import owns_run_dir

            if owns_run_dir():
                print(str(e), file=sys.stderr, flush=True)
        else:
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return int(getattr(e, "exit_code", 1))


if __name__ == "__main__":
    sys.exit(main())

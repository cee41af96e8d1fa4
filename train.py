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
resumes from ``last.ckpt``. Errors are one ``error: ...`` line on stderr with exit status 1 (set
``BD3LM_DEBUG=1`` for the traceback). Configuration groups live in ``configs/`` (``train.yaml`` is the root).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
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


def prepare_run_dir(cfg) -> Path:
    """Create ``run_dir`` and check that it is writable."""
    run_dir = Path(os.path.expanduser(str(cfg.run_dir))).resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} is not writable ({e.strerror or e})") from None
    return run_dir


def cache_dir_of(cfg) -> Path:
    from bd3lm.data import resolve_cache_dir

    return resolve_cache_dir(cfg.data.cache_dir)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AVX512-BF16 or AMX); elsewhere bf16 is slow emulation."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto`` -> bf16-mixed where bf16 is fast (CUDA with bf16, CPUs with AVX512-BF16/AMX), else 32-true."""
    if precision != "auto":
        return str(precision)
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def build_model(cfg, tokenizer):
    import bd3lm

    a, m = cfg.algo, cfg.model
    mask_id = tokenizer.mask_token_id
    return bd3lm.BD3LM(
        bd3lm.BD3LMConfig(
            vocab_size=len(tokenizer),
            model_length=m.length,
            block_size=a.block_size,
            hidden_dim=m.hidden_dim,
            cond_dim=m.cond_dim,
            n_blocks=m.n_blocks,
            n_heads=m.n_heads,
            dropout=float(m.dropout),
            attn_backend=m.attn_backend,
            causal=bool(a.causal),
            cross_attn=bool(a.cross_attn),
            adaln=bool(a.adaln),
            time_conditioning=bool(a.time_conditioning),
            ignore_bos=bool(a.get("ignore_bos", False)),
            var_min=bool(a.var_min),
            sampling_eps_min=1e-3,
            sampling_eps_max=1.0,
            mask_token_id=None if mask_id == len(tokenizer) - 1 else mask_id,
            graph=str(a.get("graph", "absorbing")),
            loss=str(a.get("loss", "subs")),
            p_m=None if a.get("p_m") is None else float(a.p_m),
            noise_schedule=str(cfg.noise.name),
        )
    )


def build_strategy(cfg):
    s = cfg.strategy
    if s.name == "auto":
        return "auto"
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            process_group_backend=s.process_group_backend,
            find_unused_parameters=bool(s.find_unused_parameters),
        )
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(sharding_strategy=s.sharding_strategy, state_dict_type=s.state_dict_type)


def quiet_lightning() -> None:
    """Keep the console to our own messages: Lightning's info banners and known-benign warnings off."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*exists and is not empty.*",
        ".*sync_dist=True.*",
        ".*The number of training batches.*",
        ".*litlogger.*",
        ".*litmodels.*",
        ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ".*LeafSpec.*",
        ".*Found .* module\\(s\\) in eval mode.*",
        ".*total_train_batches.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _is_tty() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"


def build_trainer(cfg, run_dir: Path, precision: str):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from bd3lm.lit_callbacks import (
        AppendingCSVLogger,
        LineProgress,
        PeriodicCheckpoint,
        StepProgressBar,
        Throughput,
    )
    from bd3lm.lit_checkpoint import AtomicCheckpointIO

    t = cfg.trainer
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best-{step:07d}",
            monitor="val/nll",
            mode="min",
            save_top_k=1,
            save_last=True,
            enable_version_counter=False,
            auto_insert_metric_name=False,
            save_on_train_epoch_end=False,
        ),
        Throughput(),
    ]
    if t.ckpt_every:
        callbacks.append(PeriodicCheckpoint(ckpt_dir / "last.ckpt", t.ckpt_every, t.val_every))
    bar = t.progress_bar if t.progress_bar != "auto" else ("rich" if _is_tty() else "lines")
    if bar == "rich":
        callbacks.append(StepProgressBar(leave=True))
    elif bar == "lines":
        callbacks.append(LineProgress(every=max(t.log_every, t.val_every // 10 if t.val_every >= 10 else 1)))
    loggers = [
        AppendingCSVLogger(
            str(run_dir), name="", version="csv", flush_logs_every_n_steps=max(1, t.log_every * 10)
        ),
        TensorBoardLogger(str(run_dir), name="", version="tb", default_hp_metric=False),
    ]
    accum = int(t.accumulate_grad_batches)
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        precision=precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=t.val_every * accum,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if t.limit_val_batches else 1.0,
        num_sanity_val_steps=t.num_sanity_val_steps,
        accumulate_grad_batches=accum,
        gradient_clip_val=cfg.optim.grad_clip or None,
        gradient_clip_algorithm="norm",
        log_every_n_steps=t.log_every,
        callbacks=callbacks,
        logger=loggers,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=bar == "rich",
        enable_model_summary=False,
        use_distributed_sampler=False,
        deterministic=bool(t.deterministic),
        default_root_dir=str(run_dir),
    )


def export_from_checkpoint(cfg, run_dir: Path, tokenizer) -> Path:
    """``mode=export``: write ``run_dir/hf`` from ``last.ckpt`` (EMA weights) without training."""
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
    """Train (or export) according to ``cfg``; returns the summary dict (also printed on rank 0)."""
    validate_config(cfg)
    run_dir = prepare_run_dir(cfg)
    import lightning as L
    from omegaconf import OmegaConf
    from transformers.utils import logging as hf_logging

    quiet_lightning()
    hf_logging.disable_progress_bar()

    from bd3lm.lit import BD3LMLit, TrainSettings
    from bd3lm.lit_callbacks import Throughput, plot_metrics
    from bd3lm.lit_checkpoint import clean_stale_temporaries, export_hf, inspect_checkpoint, load_init_weights
    from bd3lm.lit_data import (
        ChunkDataModule,
        local_rank_from_env,
        prepare_datasets,
        prepare_tokenizer,
        save_run_tokenizer,
    )

    t0 = time.perf_counter()
    seed = int(cfg.seed)
    cache_dir = cache_dir_of(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    if local_rank_from_env() == 0 and os.environ.get("NODE_RANK", "0") in ("", "0"):
        clean_stale_temporaries(run_dir)
    resume = last.is_file()
    if resume:  # fail early, before anything else is written, on a corrupt checkpoint
        ckpt = inspect_checkpoint(last)
        resumed_step = int(ckpt.get("global_step", 0))
        del ckpt
    tokenizer = prepare_tokenizer(
        cfg.data, run_dir=run_dir, cache_dir=cache_dir, seed=seed, init_from=None if resume else cfg.init_from
    )
    if cfg.mode == "export":
        out = export_from_checkpoint(cfg, run_dir, tokenizer)
        print(f"exported {out}")
        return {"export": str(out)}
    train, valid = prepare_datasets(cfg.data, tokenizer, cfg.model.length, cache_dir=cache_dir, seed=seed)
    if local_rank_from_env() == 0:
        save_run_tokenizer(tokenizer, run_dir)

    L.seed_everything(seed, workers=True, verbose=False)
    model = build_model(cfg, tokenizer)
    init_info = None
    if cfg.init_from and not resume:
        init_info = load_init_weights(model, cfg.init_from)
    settings = TrainSettings(
        lr=float(cfg.optim.lr),
        betas=tuple(cfg.optim.betas),
        eps=float(cfg.optim.eps),
        weight_decay=float(cfg.optim.weight_decay),
        warmup_steps=int(cfg.optim.warmup_steps),
        ema_decay=float(cfg.ema.decay) if cfg.ema.decay else None,
        schedule=str(cfg.noise.name),
        seed=seed,
        search_every=int(cfg.algo.search_every or 0),
        search_batches=int(cfg.algo.search_batches),
        clip_widths=tuple(cfg.algo.clip_widths),
        var_min=bool(cfg.algo.var_min),
        cedd_weight=str(cfg.algo.get("cedd_weight", "one")),
        log_dir=str(run_dir),
        init_eval=init_info or {},
    )
    lit = BD3LMLit(model, settings)
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
    n_params = sum(p.numel() for p in model.parameters())
    if rank0:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        what = (
            f"resuming from {last} (step {resumed_step})"
            if resume
            else (f"warm start from {cfg.init_from}" if init_info else "fresh start")
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
        run(cfg)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the top level turns every failure into one line
        if os.environ.get("BD3LM_DEBUG"):
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())

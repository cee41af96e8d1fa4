"""Build what ``train.py`` runs from its Hydra configuration: the model, the training settings, the Trainer.

* :func:`build_model`: a :class:`~bd3lm.BD3LM` from the ``model``/``algo``/``noise`` groups and the tokenizer;
* :func:`train_settings`: the :class:`~bd3lm.lit.TrainSettings` of the ``optim``/``ema``/``algo`` groups;
* :func:`build_trainer`: the Lightning ``Trainer`` with the checkpoint/progress/guard callbacks, the CSV and
  TensorBoard loggers and the atomic checkpoint IO;
* :func:`resolve_precision`, :func:`quiet_lightning`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

__all__ = [
    "build_model",
    "build_strategy",
    "build_trainer",
    "cpu_has_fast_bf16",
    "quiet_lightning",
    "resolve_precision",
    "train_settings",
]


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
    """The network of ``cfg`` (freshly initialised) for ``tokenizer``'s vocabulary."""
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


def train_settings(cfg, run_dir: Path, init_info: dict | None):
    """:class:`~bd3lm.lit.TrainSettings` of ``cfg`` (``init_info``: what a warm start loaded, for its report)."""
    from bd3lm.lit import TrainSettings

    return TrainSettings(
        lr=float(cfg.optim.lr),
        betas=tuple(cfg.optim.betas),
        eps=float(cfg.optim.eps),
        weight_decay=float(cfg.optim.weight_decay),
        warmup_steps=int(cfg.optim.warmup_steps),
        lr_schedule=str(cfg.optim.get("schedule", "constant")),
        total_steps=int(cfg.trainer.max_steps),
        ema_decay=float(cfg.ema.decay) if cfg.ema.decay else None,
        schedule=str(cfg.noise.name),
        seed=int(cfg.seed),
        search_every=int(cfg.algo.search_every or 0),
        search_batches=int(cfg.algo.search_batches),
        clip_widths=tuple(cfg.algo.clip_widths),
        var_min=bool(cfg.algo.var_min),
        cedd_weight=str(cfg.algo.get("cedd_weight", "one")),
        log_dir=str(run_dir),
        init_eval=init_info or {},
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
    """The Lightning ``Trainer`` of ``cfg``; its :class:`~bd3lm.lit_guard.RunGuard` is the first callback (it
    must see a non-finite step before anything saves it)."""
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
    from bd3lm.lit_guard import RunGuard

    t = cfg.trainer
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        RunGuard(ckpt_dir / "last.ckpt"),
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

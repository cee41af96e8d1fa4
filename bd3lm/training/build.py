"""Build what ``train.py`` runs from its Hydra configuration: the model, the training settings, the Trainer.

* :func:`build_model`: a :class:`~bd3lm.BD3LM` from the ``network`` node (hydra ``instantiate``) and the tokenizer;
* :func:`build_strategy`: the ``strategy.spec`` node instantiated;
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
    """The network of ``cfg.network`` (a :class:`~bd3lm.BD3LMConfig` node), freshly initialised, for ``tokenizer``'s
    vocabulary (the mask id is stored only when it is not the last id, as in the official checkpoints)."""
    from hydra.utils import instantiate

    import bd3lm

    mask_id = tokenizer.mask_token_id
    config = instantiate(
        cfg.network, vocab_size=len(tokenizer), mask_token_id=None if mask_id == len(tokenizer) - 1 else mask_id
    )
    return bd3lm.BD3LM(config)


def build_strategy(cfg):
    """``cfg.strategy.spec`` instantiated (``DDPStrategy``/``FSDPStrategy``), or ``"auto"`` when it is null."""
    from hydra.utils import instantiate

    spec = cfg.strategy.get("spec")
    return instantiate(spec) if spec else "auto"


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
        ".*set_vital.*",
        ".*total_train_batches.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _is_tty() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"


def build_trainer(cfg, run_dir: Path, precision: str):
    """The Lightning ``Trainer`` of ``cfg``; its :class:`~bd3lm.training.guard.RunGuard` is the first callback (it
    must see a non-finite step before anything saves it)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from bd3lm.training.callbacks import LineProgress, PeriodicCheckpoint, StepProgressBar, TokenThroughput
    from bd3lm.training.checkpoint import AtomicCheckpointIO
    from bd3lm.training.guard import RunGuard

    t = cfg.trainer
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        RunGuard(ckpt_dir / "last.ckpt"),
        ModelCheckpoint(dirpath=ckpt_dir, filename="best-{step:07d}", monitor="val/nll", mode="min", save_top_k=1,
                        save_last=True, enable_version_counter=False, auto_insert_metric_name=False,
                        save_on_train_epoch_end=False),
        TokenThroughput(),
    ]
    if t.ckpt_every:
        callbacks.append(PeriodicCheckpoint(ckpt_dir / "last.ckpt", t.ckpt_every, t.val_every))
    bar = t.progress_bar if t.progress_bar != "auto" else ("rich" if _is_tty() else "lines")
    if bar == "rich":
        callbacks.append(StepProgressBar(leave=True))
    elif bar == "lines":
        callbacks.append(LineProgress(every=max(t.log_every, t.val_every // 10 if t.val_every >= 10 else 1)))
    loggers = [
        # one run_dir/csv/version_N per session (start or resume), picked and written by global rank 0 only
        CSVLogger(str(run_dir), name="csv", flush_logs_every_n_steps=max(1, t.log_every * 10)),
        TensorBoardLogger(str(run_dir), name="", version="tb", default_hp_metric=False),
    ]
    accum = int(t.accumulate_grad_batches)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(cfg),
        precision=precision, max_steps=t.max_steps, max_epochs=-1, accumulate_grad_batches=accum,
        val_check_interval=t.val_every * accum, check_val_every_n_epoch=None,
        num_sanity_val_steps=t.num_sanity_val_steps, limit_val_batches=t.limit_val_batches or 1.0,
        gradient_clip_val=cfg.optim.grad_clip or None, gradient_clip_algorithm="norm", log_every_n_steps=t.log_every,
        callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()], enable_progress_bar=bar == "rich",
        enable_model_summary=False, use_distributed_sampler=False, deterministic=bool(t.deterministic),
        default_root_dir=str(run_dir),
    )

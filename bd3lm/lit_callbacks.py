"""Lightning callbacks and reporting helpers of the training pipeline.

* :class:`Throughput`: tokens/s (``perf/tok_s``, shown in the progress bar) and cumulative tokens
  (``perf/tokens``).
* :class:`StepProgressBar`: Lightning's ``RichProgressBar`` counting towards ``max_steps`` (so it shows an ETA
  for the infinite, step-based training stream).
* :class:`LineProgress`: a plain one-line-per-interval progress report when stdout is not a terminal.
* :class:`PeriodicCheckpoint`: refresh ``last.ckpt`` every N steps between validations.
* :class:`AppendingCSVLogger`: a CSV logger that keeps the metrics of earlier sessions when a run resumes.
* :func:`read_metrics`, :func:`plot_metrics`: read Lightning's ``metrics.csv`` and draw the training curves.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = [
    "LineProgress",
    "PeriodicCheckpoint",
    "StepProgressBar",
    "Throughput",
    "plot_metrics",
    "read_metrics",
]


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Throughput(Callback):
    """Measure training throughput in tokens/s over a sliding window of steps (validation time excluded)."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._times: list[tuple[float, int]] = []
        self.tokens_per_batch = 0
        self.train_seconds = 0.0
        self.session_batches = 0
        self._last: float | None = None

    def _tokens(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        return int(pl_module.batches_seen) * self.tokens_per_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tokens_per_batch = int(batch.numel()) * trainer.world_size
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.train_seconds += now - self._last
        self._last = now
        self.session_batches += 1
        self._times.append((now, self._tokens(trainer, pl_module)))
        self._times = self._times[-(self.window + 1) :]
        if len(self._times) >= 2:
            (t0, n0), (t1, n1) = self._times[0], self._times[-1]
            if t1 > t0:
                pl_module.log("perf/tok_s", (n1 - n0) / (t1 - t0), on_step=True, prog_bar=True, logger=True)
        pl_module.log("perf/tokens", float(self._tokens(trainer, pl_module)), on_step=True, logger=True)

    def _pause(self, *args) -> None:
        self._last, self._times = None, []

    on_validation_start = _pause
    on_train_start = _pause

    def tokens_per_second(self) -> float | None:
        """Average training tokens/s of this session (validation excluded); None before the first step."""
        if self.session_batches == 0 or self.train_seconds <= 0:
            return None
        return self.session_batches * self.tokens_per_batch / self.train_seconds


def _target_batches(trainer: L.Trainer) -> float:
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps * trainer.accumulate_grad_batches
    return float("inf")


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training bar runs to ``max_steps`` (with elapsed/remaining time)."""

    @property
    def total_train_batches(self) -> int | float:
        return _target_batches(self.trainer)

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if "perf/tok_s" in items:
            items["tok/s"] = f"{float(items.pop('perf/tok_s')):.0f}"
        return items


class LineProgress(Callback):
    """Print ``step N/M | loss | tok/s | elapsed | eta`` every ``every`` steps (logs, non-terminals)."""

    def __init__(self, every: int = 50) -> None:
        self.every = max(1, int(every))
        self._start: float | None = None
        self._start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every or self._start is None:
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        m = trainer.progress_bar_metrics
        elapsed = time.perf_counter() - self._start
        done = step - self._start_step
        parts = [f"step {step}/{trainer.max_steps}"]
        if "train/loss" in m:
            parts.append(f"loss {float(m['train/loss']):.4f}")
        if "perf/tok_s" in m:
            parts.append(f"{float(m['perf/tok_s']):.0f} tok/s")
        parts.append(f"elapsed {_fmt_time(elapsed)}")
        if done > 0 and trainer.max_steps > 0:
            parts.append(f"eta {_fmt_time(elapsed / done * (trainer.max_steps - step))}")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and pl_module.last_val:
            v = pl_module.last_val
            print(
                f"step {trainer.global_step}: val NELBO {v['val/nll']:.4f} nats/token, "
                f"PPL <= {v['val/ppl']:.2f}",
                flush=True,
            )


class PeriodicCheckpoint(Callback):
    """Save ``last.ckpt`` every ``every`` optimiser steps, except at validation steps (saved after it).

    Saving before a validation that changes the clip interval would make a resume skip that change, so steps
    where a validation follows are left to :class:`~lightning.pytorch.callbacks.ModelCheckpoint`.
    """

    def __init__(self, path: Path, every: int, val_every: int) -> None:
        self.path, self.every, self.val_every = Path(path), int(every), int(val_every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if step == 0 or step % self.every or (self.val_every and step % self.val_every == 0):
            return
        if trainer.max_steps > 0 and step >= trainer.max_steps:
            return
        trainer.save_checkpoint(self.path)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer without the "delete the previous metrics.csv" step: a resumed run appends."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` (rows of a resumed run follow the old ones).

    Steps logged after the checkpoint by an interrupted run may appear twice; :func:`read_metrics` keeps the
    last (resumed) value.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def read_metrics(csv_path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from Lightning's ``metrics.csv``; a step logged twice (a resumed run
    repeating steps after its checkpoint) keeps its last value."""
    out: dict[str, dict[int, float]] = {}
    path = Path(csv_path)
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            for k, v in row.items():
                if k in ("step", "epoch") or v in (None, ""):
                    continue
                try:
                    out.setdefault(k, {})[int(float(step))] = float(v)
                except ValueError:
                    continue
    return {k: sorted(v.items()) for k, v in out.items()}


def plot_metrics(csv_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Plot training loss and validation perplexity against the step into ``png_path`` (matplotlib, Agg)."""
    metrics = read_metrics(csv_path)
    loss, ppl = metrics.get("train/loss", []), metrics.get("val/ppl", [])
    if not loss and not ppl:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if loss:  # Lightning logs the metrics of optimiser step k (and the validation after it) at step k - 1
        steps, vals = zip(*[(s + 1, v) for s, v in loss], strict=True)
        ax1.plot(steps, vals, lw=0.8, alpha=0.5, label="per step")
        k = max(1, len(vals) // 50)
        if k > 1:
            smooth = [
                sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1])
                for i in range(len(vals))
            ]
            ax1.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
        ax1.legend()
    ax1.set(xlabel="optimiser step", ylabel="loss (nats/token)", title="training loss")
    if ppl:
        steps, vals = zip(*[(s + 1, v) for s, v in ppl], strict=True)
        ax2.plot(steps, vals, marker="o")
        if max(vals) / max(min(vals), 1e-9) > 10:
            ax2.set_yscale("log")
    ax2.set(xlabel="optimiser step", ylabel="perplexity (upper bound)", title="validation perplexity")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png_path)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png

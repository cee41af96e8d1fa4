"""Lightning callbacks of the training pipeline (token throughput, progress towards ``max_steps``, periodic
``last.ckpt``) and the reading/plotting of the stock ``CSVLogger``'s ``metrics.csv`` (one ``version_N`` a session)."""

from __future__ import annotations

import csv
import time
from contextlib import suppress
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar, ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = [
    "LineProgress", "PeriodicCheckpoint", "StepProgressBar", "TokenThroughput", "plot_metrics", "read_metrics",
    "session_tokens_per_second", "shown_tokens_per_second",
]


class TokenThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` counting tokens: every ``log_every_n_steps`` it logs
    ``train/device/items_per_sec`` (one device's tokens/s; ``train/items_per_sec`` for all when there are several),
    ``train/lengths`` (this device's tokens this session) and ``train/time`` (training seconds).

    Hand-written part, because the stock clock only subtracts the time up to the last validation batch: the clip
    search (``on_validation_epoch_end``), the checkpoint saved after a validation and the warm-start evaluation
    (``on_train_start``) would pass for training time. Here the clock stops from ``on_train_start`` /
    ``on_validation_start`` to the next training batch, moving the stock monitor's private ``_t0s`` (as its own
    ``on_validation_end`` does; 2.6.6). No validation throughput (its rows would be keyed by validation batch).
    """

    def __init__(self, window: int = 20) -> None:
        super().__init__(batch_size_fn=len, length_fn=torch.Tensor.numel, window_size=window)  # [B, L] batches
        self._module_has_flops = False  # no FLOPs are counted: skip the stock "define flops_per_batch" warning
        self._paused_at: float | None = None

    @rank_zero_only
    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self._paused_at = time.perf_counter()

    @rank_zero_only
    def on_validation_start(self, trainer, *args) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._paused_at = time.perf_counter()

    @rank_zero_only
    def on_train_batch_start(self, trainer, *args) -> None:
        if self._paused_at is not None:  # move the clock's origin past the pause
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()  # validation work still queued is not training
            self._t0s[RunningStage.TRAINING] += time.perf_counter() - self._paused_at
            self._paused_at = None

    # no validation throughput, and no stock correction of the clock (the pause above replaces it)
    on_validation_batch_end = Callback.on_validation_batch_end
    on_validation_end = Callback.on_validation_end


def session_tokens_per_second(trainer) -> float | None:
    """Average training tokens/s (all devices) of this session, validation excluded, from the private state of the
    trainer's ``ThroughputMonitor`` (the logged ``train/time``/``train/lengths`` lag by up to ``log_every_n_steps``
    and a later ``trainer.validate`` resets them). None before the first step and off global rank 0."""
    monitor = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
    clock = monitor._throughputs.get(RunningStage.TRAINING) if monitor is not None else None
    if clock is None or not clock._lengths or clock._time[-1] <= 0:
        return None
    return clock._lengths[-1] * clock.world_size / clock._time[-1]


def shown_tokens_per_second(metrics) -> float | None:
    """The rolling tokens/s of all devices in ``trainer.logged_metrics`` (once the monitor's window is full)."""
    value = metrics.get("train/items_per_sec", metrics.get("train/device/items_per_sec"))
    return None if value is None else float(value)


def _fmt_time(seconds: float) -> str:
    h, rem = divmod(max(0, int(seconds)), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training bar runs to ``max_steps`` with the loss and tokens/s. Hand-written part:
    the stock bar counts the batches of an epoch, and our step-based training stream is one infinite epoch (no
    total, no ETA, "Epoch 0" as description)."""

    @property
    def total_train_batches(self) -> int | float:
        t = self.trainer
        return t.max_steps * t.accumulate_grad_batches if t.max_steps and t.max_steps > 0 else float("inf")

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if (tok_s := shown_tokens_per_second(trainer.logged_metrics)) is not None:
            items["tok/s"] = f"{tok_s:.0f}"
        return items


class LineProgress(Callback):
    """Print ``step N/M | loss | tok/s | elapsed | eta`` every ``every`` steps, and each validation's NELBO.
    Hand-written part: Lightning's bars redraw a line in place (a log file gets one endless line of carriage
    returns), and none counts towards ``max_steps``."""

    def __init__(self, every: int = 50) -> None:
        self.every = max(1, int(every))
        self._start: float | None = None
        self._start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        last_micro_batch = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not trainer.is_global_zero or step % self.every or self._start is None or not last_micro_batch:
            return
        m, elapsed, done = trainer.progress_bar_metrics, time.perf_counter() - self._start, step - self._start_step
        parts = [f"step {step}/{trainer.max_steps}"]
        if "train/loss" in m:
            parts.append(f"loss {float(m['train/loss']):.4f}")
        if (tok_s := shown_tokens_per_second(trainer.logged_metrics)) is not None:
            parts.append(f"{tok_s:.0f} tok/s")
        parts.append(f"elapsed {_fmt_time(elapsed)}")
        if done > 0 and trainer.max_steps > 0:
            parts.append(f"eta {_fmt_time(elapsed / done * (trainer.max_steps - step))}")
        print(" | ".join(parts), flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and (v := pl_module.last_val):
            nll, ppl = v["val/nll"], v["val/ppl"]
            print(f"step {trainer.global_step}: val NELBO {nll:.4f} nats/token, PPL <= {ppl:.2f}", flush=True)


class PeriodicCheckpoint(Callback):
    """Save ``last.ckpt`` every ``every`` optimiser steps, except at validation steps (saved after it).

    Hand-written part: ``ModelCheckpoint(every_n_train_steps=...)`` would also save at a validation step, before
    the validation; when that validation changes the clip interval a resume would skip the change."""

    def __init__(self, path: Path, every: int, val_every: int) -> None:
        self.path, self.every, self.val_every = Path(path), int(every), int(val_every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        skip = (batch_idx + 1) % trainer.accumulate_grad_batches or step == 0 or step % self.every
        if not (skip or (self.val_every and step % self.val_every == 0) or 0 < trainer.max_steps <= step):
            trainer.save_checkpoint(self.path)


def _metrics_files(path: Path) -> list[Path]:
    """``path`` (a file), or a ``CSVLogger`` dir's legacy ``metrics.csv`` then its ``version_N/metrics.csv`` by N."""
    if path.is_file():
        return [path]
    found = ((d.name.removeprefix("version_"), d / "metrics.csv") for d in path.glob("version_*"))
    versions = [f for _, f in sorted((int(n), f) for n, f in found if n.isdigit())]
    return [f for f in [path / "metrics.csv", *versions] if f.is_file()]


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` of a ``metrics.csv`` or of a ``CSVLogger`` directory (``run_dir/csv``,
    one ``version_N`` per session). A step logged twice keeps its last value; a later session (a resume, which
    restarts at its checkpoint's step) replaces every value an earlier one logged from its first step on."""
    out: dict[str, dict[int, float]] = {}
    for f in _metrics_files(Path(path)):
        with open(f, newline="") as fh:
            rows = [(int(float(r["step"])), r) for r in csv.DictReader(fh) if r.get("step") not in (None, "")]
        if rows:  # what the earlier sessions logged from this session's start on was abandoned at the resume
            start = min(s for s, _ in rows)
            out = {k: {s: v for s, v in d.items() if s < start} for k, d in out.items()}
        for step, row in rows:
            for k, v in row.items():
                if k not in ("step", "epoch") and v not in (None, ""):
                    with suppress(ValueError):
                        out.setdefault(k, {})[step] = float(v)
    return {k: sorted(v.items()) for k, v in out.items() if v}


def plot_metrics(path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Plot training loss and validation perplexity of :func:`read_metrics` (``path``: ``run_dir/csv`` or a
    ``metrics.csv``) against the step into ``png_path`` (matplotlib). Lightning has no plotting of its own."""
    metrics = read_metrics(path)
    # Lightning logs the metrics of optimiser step k (and the validation after it) at step k - 1
    loss, ppl = ([(s + 1, v) for s, v in metrics.get(k, [])] for k in ("train/loss", "val/ppl"))
    if not loss and not ppl:
        return None
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    if loss:
        steps, vals = zip(*loss, strict=True)
        ax1.plot(steps, vals, lw=0.8, alpha=0.5, label="per step")
        if (k := max(1, len(vals) // 50)) > 1:
            smooth = [sum(w) / len(w) for w in (vals[max(0, i - k + 1) : i + 1] for i in range(len(vals)))]
            ax1.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
        ax1.legend()
    ax1.set(xlabel="optimiser step", ylabel="loss (nats/token)", title="training loss")
    if ppl:
        steps, vals = zip(*ppl, strict=True)
        ax2.plot(steps, vals, marker="o")
        if max(vals) / max(min(vals), 1e-9) > 10:
            ax2.set_yscale("log")
    ax2.set(xlabel="optimiser step", ylabel="perplexity (upper bound)", title="validation perplexity")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    return Path(png_path)

"""Stop a training run cleanly: on SIGTERM/SIGINT with a resumable checkpoint, on NaN/inf without saving.

:class:`RunGuard` is a Lightning callback, written by hand because Lightning's own mechanisms do not guarantee this:

* Lightning's SIGTERM handling sets ``trainer.received_sigterm`` and raises ``SIGTERMException`` -- a ``SystemExit``
  with status 0 -- at the end of the step *or in the middle of a validation*, and saves nothing
  (``OnExceptionCheckpoint`` would save on any exception, a diverged model included, into its own file that a rerun
  does not resume). SIGINT becomes ``KeyboardInterrupt``, which it turns into ``sys.exit(1)``.
* ``Trainer.should_stop`` forces one more validation (and clip search) before stopping: a run interrupted by a
  scheduler's grace period would spend it validating, and its trajectory would differ from an uninterrupted one.

So, from ``on_train_start`` to ``on_train_end`` the guard owns SIGTERM and SIGINT; the handler only records the
signal. At the end of the current optimiser step the guard saves ``last.ckpt`` (``trainer.save_checkpoint`` in
``on_train_batch_end``, a point Lightning resumes from exactly) and raises :class:`~bd3lm.faults.Interrupted`, which
``train.py`` reports in one line with exit status 128 + signal, without exporting. When a validation follows that
step, it runs first (it may move the clip interval) and the guard stops right after it, on the ``last.ckpt`` that
``ModelCheckpoint`` writes after every validation. A second signal raises at once (nothing more is saved; every
write is atomic, so nothing is lost either).

After every optimiser step the guard checks that the loss of every micro-batch, every parameter and the optimiser
state are finite, and after every validation that the NELBO is (finite weights can overflow in the forward pass);
otherwise it raises :class:`~bd3lm.faults.NonFiniteError` before any checkpoint or export can see the model, so the
last good checkpoint and export stay as they were.

The check costs one multi-tensor norm over the weights and optimiser state and one host synchronisation per
optimiser step (the ``tolist`` of three flags), the price of stopping *at* the step that diverged rather than some
steps later. With several ranks one all-reduce per step (the maximum of the non-finite flags and of the signal
numbers) makes every rank take the same decision at the same step: a rank that stopped alone would leave the others
waiting in a collective forever.
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from bd3lm.faults import STOP_SIGNALS, Interrupted, NonFiniteError

__all__ = ["RunGuard"]


def _max_over_ranks(trainer: L.Trainer, flags: torch.Tensor) -> list[int]:
    """``flags`` (as ints), each the maximum over every rank when there are several (one all-reduce)."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return [int(v) for v in flags.tolist()]


class RunGuard(Callback):
    """Graceful stop on SIGTERM/SIGINT and fail-fast on non-finite loss, weights or NELBO (module docstring);
    ``last`` is the checkpoint a rerun resumes from (``run_dir/checkpoints/last.ckpt``)."""

    def __init__(self, last: str | Path) -> None:
        self.last = Path(last)
        self.signum = 0  # the signal this process received (0: none)
        self.stop_after_validation = 0  # the signal every rank agreed to stop on once this step's validation ran
        self._validated_step = -1  # the step of the last validation during fit (ModelCheckpoint saved after it)
        self._previous: dict[int, Any] = {}
        self._bad_loss: torch.Tensor | None = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum:  # a second signal: stop now
            raise Interrupted(signum, checkpoint=self.last)
        self.signum = int(signum)

    def _restore(self, *_: Any, **__: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    on_exception = teardown = _restore  # Lightning hooks (teardown gets stage=): every other way out of fit

    def _interrupt(self, trainer: L.Trainer, signum: int, *, save: bool, log_step: bool = False) -> Interrupted:
        self._restore()
        update = getattr(getattr(trainer, "_logger_connector", None), "update_train_step_metrics", None)
        if log_step and callable(update):  # Lightning logs a step's metrics after on_train_batch_end, which the
            update()  # stop skips (private API: without it only this step's row of metrics.csv would be missing)
        if save:  # every rank takes part (the training state gathers every rank's RNG)
            trainer.save_checkpoint(self.last)
        return Interrupted(signum, step=int(trainer.global_step), checkpoint=self.last, saved=True)

    @staticmethod
    def _validation_follows(trainer: L.Trainer) -> bool:
        """Whether Lightning validates after the optimiser step that just ended (its own criterion)."""
        every = trainer.val_check_batch
        due = trainer.enable_validation and isinstance(every, int) and every > 0
        return due and (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % every == 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum = self.stop_after_validation = 0
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if batch_idx % trainer.accumulate_grad_batches:
            return
        signum = self.stop_after_validation
        if not signum and trainer.world_size == 1 and self._validated_step == trainer.global_step:
            signum = self.signum  # received during the validation that ModelCheckpoint just saved after
        if signum:
            raise self._interrupt(trainer, signum, save=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signum = self.stop_after_validation or self.signum
        if trainer.world_size > 1:  # every rank ends here: agree once more
            signum = _max_over_ranks(trainer, torch.tensor([float(signum)], device=pl_module.device))[0]
        if signum:  # during the last step or the last validation: keep the promise, no export
            raise self._interrupt(trainer, signum, save=True)
        self._restore()

    def _diverged(self, what: str, value: float, step: int) -> NonFiniteError:
        self._restore()
        shown = f" ({value})" if not math.isfinite(value) else ""
        kept = f"the last good checkpoint {self.last} is kept" if self.last.is_file() else "no checkpoint yet"
        return NonFiniteError(
            f"{what} became non-finite{shown} at step {step}: stopped without saving or exporting ({kept}); "
            f"lower optim.lr or check the data"
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A non-finite validation NELBO (the same on every rank: it is reduced) stops the run before
        ``ModelCheckpoint`` (which Lightning calls after every other callback) saves the model."""
        nll = trainer.callback_metrics.get("val/nll")
        if nll is not None and not math.isfinite(float(nll)):
            raise self._diverged("the validation NELBO", float(nll), int(trainer.global_step))
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validated_step = int(trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # accumulated on the device: no synchronisation per micro-batch
            bad = ~torch.isfinite(loss.detach()).all()
            self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        flags = torch.zeros(3, device=pl_module.device)
        if self._bad_loss is not None:
            flags[0] = self._bad_loss.float()
        # the weights and the optimiser state (Adam's second moment can overflow while the weights stay finite;
        # the checkpoint writer refuses it, on rank 0 only, which would leave the other ranks waiting)
        states = [v for opt in trainer.optimizers for state in opt.state.values() for v in state.values()]
        tensors = [p.detach() for p in pl_module.parameters()]
        tensors += [v for v in states if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1]
        if tensors:  # one fused multi-tensor kernel: a tensor's norm is finite iff all its values are
            flags[1] = (~torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()).float()
        flags[2] = float(self.signum)
        loss_flag, weight_flag, signum = _max_over_ranks(trainer, flags)
        self._bad_loss = None
        if loss_flag or weight_flag:
            value = float(loss.detach().float().mean()) if loss_flag and isinstance(loss, torch.Tensor) else math.nan
            what = "the training loss" if loss_flag else "the weights or the optimiser state"
            raise self._diverged(what, value, int(trainer.global_step))
        if signum and self._validation_follows(trainer):
            self.stop_after_validation = signum
        elif signum:
            raise self._interrupt(trainer, signum, save=True, log_step=True)

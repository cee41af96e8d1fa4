"""Faults of a training run as exceptions that carry their exit status, and strict JSON.

``train.py`` prints every failure as one line on stderr and exits with the status of its exception:

* 1: an error (bad input, a corrupt checkpoint, a diverged run, a full disk, ...);
* 2: the run was refused (:class:`Refused`: the run directory is in use, or a resume changes the configuration);
* 128 + signal: :class:`Interrupted` (130 for SIGINT, 143 for SIGTERM), the shells' and schedulers' convention.

:func:`interrupt_handlers` turns SIGTERM and SIGINT into :class:`Interrupted` outside the training loop (where
every write is atomic, so unwinding at any point loses nothing); inside it
:class:`bd3lm.training.guard.RunGuard` takes over and stops at the next step boundary with a checkpoint.

:func:`dumps` is ``json.dumps`` that writes non-finite floats as ``null`` and refuses anything else that is not
JSON (``allow_nan=False``): every JSON file a run writes goes through it.

Nothing here imports torch or Lightning (``train.py`` installs the handlers before the heavy imports).
"""

from __future__ import annotations

import json
import math
import numbers
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointWriteError",
    "Interrupted",
    "NonFiniteError",
    "Refused",
    "RunError",
    "dumps",
    "interrupt_handlers",
    "json_safe",
]

#: The signals a scheduler or a user sends to stop a run (SLURM and Kubernetes send SIGTERM before SIGKILL).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunError(Exception):
    """A failure with a one-line message and an exit status (:attr:`exit_code`)."""

    exit_code = 1


class Refused(RunError):
    """The run was refused before anything was written (run directory in use, configuration changed)."""

    exit_code = 2


class NonFiniteError(RunError):
    """The loss or the weights became NaN/inf; nothing non-finite was saved or exported."""


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (the previous one is intact)."""


class Interrupted(RunError):
    """SIGTERM/SIGINT: the run stopped (at a step boundary during training, with a checkpoint).

    Args:
        signum: the signal received.
        step: the optimiser step reached, when known.
        checkpoint: the checkpoint a rerun resumes from (None: there is none yet).
        saved: whether ``checkpoint`` was written at ``step`` on the way out.
    """

    def __init__(
        self, signum: int, *, step: int | None = None, checkpoint: Path | None = None, saved: bool = False
    ) -> None:
        self.signum, self.step, self.checkpoint, self.saved = int(signum), step, checkpoint, saved
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def message(self) -> str:
        """The one line ``train.py`` prints."""
        at = f" at step {self.step}" if self.step is not None else ""
        head = f"interrupted by {self.signal_name}{at}"
        if self.saved:
            return f"{head}: saved checkpoint {self.checkpoint}; rerun the same command to resume"
        if self.checkpoint is not None and Path(self.checkpoint).is_file():
            return f"{head}: nothing new saved, {self.checkpoint} is kept; rerun the same command to resume"
        return f"{head}: no checkpoint yet, nothing saved; rerun the same command to start again"

    def located(self, *, step: int | None, checkpoint: Path) -> Interrupted:
        """This interruption with the run's context filled in (for one raised outside the training loop)."""
        if self.saved or self.checkpoint is not None:
            return self
        return Interrupted(self.signum, step=step if self.step is None else self.step, checkpoint=checkpoint)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def interrupt_handlers() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted` (restored on exit; main thread only).

    SIGINT would otherwise raise ``KeyboardInterrupt``, which Lightning turns into ``sys.exit(1)`` without a
    word, and SIGTERM would kill the process (or, inside ``Trainer.fit``, end it with status 0).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by ``None``, containers copied."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict ``json.dumps``: non-finite floats become ``null``; the output is always valid JSON."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)

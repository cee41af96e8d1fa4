"""Who owns a run directory, and what a rerun may change in it.

**Ownership.** :class:`RunDirLock` holds an exclusive ``fcntl.flock`` on ``run_dir/.lock`` for the whole run;
the file records the holder (pid, host, start time, command). A second ``train.py`` on the same directory is
refused at once (:class:`~bd3lm.faults.Refused`, exit status 2) with the holder's pid and host. The kernel
drops the lock when its process dies (even by SIGKILL), so a stale lock file never blocks anybody; the holder
deletes the file on release. Only the process that launched the run takes it (:func:`owns_run_dir`: global rank
0; the ranks Lightning, torchrun or SLURM start beside it work under its lock).

**Resume.** :func:`check_resume_config` compares the ``config.yaml`` a run directory was started with against
the new configuration, before anything in the directory is touched, and refuses (exit status 2, naming the
key, the old and the new value) any change that is not in :data:`RESUMABLE`:

* allowed: how long and how often (``trainer.max_steps``, except with ``optim.schedule=cosine``, whose learning
  rate reaches 0 at ``max_steps``; ``val_every``, ``log_every``, ``ckpt_every``, ``limit_val_batches``,
  ``num_sanity_val_steps``), where and how it runs (``trainer.accelerator``, ``devices``, ``num_nodes``,
  ``precision``, ``deterministic``, ``progress_bar``, ``strategy.*``, ``model.attn_backend``, ``data.eval_batch_size``,
  ``data.cache_dir``, ``data.num_proc``, ``data.shard_dtype``), and ``name``, ``run_dir``, ``mode``, ``export``;
  ``init_from`` too once a checkpoint exists (a resume ignores it);
* refused: everything else, in particular what defines the model (``model.*``, ``algo.*``, ``noise.*``), the
  tokenizer and the data tokens (``data.path``, ``data.tokenizer``, ``data.vocab_size``,
  ``data.valid_fraction``, ``seed``, ...), the objective and the optimisation (``data.batch_size``,
  ``trainer.accumulate_grad_batches``, ``optim.*`` -- restored from the checkpoint, so a new value would be
  silently ignored -- and ``ema.*``), and ``init_from`` before the first checkpoint (the directory holds the
  tokenizer of the first start).

A key missing from an old ``config.yaml`` (written before the key existed) passes when the new value is the
key's default.

**Starts leave nothing behind when they fail.** The tokenizer and ``config.yaml`` of a start are written only
once the start has succeeded (``train.py`` commits them just before training); :func:`run_dir_lock` removes a
run directory the run created when the run fails and the directory is empty again.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from bd3lm.faults import Refused, dumps

__all__ = ["LOCK_NAME", "RESUMABLE", "RunDirLock", "check_resume_config", "owns_run_dir", "run_dir_lock"]

LOCK_NAME = ".lock"

#: Configuration keys (and key prefixes) that may change when a run directory is reused.
RESUMABLE: tuple[str, ...] = (
    "name", "run_dir", "mode", "export",
    "trainer.max_steps", "trainer.val_every", "trainer.log_every", "trainer.ckpt_every", "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps", "trainer.progress_bar", "trainer.accelerator", "trainer.devices",
    "trainer.num_nodes", "trainer.precision", "trainer.deterministic",
    "strategy", "model.attn_backend", "data.eval_batch_size", "data.cache_dir", "data.num_proc", "data.shard_dtype",
)

#: Nodes that only interpolate other keys (configs/train.yaml's ``_target_`` nodes): the keys they come from are
#: what is compared, so these are skipped.
DERIVED: tuple[str, ...] = ("network", "settings", "datamodule", "optim.optimizer")

_WHY = {
    "model": "it defines the model",
    "algo": "it defines the model and its objective",
    "noise": "it defines the objective",
    "data": "it defines the tokenizer and the data the run trains on",
    "seed": "it defines the data order, the initial weights and the noise streams",
    "data.num_workers": "the saved data position is the state of a loader with that many workers",
    "optim": "the optimiser and its schedule are restored from the checkpoint, so it would be ignored",
    "ema": "the EMA is restored from the checkpoint",
    "data.batch_size": "it changes the batch of the objective and the data position",
    "trainer.accumulate_grad_batches": "it changes the batch of the objective",
    "init_from": "the run directory holds the tokenizer of its first start",
    "trainer.max_steps": "with optim.schedule=cosine the learning rate decays to 0 at trainer.max_steps, so a new "
    "value would make it jump",
}

#: Rank variables of the launchers (Lightning, torchrun, SLURM, MPI); the owner has every one of them 0.
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")


def owns_run_dir() -> bool:
    """True in the process that owns the run directory: global rank 0, or a process that is not a rank.

    Lightning's DDP launcher starts ranks 1..n-1 as copies of ``train.py`` with ``LOCAL_RANK`` set (after the
    launching process, rank 0, took the lock); torchrun and SLURM start every rank with ``RANK``/``SLURM_PROCID``.
    """
    return all(int(os.environ[v]) == 0 for v in _RANK_VARS if os.environ.get(v, "").isdigit())


class RunDirLock:
    """Exclusive ``flock`` on ``run_dir/.lock`` (see the module docstring). Not re-entrant."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def holder(self) -> dict:
        """What the lock file says about its holder (empty when unreadable)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def acquire(self) -> RunDirLock:
        """Take the lock or raise :class:`~bd3lm.faults.Refused` naming the holder."""
        for _ in range(100):  # retried only when the file was replaced between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    h = self.holder()
                    since = f" since {h['started']}" if h.get("started") else ""
                    raise Refused(f"run_dir {self.run_dir} is in use by another train.py (pid {h.get('pid', '?')} on "
                                  f"{h.get('host', '?')}{since}); wait for it to finish, stop it, or use another "
                                  "run_dir") from None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    print(f"warning: cannot lock run_dir {self.run_dir} ({e.strerror}): a second train.py on it "
                          "would not be refused", file=sys.stderr, flush=True)
                    return self
                raise
            try:  # the previous holder unlinks the file on release: make sure we locked the live one
                st, own = os.stat(self.path), os.fstat(fd)
                live = (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
            except FileNotFoundError:
                live = False
            if not live:
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "command": " ".join(sys.argv)[:1000]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (dumps(info) + "\n").encode(), 0)
            self._fd = fd
            return self
        raise RuntimeError(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        """Delete the lock file (while still holding it) and drop the lock."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


@contextmanager
def run_dir_lock(run_dir: Path, *, created: bool, owner: bool = True) -> Iterator[RunDirLock | None]:
    """Hold :class:`RunDirLock` over the block (``owner`` only). When the block fails and ``run_dir`` was
    ``created`` by this run and is empty again, it is removed: a failed first start leaves nothing."""
    lock = RunDirLock(run_dir).acquire() if owner else None
    try:
        yield lock
    except BaseException:
        if lock is not None and created:
            lock.release()  # first: the lock file is in run_dir
            with suppress(OSError):
                run_dir.rmdir()  # only when empty
        raise
    finally:
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------------------------------------- resume check


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` for a nested mapping (lists are leaves)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in prefixes)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


_ABSENT = object()


def check_resume_config(run_dir: Path, new: Mapping[str, Any], *, resuming: bool,
                        defaults: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None) -> list[str]:
    """Refuse a configuration that differs from ``run_dir/config.yaml`` in a key outside :data:`RESUMABLE`.

    Args:
        run_dir: the run directory (nothing is checked when it has no ``config.yaml``).
        new: the new configuration, resolved, as nested dicts.
        resuming: whether a checkpoint will be resumed (then ``init_from`` may differ: it is ignored).
        defaults: given the stored configuration, the default configuration of the same groups (nested
            dicts); used for keys an old ``config.yaml`` lacks. None: such keys are refused.

    Returns:
        The allowed keys that changed. Raises :class:`~bd3lm.faults.Refused` (one line) otherwise.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    try:
        stored_tree = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file cannot be trusted
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise Refused(f"{path} is unreadable ({first}): repair or delete it to reuse run_dir {run_dir}") from None
    if not isinstance(stored_tree, dict):
        raise Refused(f"{path} is not a configuration mapping: repair or delete it to reuse run_dir {run_dir}")
    stored, fresh = flatten(stored_tree), flatten(new)
    default_values: dict[str, Any] | None = None
    changed, refused = [], []
    for key in sorted(fresh):
        if _under(key, DERIVED):
            continue
        old = stored.get(key, _ABSENT)
        if old is _ABSENT:  # a key added to the configuration after this run started
            if default_values is None:
                try:
                    default_values = flatten(defaults(stored_tree)) if defaults else {}
                except Exception:  # noqa: BLE001 - no defaults: the key counts as changed
                    default_values = {}
            old = default_values.get(key, _ABSENT)
        if old is not _ABSENT and _same(old, fresh[key]):
            continue
        allowed = resuming if key == "init_from" else _under(key, RESUMABLE)
        cosine_end = key == "trainer.max_steps" and fresh.get("optim.schedule") == "cosine"
        (changed if allowed and not cosine_end else refused).append(key)
    if refused:
        key = refused[0]
        old = stored.get(key, _ABSENT)
        was = "<absent>" if old is _ABSENT else json.dumps(old, default=str)
        why = _WHY.get(key) or _WHY.get(key.split(".")[0], "it may not change when a run is resumed")
        more = f" (also changed: {', '.join(refused[1:4])}{', ...' if len(refused) > 4 else ''})" if refused[1:] else ""
        raise Refused(f"run_dir {run_dir} was started with {key}={was}, this command sets {key}="
                      f"{json.dumps(fresh[key], default=str)}{more}: {why}; use another run_dir (init_from= to start "
                      "from this run) or keep the old value")
    return changed

"""Faults of ``train.py`` and what they leave behind: SIGTERM/SIGINT, NaN, a second writer, a changed resume,
a failed warm start, a full disk, a non-UTF-8 corpus, a damaged checkpoint.

Every training here is a 40k-parameter model (L = 16) on a 30 kB corpus for a few steps, run in-process through
``train.main`` (the imports are paid once) except where a real process is the point (the SIGTERM test).
"""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import write_snapshot
from safetensors.torch import load_file

import train
from bd3lm.data import DEFAULT_CORPUS, read_documents
from bd3lm.faults import Interrupted, dumps
from bd3lm.training.callbacks import read_metrics
from bd3lm.training.checkpoint import INTEGRITY_KEY, AtomicCheckpointIO, export_hf, inspect_checkpoint
from bd3lm.training.run_dir import RunDirLock, check_resume_config, owns_run_dir

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),  # resuming a copied run directory
]

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("BD3LM_DEBUG", None)
for _v in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
    ENV.pop(_v, None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        path.write_text(f.read(30000))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_args(run_dir: Path, corpus: Path, cache_dir: Path, *overrides: str) -> list[str]:
    """train.py's arguments for the tiny model: 4 steps, validation (and last/best checkpoints) every 2."""
    return [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.path={corpus}",
        "data.vocab_size=300",
        f"data.cache_dir={cache_dir}",
        "model.length=16",
        "model.hidden_dim=32",
        "model.cond_dim=16",
        "model.n_blocks=1",
        "model.n_heads=2",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "trainer.limit_val_batches=1",
        "algo.search_every=0",
        "trainer.max_steps=4",
        "trainer.val_every=2",
        *overrides,
    ]


@pytest.fixture
def tiny(corpus, cache_dir):
    """``tiny(run_dir, *overrides)``: :func:`tiny_args` with this module's corpus and cache."""
    return lambda run_dir, *overrides: tiny_args(run_dir, corpus, cache_dir, *overrides)


def main(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """``train.main(argv)`` in-process: (exit status, stdout, non-empty stderr lines)."""
    rc = train.main(argv)
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]


def step_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def leftovers(run_dir: Path) -> list[Path]:
    """Temporaries and lock files: none may survive a run, whatever its end."""
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock"]


def strict_json(text: str):
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, cache_dir) -> Path:
    """A finished 2-step run (checkpoints, config.yaml, hf/); copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert train.main(tiny_args(run_dir, corpus, cache_dir, "trainer.max_steps=2")) == 0
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ 1. SIGTERM / SIGINT


def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_resumes(tmp_path, tiny, capsys):
    run_dir = tmp_path / "run"
    # validation every 9 steps: the stop happens at the end of a plain step (the guard saves there itself)
    args = tiny(run_dir, "trainer.max_steps=1000", "trainer.val_every=9")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    stepped = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 2/"):
                stepped.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not stepped.wait(timeout=300):
            pytest.fail(f"no training step seen; stdout: {''.join(lines)[-2000:]}")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = [line for line in proc.stderr.read().splitlines() if line.strip()]
    assert rc == 143, (rc, err)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert len(err) == 1, err
    m = re.fullmatch(r"interrupted by SIGTERM at step (\d+): saved checkpoint (\S+); rerun the same command to resume",
                     err[0])
    assert m and Path(m.group(2)) == last, err
    step = int(m.group(1))
    assert 2 <= step < 1000 and step_of(last) == step
    inspect_checkpoint(last)  # finite and intact
    assert not (run_dir / "hf").exists()  # a half-trained model is not exported as final
    assert leftovers(run_dir) == []
    assert len(read_metrics(run_dir / "csv")["train/loss"]) == step  # every step's metrics kept

    # the same command resumes (max_steps is one of the settings a rerun may change)
    rc, out, err = main(tiny(run_dir, f"trainer.max_steps={step + 2}", "trainer.val_every=9"), capsys)
    assert rc == 0, err
    assert f"resuming from {last} (step {step})" in out
    assert step_of(last) == step + 2 and (run_dir / "hf" / "model.safetensors").is_file()
    assert [s for s, _ in read_metrics(run_dir / "csv")["train/loss"]] == list(range(step + 2))


def _signal_at_step(monkeypatch, signum: int, at: int) -> None:
    """Send ``signum`` to this process from a callback when optimiser step ``at`` has ended (a real signal;
    RunGuard's on_train_batch_end has already run for that step, so the stop comes after the next check)."""
    from bd3lm.training import callbacks

    original = callbacks.TokenThroughput.on_train_batch_end  # the stock ThroughputMonitor's, after RunGuard's

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        original(self, trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == at:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(callbacks.TokenThroughput, "on_train_batch_end", on_train_batch_end)


def test_sigint_during_a_validation_step_stops_after_it_and_the_resume_is_exact(tmp_path, tiny, capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert main(tiny(reference), capsys)[0] == 0
    run_dir = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as mp:
        _signal_at_step(mp, signal.SIGINT, at=2)  # step 2 is followed by a validation
        rc, out, err = main(tiny(run_dir), capsys)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert rc == 130 and err == [
        f"interrupted by SIGINT at step 2: saved checkpoint {last}; rerun the same command to resume"
    ]
    assert step_of(last) == 2 and not (run_dir / "hf").exists() and leftovers(run_dir) == []
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored

    rc, out, err = main(tiny(run_dir), capsys)
    assert rc == 0 and "(step 2)" in out, err
    got, ref = read_metrics(run_dir / "csv"), read_metrics(reference / "csv")
    assert got["train/loss"] == ref["train/loss"] and got["val/nll"] == ref["val/nll"]  # the same trajectory
    a = torch.load(last, weights_only=True)["state_dict"]
    b = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_signal_in_the_last_step_skips_the_export_and_the_rerun_finishes(tmp_path, tiny, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as mp:
        _signal_at_step(mp, signal.SIGTERM, at=4)  # the last step (then its validation, then the end of fit)
        rc, out, err = main(tiny(run_dir), capsys)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert rc == 143 and err == [
        f"interrupted by SIGTERM at step 4: saved checkpoint {last}; rerun the same command to resume"
    ]
    assert step_of(last) == 4 and not (run_dir / "hf").exists()
    rc, out, err = main(tiny(run_dir), capsys)
    assert rc == 0 and "(step 4)" in out and "Trained 4 steps" in out, err
    assert (run_dir / "hf" / "model.safetensors").is_file()


def test_sigterm_before_training_leaves_nothing(tmp_path, tiny, capsys, monkeypatch):
    from bd3lm.training import data

    real = data.prepare_data

    def prepare_data(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # main()'s handler raises at once: nothing is being trained yet
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "prepare_data", prepare_data)
    run_dir = tmp_path / "run"
    rc, out, err = main(tiny(run_dir), capsys)
    assert rc == 143 and err == [
        "interrupted by SIGTERM: no checkpoint yet, nothing saved; rerun the same command to start again"
    ]
    assert not run_dir.exists()  # the start was not committed: no tokenizer, no config.yaml, no lock


def test_interrupted_message_and_exit_status():
    e = Interrupted(signal.SIGTERM, step=7, checkpoint=Path("/r/last.ckpt"), saved=True)
    assert e.exit_code == 143 and Interrupted(signal.SIGINT).exit_code == 130
    assert str(e) == "interrupted by SIGTERM at step 7: saved checkpoint /r/last.ckpt; rerun the same command to resume"
    assert "no checkpoint yet" in str(Interrupted(signal.SIGTERM).located(step=None, checkpoint=Path("/nope")))


# ------------------------------------------------------------------------------------------ 2. non-finite training


@pytest.mark.parametrize(
    "overrides",
    [
        ("trainer.val_every=9", "trainer.ckpt_every=2"),  # caught in the training step
        ("trainer.val_every=2",),  # the weights overflow in the forward pass first: caught by the validation
    ],
    ids=["train-loss", "validation"],
)
def test_a_diverging_run_stops_without_saving_or_exporting_nan(tmp_path, tiny, capsys, overrides):
    run_dir = tmp_path / "run"
    rc, out, err = main(tiny(run_dir, "optim.lr=1e4", "trainer.max_steps=12", *overrides), capsys)
    assert rc == 1 and len(err) == 1, err
    m = re.fullmatch(r"error: the (training loss|weights or the optimiser state|validation NELBO) became non-finite"
                     r".* at step (\d+): stopped without saving or exporting "
                     r"\(the last good checkpoint (\S+) is kept\); .*", err[0])
    assert m, err
    bad_step = int(m.group(2))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert Path(m.group(3)) == last
    assert 2 <= step_of(last) < bad_step
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        inspect_checkpoint(ckpt)  # every checkpoint on disk is finite (and verified)
    assert not (run_dir / "hf").exists() and leftovers(run_dir) == []
    for f in [*run_dir.rglob("*.json"), *run_dir.rglob("*.jsonl")]:  # every JSON the run wrote is valid JSON
        for line in f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]:
            strict_json(line)


def test_the_guard_sees_an_overflowing_optimiser_state(tmp_path):
    """Adam's second moment can overflow while the weights stay finite: the guard stops the step (on every rank
    alike) instead of leaving it to the checkpoint writer, which refuses it on rank 0 only."""
    from types import SimpleNamespace

    from bd3lm.faults import NonFiniteError
    from bd3lm.training.guard import RunGuard

    module = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(module.parameters())
    module(torch.ones(1, 3)).sum().backward()
    opt.step()
    trainer = SimpleNamespace(accumulate_grad_batches=1, world_size=1, optimizers=[opt], global_step=7)
    lit = SimpleNamespace(parameters=module.parameters, device=torch.device("cpu"))
    guard = RunGuard(tmp_path / "last.ckpt")
    guard.on_train_batch_end(trainer, lit, {"loss": torch.tensor(1.0)}, None, 0)  # all finite: no stop
    opt.state[module.weight]["exp_avg_sq"][0, 0] = float("inf")
    stopped = r"the weights or the optimiser state became non-finite.* at step 7: stopped without saving"
    with pytest.raises(NonFiniteError, match=stopped):
        guard.on_train_batch_end(trainer, lit, {"loss": torch.tensor(1.0)}, None, 0)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_nan_is_never_written(tmp_path, trained):
    from bd3lm import BD3LM

    hf = copy_run(trained / "hf", tmp_path / "hf")
    model = BD3LM.from_pretrained(hf)
    export_hf(model, hf, info={"val_nll": float("nan"), "interval": [float("inf"), 1.0]})
    info = strict_json((hf / "training_info.json").read_text())  # NaN -> null: valid JSON
    assert info == {"val_nll": None, "interval": [None, 1.0]}
    good = (hf / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(Exception, match="non-finite weights"):
        export_hf(model, hf)
    assert (hf / "model.safetensors").read_bytes() == good  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary export left
    ckpt = tmp_path / "c" / "last.ckpt"
    with pytest.raises(Exception, match="refusing to write checkpoint .*non-finite"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"model.w": torch.tensor([1.0, math.inf])}}, ckpt)
    assert not ckpt.parent.exists()  # refused before anything was written
    assert dumps({"a": float("nan"), "b": [1, float("-inf")]}) == '{"a": null, "b": [1, null]}'


# ------------------------------------------------------------------------------------------ 3. run_dir lock

HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, tiny, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        rc, out, err = main(tiny(run_dir), capsys)
        elapsed = time.monotonic() - t0
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: run_dir {run_dir} is in use by another train.py "
                                 f"(pid {holder.pid} on {socket.gethostname()}")
        assert elapsed < 10, elapsed  # refused before any heavy work
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written beside the holder's file
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirLock(run_dir).acquire()  # the dead holder's lock is gone (flock dies with its process)
    assert strict_json((run_dir / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / ".lock").exists()


def test_only_global_rank_zero_owns_the_run_dir(monkeypatch):
    for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert owns_run_dir()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank started by Lightning's DDP launcher
    assert not owns_run_dir()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "8")  # local rank 0 of the second node (torchrun)
    assert not owns_run_dir()
    monkeypatch.setenv("RANK", "0")
    assert owns_run_dir()


# ------------------------------------------------------------------------------------------ 4. resume config


def test_resume_refuses_a_model_change_before_touching_the_run_dir(tmp_path, trained, tiny, capsys):
    run_dir = copy_run(trained, tmp_path / "run")
    snapshot = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    rc, out, err = main(tiny(run_dir, "trainer.max_steps=2", "algo.block_size=8"), capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: run_dir {run_dir} was started with algo.block_size=4, this command sets "
                             f"algo.block_size=8")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == snapshot  # config.yaml, hf/, ...


def test_resume_accepts_the_allowed_changes_and_records_them(tmp_path, trained, tiny, capsys):
    run_dir = copy_run(trained, tmp_path / "run")
    rc, out, err = main(tiny(run_dir, "trainer.max_steps=3", "trainer.log_every=2", "data.num_workers=0",
                             "data.eval_batch_size=4"), capsys)
    assert rc == 0, err
    assert "(step 2)" in out and step_of(run_dir / "checkpoints" / "last.ckpt") == 3
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.trainer.max_steps == 3 and cfg.data.eval_batch_size == 4


def test_resume_config_rules(tmp_path, tiny):
    from omegaconf import OmegaConf

    def resolved(*overrides):
        return OmegaConf.to_container(train.compose_config(tiny(tmp_path, *overrides)), resolve=True)

    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(resolved()))
    assert check_resume_config(tmp_path, resolved("trainer.max_steps=99", "trainer.devices=2"), resuming=True) == [
        "trainer.devices", "trainer.max_steps"]
    for key, value, why in [
        ("optim.lr", "1e-2", "restored from the checkpoint"),
        ("data.vocab_size", "512", "tokenizer"),
        ("seed", "2", "data order"),
        ("data.num_workers", "3", "loader with that many workers"),
        ("data.batch_size", "2", "batch"),
    ]:
        with pytest.raises(Exception, match=rf"{re.escape(key)}=.*{why}") as info:
            check_resume_config(tmp_path, resolved(f"{key}={value}"), resuming=True)
        assert getattr(info.value, "exit_code", None) == 2 and "\n" not in str(info.value)
    # with a cosine schedule the learning rate reaches 0 at max_steps: a new value would make it jump
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(resolved("optim.schedule=cosine")))
    with pytest.raises(Exception, match=r"trainer.max_steps=.*decays to 0 at trainer.max_steps"):
        check_resume_config(tmp_path, resolved("optim.schedule=cosine", "trainer.max_steps=99"), resuming=True)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(resolved()))
    # init_from: ignored by a resume, but it defines a start that has no checkpoint yet
    assert check_resume_config(tmp_path, resolved("init_from=/x"), resuming=True) == ["init_from"]
    with pytest.raises(Exception, match="init_from"):
        check_resume_config(tmp_path, resolved("init_from=/x"), resuming=False)
    # a key an old config.yaml lacks passes when the new value is its default, not otherwise
    old = resolved()
    del old["algo"]["cedd_weight"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    assert check_resume_config(tmp_path, resolved(), resuming=True, defaults=train.group_defaults) == []
    with pytest.raises(Exception, match="algo.cedd_weight=<absent>"):
        check_resume_config(tmp_path, resolved("algo.cedd_weight=log"), resuming=True, defaults=train.group_defaults)


# ------------------------------------------------------------------------------------------ 5. failed init_from


def test_a_failed_init_from_leaves_nothing_and_the_next_one_uses_its_own_tokenizer(tmp_path, trained, tiny, capsys):
    from bd3lm.tokenizer import train_bpe_tokenizer

    bad = tmp_path / "bad"  # a different tokenizer (vocabulary 280) next to broken weights
    bad.mkdir()
    train_bpe_tokenizer(["to be or not to be, that is the question " * 50], vocab_size=280, save_dir=str(bad))
    shutil.copy(trained / "hf" / "config.json", bad / "config.json")
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    run_dir = tmp_path / "run"
    rc, out, err = main(tiny(run_dir, f"init_from={bad}", "trainer.max_steps=2"), capsys)
    assert rc == 1 and err == [
        f"error: init_from {bad}: {bad / 'model.safetensors'} is not a readable safetensors file (Error while "
        f"deserializing header: {err[0].split('deserializing header: ')[-1]}"
    ], err
    assert not run_dir.exists()  # the failed start left nothing (no tokenizer to win over the next start)

    good = trained / "hf"
    rc, out, err = main(tiny(run_dir, f"init_from={good}", "trainer.max_steps=2"), capsys)
    assert rc == 0, err
    assert f"warm start from {good}" in out
    used = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())
    assert used == json.loads((good / "tokenizer.json").read_text())
    assert len(used["model"]["vocab"]) != len(json.loads((bad / "tokenizer.json").read_text())["model"]["vocab"])


def test_init_from_a_hub_id_in_the_cache(tmp_path, trained, tiny, capsys, hub_cache):
    """init_from=org/name (the paper's fine-tune recipe) starts from the Hub cache's snapshot exactly as from the
    directory; an id missing from the cache while offline is one line and leaves nothing."""
    cache = hub_cache
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    snap = write_snapshot(cache, "tiny-org/pretrain", trained / "hf", files=files)
    runs = {}
    for name, source in (("dir", trained / "hf"), ("hub", "tiny-org/pretrain")):
        run_dir = tmp_path / name
        rc, out, err = main(tiny(run_dir, f"init_from={source}", "trainer.max_steps=2"), capsys)
        assert rc == 0, err
        runs[name] = run_dir
    assert f"warm start from {snap}" in out
    a, b = (load_file(runs[k] / "hf" / "model.safetensors") for k in ("dir", "hub"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run_dir = tmp_path / "missing"
    rc, out, err = main(tiny(run_dir, "init_from=tiny-org/absent", "trainer.max_steps=2"), capsys)
    assert rc == 1 and len(err) == 1 and "not in the local Hugging Face cache" in err[0], err
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------------ 6. disk full


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, b) -> int:
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from bd3lm.training import checkpoint

    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def no_space(obj, f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fills_up(obj, f):  # the disk fills up inside torch, which reports it from inline_container.cc
        real_save(obj, _FullDisk(f, 200))

    for fail in (no_space, fills_up):
        monkeypatch.setattr(checkpoint.torch, "save", fail)
        with pytest.raises(Exception) as info:
            io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}}, path)
        assert str(info.value) == f"could not write checkpoint to {path.parent}: No space left on device"
        assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left
        monkeypatch.setattr(checkpoint.torch, "save", real_save)
        assert torch.load(path, weights_only=True)["state_dict"]["w"].sum() == 3  # the previous one, intact


def test_disk_full_during_training(tmp_path, tiny, capsys, monkeypatch):
    from bd3lm.training import checkpoint

    real_save = torch.save

    def save(obj, f):  # the checkpoints of step 4 do not fit
        return real_save(obj, _FullDisk(f, 4096) if obj.get("global_step", 0) >= 4 else f)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    run_dir = tmp_path / "run"
    rc, out, err = main(tiny(run_dir, "trainer.max_steps=6"), capsys)
    ckpts = run_dir / "checkpoints"
    assert rc == 1 and err == [f"error: could not write checkpoint to {ckpts}: No space left on device"]
    assert step_of(ckpts / "last.ckpt") == 2 and inspect_checkpoint(ckpts / "last.ckpt")
    assert leftovers(run_dir) == [] and not (run_dir / "hf").exists()


# ------------------------------------------------------------------------------------------ 7. non-UTF-8 corpus


def test_a_non_utf8_corpus_is_one_line_naming_the_file(tmp_path, tiny, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("To be, or not to be\nthat is the question: caf\u00e9\n".encode("latin-1") * 200)
    run_dir = tmp_path / "run"
    rc, out, err = main(tiny(run_dir, f"data.path={bad}"), capsys)
    assert rc == 1 and err == [
        f"error: corpus {bad} is not UTF-8 text: invalid byte 0xe9 at offset 45, line 2; convert it to UTF-8 "
        f"(e.g. iconv -f latin1 -t utf-8)"
    ]
    assert not run_dir.exists()
    gz = tmp_path / "latin1.txt.gz"
    gz.write_bytes(gzip.compress(bad.read_bytes()))
    with pytest.raises(ValueError, match=rf"corpus {re.escape(str(gz))} is not UTF-8 .*decompression"):
        read_documents(str(gz))


# ------------------------------------------------------------------------------------------ 8. damaged checkpoint


def _flip_a_tensor_byte(ckpt: Path) -> None:
    """Flip a low mantissa bit inside the largest tensor record of a torch zip checkpoint (the zip stays
    readable and the value finite: only a checksum can tell)."""
    with zipfile.ZipFile(ckpt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(ckpt.read_bytes())
    header = info.header_offset
    name_len = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(data[header + 28 : header + 30], "little")
    data[header + 30 + name_len + extra_len + info.file_size // 8 * 4] ^= 0x01
    ckpt.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "non-finite weights"])
def test_a_damaged_resume_checkpoint_is_refused_and_left_alone(tmp_path, trained, tiny, capsys, damage):
    run_dir = copy_run(trained, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.ckpt"
    if damage == "flipped byte":
        _flip_a_tensor_byte(last)
        expected = "is corrupt (its tensors do not match the checksum"
    elif damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        expected = "is corrupt or unreadable"
    else:  # written by another tool (no checksum) with a NaN weight
        ckpt = torch.load(last, weights_only=True)
        del ckpt[INTEGRITY_KEY]
        next(t for t in ckpt["state_dict"].values() if t.is_floating_point()).view(-1)[0] = float("nan")
        torch.save(ckpt, last)
        expected = "holds non-finite values (state_dict."
    snapshot = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    rc, out, err = main(tiny(run_dir, "trainer.max_steps=3"), capsys)
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"error: checkpoint {last} "), err
    assert expected in err[0]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == snapshot  # nothing used or written
    if damage == "flipped byte":  # Lightning's own load path (AtomicCheckpointIO) refuses it too
        with pytest.raises(ValueError, match="corrupt"):
            AtomicCheckpointIO().load_checkpoint(last, weights_only=True)

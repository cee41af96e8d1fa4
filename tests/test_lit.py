"""Unit tests of the Lightning layer: data order and position, atomic checkpoints, warm starts, export, validation."""

import os
import time
from functools import partial
from itertools import islice

import lightning as L
import pytest
import torch
from conftest import tiny_model

import bd3lm
from bd3lm.training.callbacks import plot_metrics, read_metrics
from bd3lm.training.checkpoint import (
    AtomicCheckpointIO,
    clean_stale_temporaries,
    export_hf,
    inspect_checkpoint,
    load_init_weights,
)
from bd3lm.training.data import ChunkDataModule, EndlessSampler
from bd3lm.training.module import BD3LMLit, TrainSettings

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning 2.6 with torch 2.13


def take(sampler, n):
    return list(islice(iter(sampler), n))


# ------------------------------------------------------------------------------------------ sampler


def test_endless_sampler_gives_every_rank_a_disjoint_part_of_each_epoch():
    world = [EndlessSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
    streams = [take(s, 15) for s in world]  # three epochs of 5 per rank
    for e in range(3):
        parts = [set(st[5 * e : 5 * (e + 1)]) for st in streams]
        assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == set(range(10))
    assert streams[0][:5] != streams[0][5:10]  # a new permutation every epoch
    assert take(EndlessSampler(10, seed=4), 10) != take(EndlessSampler(10, seed=3), 10)
    with pytest.raises(ValueError, match="fewer than the 3 processes"):
        EndlessSampler(2, seed=0, world_size=3)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_saved_position_resumes_with_the_batch_after_the_last_trained_one(workers):
    """Lightning fetches one batch ahead: the checkpoint must point at the batch after the one trained, not after
    the one fetched. Oracle: the uninterrupted stream of the same data module."""
    from types import SimpleNamespace

    data = torch.arange(23 * 3).view(23, 3)

    def module(consumed=0):
        dm = ChunkDataModule(data, data, batch_size=4, eval_batch_size=4, seed=0, num_workers=workers)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, lightning_module=SimpleNamespace(batches_seen=0))
        return dm

    full = [b.clone() for b in islice(iter(module().train_dataloader()), 14)]  # crosses two epochs of 5 batches
    for trained in (0, 3, 7):
        dm = module()
        fetched = list(islice(iter(dm.train_dataloader()), trained + 1))  # one more than trained
        assert all(torch.equal(a, b) for a, b in zip(fetched, full, strict=False))
        dm.trainer.lightning_module.batches_seen = trained
        state = dm.state_dict()
        resumed = module()
        resumed.load_state_dict(state)
        got = list(islice(iter(resumed.train_dataloader()), 14 - trained))
        assert all(torch.equal(a, b) for a, b in zip(got, full[trained:], strict=True)), trained


def test_datamodule_validation_shards_are_equal_and_disjoint():
    valid = torch.arange(7 * 4).view(7, 4)
    dm = ChunkDataModule(valid, valid, batch_size=2, eval_batch_size=2, seed=0)
    shards = [dm.valid_shard(r, 3) for r in range(3)]
    assert all(len(s) == 2 for s in shards)
    rows = [int(s[i][0]) for s in shards for i in range(len(s))]
    assert len(set(rows)) == 6
    with pytest.raises(ValueError, match="fewer than"):
        dm.valid_shard(0, 8)


# ------------------------------------------------------------------------------------------ checkpoints


def test_atomic_checkpoint_io_leaves_no_partial_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["a"].sum() == 3
    with pytest.raises(Exception):  # noqa: B017 - any pickling failure
        io.save_checkpoint({"a": torch.zeros(3), "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True)["a"].sum() == 3  # the old file is intact
    assert sorted(os.listdir(path.parent)) == ["last.ckpt"]  # no temporary left behind


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".last.ckpt.abc.tmp").write_bytes(b"partial")
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"complete")
    (tmp_path / ".hf.xyz").mkdir()
    (tmp_path / "hf").mkdir()
    removed = clean_stale_temporaries(tmp_path)
    assert len(removed) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "hf"]


def test_inspect_checkpoint_rejects_garbage_in_one_line(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="corrupt") as e:
        inspect_checkpoint(bad)
    assert "\n" not in str(e.value)
    torch.save({"x": 1}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a bd3lm"):
        inspect_checkpoint(tmp_path / "other.ckpt")


def test_load_init_weights_is_strict_except_for_the_interval(tmp_path):
    src = tiny_model(seed=1, block_size=16, var_min=False)  # an MDLM-style pretrain without interval buffers
    src.save_pretrained(tmp_path / "src")
    dst = tiny_model(seed=2, block_size=4)
    dst.sampling_eps_min.fill_(0.3)
    info = load_init_weights(dst, tmp_path / "src")
    assert info["source_block_size"] == 16
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    assert float(dst.sampling_eps_min) == pytest.approx(0.3)  # interval kept, not overwritten
    with pytest.raises(ValueError, match="shape mismatch") as e:
        load_init_weights(tiny_model(hidden_dim=64), tmp_path / "src")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_init_weights(tiny_model(n_blocks=1), tmp_path / "src")
    with pytest.raises(ValueError, match="missing keys"):
        load_init_weights(tiny_model(n_blocks=3), tmp_path / "src")
    with pytest.raises(FileNotFoundError):
        load_init_weights(dst, tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors"):
        load_init_weights(dst, tmp_path / "weights.bin")


def test_export_writes_ema_weights_and_interval(tmp_path):
    model = tiny_model(block_size=4)
    lit = BD3LMLit(model, TrainSettings(ema_decay=0.5))
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    lit.ema.update(model)
    lit.set_interval(0.3, 0.8)
    out = export_hf(model, tmp_path / "hf", ema=lit.ema, info={"step": 1})
    assert (out / "training_info.json").is_file()
    loaded = bd3lm.BD3LM.from_pretrained(out)
    assert float(loaded.sampling_eps_min) == pytest.approx(0.3) and loaded.config.sampling_eps_max == 0.8
    name = "backbone.vocab_embed.embedding"
    assert torch.allclose(loaded.state_dict()[name], lit.ema.shadow[name])
    assert not torch.allclose(
        loaded.state_dict()[name], model.state_dict()[name]
    )  # live weights not exported
    assert not torch.allclose(lit.ema.shadow[name], live[name])
    export_hf(model, tmp_path / "hf", info={"step": 2})  # replacing an export is atomic and leaves no debris
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ------------------------------------------------------------------------------------------ validation


def test_fit_updates_ema_switches_interval_and_checkpoints_state(tmp_path):
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=33,
        model_length=16,
        block_size=4,
        hidden_dim=32,
        cond_dim=16,
        n_blocks=2,
        n_heads=4,
        dropout=0.1,
        sampling_eps_min=1e-3,
        sampling_eps_max=1.0,
    )
    model = bd3lm.BD3LM(bd3lm.BD3LMConfig(**cfg))
    data = torch.randint(0, 32, (64, 16), generator=torch.Generator().manual_seed(1))
    adamw = partial(torch.optim.AdamW, lr=1e-2)
    lit = BD3LMLit(model, TrainSettings(optimizer=adamw, warmup_steps=1, search_batches=1, log_dir=str(tmp_path)))
    dm = ChunkDataModule(data, data[:8], batch_size=4, eval_batch_size=4, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(lit, datamodule=dm)
    assert lit.batches_seen == 4 and lit.ema.num_updates == 4 and lit.val_rounds == 2
    assert not lit.ema.is_swapped
    assert lit.interval() != (1e-3, 1.0)  # the search picked a clipped interval (and logged it)
    assert (tmp_path / "clip_search.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "ranks" / "rank0.json").is_file()
    name = "backbone.vocab_embed.embedding"
    assert not torch.equal(lit.ema.shadow[name], model.state_dict()[name])
    ckpt_path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = inspect_checkpoint(ckpt_path)  # weights_only-loadable
    state = ckpt["bd3lm"]
    assert state["batches_seen"] == 4 and state["ema"]["num_updates"] == 4
    assert len(state["noise_gen"]) == 1 and state["interval"] == list(lit.interval())
    assert float(ckpt["state_dict"]["model.sampling_eps_min"]) == pytest.approx(lit.interval()[0])
    # a .ckpt warm start takes the EMA weights
    fresh = bd3lm.BD3LM(bd3lm.BD3LMConfig(**cfg))
    load_init_weights(fresh, ckpt_path)
    assert torch.allclose(fresh.state_dict()[name], lit.ema.shadow[name])


# ------------------------------------------------------------------------------------------ reporting


def test_read_metrics_keeps_the_last_value_of_repeated_steps_and_plots(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train/loss,val/ppl\n0,0,5.0,\n0,1,4.0,\n0,1,,50\n0,1,3.5,\n0,2,3.0,\n")
    m = read_metrics(csv_path)
    assert m["train/loss"] == [(0, 5.0), (1, 3.5), (2, 3.0)] and m["val/ppl"] == [(1, 50.0)]
    png = plot_metrics(csv_path, tmp_path / "curves.png")
    assert png is not None and png.stat().st_size > 1000
    assert read_metrics(tmp_path / "missing.csv") == {}


def test_read_metrics_merges_the_csv_logger_versions_of_a_resumed_run(tmp_path):
    """One ``version_N`` per session, merged in numeric version order (10 after 9): a resumed session repeats the
    steps after its checkpoint and wins; what an earlier session logged from the resume step on is dropped."""
    sessions = {
        0: "epoch,step,train/loss,val/ppl\n0,0,5.0,\n0,1,4.0,\n0,1,,50\n0,1,3.5,\n0,2,3.0,\n0,2,,40\n",
        9: "epoch,step,train/loss\n0,2,2.5\n0,3,2.2\n",  # resumed at step 2 (its validation at 2 never ran)
        10: "epoch,step,train/loss,val/ppl\n0,3,2.0,\n0,4,1.5,\n0,4,,30\n",  # resumed at step 3
    }
    root = tmp_path / "csv"
    for version, text in sessions.items():
        (root / f"version_{version}").mkdir(parents=True)
        (root / f"version_{version}" / "metrics.csv").write_text(text)
    (root / "version_11").mkdir()  # a session that logged nothing
    m = read_metrics(root)
    assert m["train/loss"] == [(0, 5.0), (1, 3.5), (2, 2.5), (3, 2.0), (4, 1.5)]
    assert m["val/ppl"] == [(1, 50.0), (4, 30.0)]
    png = plot_metrics(root, tmp_path / "curves.png")
    assert png is not None and png.stat().st_size > 1000
    assert read_metrics(tmp_path / "empty") == {}


class _SleepyModule(L.LightningModule):
    """Training steps sleep ``train_s``; the warm-start-like ``on_train_start``, each validation batch and the
    validation epoch end (where the clip search runs) sleep too. ``train_time`` is the oracle: the wall time spent
    inside the training batches (from the module's batch-start to its batch-end hook)."""

    def __init__(self, train_s: float, outside_s: float) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)
        self.train_s, self.outside_s, self.train_time, self.outside_time = train_s, outside_s, 0.0, 0.0
        self.last_val: dict = {}  # (read by LineProgress)

    def _sleep_outside(self) -> None:
        time.sleep(self.outside_s)
        self.outside_time += self.outside_s

    def on_train_start(self) -> None:
        self._sleep_outside()

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def training_step(self, batch, batch_idx):
        time.sleep(self.train_s)
        return self.lin(batch.float()).pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.train_time += time.perf_counter() - self._t0

    def validation_step(self, batch, batch_idx) -> None:
        self._sleep_outside()

    def on_validation_epoch_end(self) -> None:
        self._sleep_outside()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_token_throughput_counts_every_token_and_only_training_time(tmp_path, capsys):
    """Oracle: steps x accumulation x batch x length tokens, over the wall time the module itself spent in its
    training batches. The 1.5 s slept outside them (against 0.8 s of training) must not count: the stock
    ThroughputMonitor would count 0.9 s of it (on_train_start and the validation epoch ends) and fail here."""
    from lightning.pytorch.loggers import CSVLogger

    from bd3lm.training.callbacks import LineProgress, TokenThroughput, session_tokens_per_second

    steps, accum, batch, length = 4, 2, 3, 8
    rows = torch.randint(0, 5, (10 * batch, length), generator=torch.Generator().manual_seed(0))
    module = _SleepyModule(train_s=0.1, outside_s=0.3)
    monitor = TokenThroughput(window=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        accumulate_grad_batches=accum,
        val_check_interval=2 * accum,  # validations after steps 2 and 4
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=[monitor, LineProgress(every=1)],
        logger=CSVLogger(tmp_path, name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    assert session_tokens_per_second(trainer) is None  # before any step
    loader = torch.utils.data.DataLoader(rows, batch_size=batch)
    trainer.fit(module, loader, torch.utils.data.DataLoader(rows[:batch], batch_size=batch))
    assert module.outside_time == pytest.approx(5 * 0.3)  # on_train_start + 2 x (1 batch + epoch end)

    tokens = steps * accum * batch * length
    logged = trainer.logged_metrics
    assert logged["train/lengths"] == tokens and logged["train/samples"] == steps * accum * batch
    oracle = tokens / module.train_time
    tps = session_tokens_per_second(trainer)
    assert 0.7 * oracle <= tps <= 1.05 * oracle, (tps, oracle)
    assert tokens / logged["train/time"] == pytest.approx(tps)  # the last step was logged: the same clock
    per_batch = batch * length / module.train_s  # a micro-batch takes at least its sleep
    shown = float(logged["train/device/items_per_sec"])  # the rolling rate (the last 4 micro-batches)
    assert 0.4 * per_batch <= shown <= per_batch
    last_line = capsys.readouterr().out.splitlines()[-1]  # LineProgress shows the monitor's figure
    assert last_line.startswith(f"step {steps}/{steps} | ") and f" | {shown:.0f} tok/s | " in last_line
    m = read_metrics(tmp_path / "csv")  # version_0 of the stock CSVLogger
    assert m["train/lengths"][-1] == (steps - 1, tokens)
    assert not [k for k in m if k.startswith("validate/")]  # no rows keyed by validation batch


def test_a_checkpoint_without_a_data_position_is_refused():
    """A run saved before the token-shard pipeline has no loader state: resuming would restart its data (and use
    another validation rule), so it is refused rather than trained on silently."""
    from bd3lm.faults import Refused

    lit = BD3LMLit(tiny_model(), TrainSettings(ema_decay=None))
    state = {"batches_seen": 5, "val_rounds": 0, "noise_gen": [], "torch_rng": [], "rng": None}
    with pytest.raises(Refused, match="no data position") as info:
        lit.on_load_checkpoint({"bd3lm": state})
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    lit.on_load_checkpoint({"bd3lm": state, "ChunkDataModule": {"consumed": 5, "loader": {}}})
    assert lit.batches_seen == 5


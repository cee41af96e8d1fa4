"""Unit tests of the Lightning layer: sampler, atomic checkpoints, warm starts, export, validation."""

import os
from itertools import islice

import lightning as L
import pytest
import torch
from conftest import tiny_model

import bd3lm
from bd3lm.lit import BD3LMLit, TrainSettings
from bd3lm.lit_callbacks import plot_metrics, read_metrics
from bd3lm.lit_checkpoint import (
    AtomicCheckpointIO,
    clean_stale_temporaries,
    export_hf,
    inspect_checkpoint,
    load_init_weights,
)
from bd3lm.lit_data import ChunkDataModule, ResumableSampler

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning 2.6 with torch 2.13


def take(sampler, n):
    return list(islice(iter(sampler), n))


# ------------------------------------------------------------------------------------------ sampler


def test_sampler_epochs_are_permutations_and_resume_continues_the_stream():
    s = ResumableSampler(10, 4, seed=3)
    stream = take(s, 40)  # four epochs of 10
    for e in range(4):
        assert sorted(stream[10 * e : 10 * (e + 1)]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation every epoch
    resumed = ResumableSampler(10, 4, seed=3, start_batch=3)
    assert take(resumed, 28) == stream[12:40]
    assert take(ResumableSampler(10, 4, seed=4), 10) != stream[:10]


def test_sampler_shards_global_batches_across_ranks():
    world = [ResumableSampler(12, 2, seed=0, rank=r, world_size=3) for r in range(3)]
    single = take(ResumableSampler(12, 6, seed=0), 24)
    per_rank = [take(s, 8) for s in world]
    for j in range(4):  # global batch j = rank 0's 2, rank 1's 2, rank 2's 2
        got = [i for r in range(3) for i in per_rank[r][2 * j : 2 * j + 2]]
        assert got == single[6 * j : 6 * j + 6]
    with pytest.raises(ValueError):
        ResumableSampler(0, 2, seed=0)


def test_datamodule_validation_shards_are_equal_and_disjoint():
    valid = torch.arange(7 * 4).view(7, 4)
    dm = ChunkDataModule(valid, valid, batch_size=2, eval_batch_size=2, seed=0)
    shards = [dm.valid_shard(r, 3) for r in range(3)]
    assert all(len(s) == 2 for s in shards)
    rows = torch.cat(shards)[:, 0].tolist()
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
    lit = BD3LMLit(model, TrainSettings(warmup_steps=1, lr=1e-2, search_batches=1, log_dir=str(tmp_path)))
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

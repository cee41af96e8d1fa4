"""End-to-end tests of ``train.py``: smoke run + export, exact resume after SIGKILL, DDP on CPU, fine-tuning
from a block-size-L pretrain, and one-line errors for bad input.

Every run writes into a temporary run_dir and uses a shared temporary data cache; subprocesses run from an
empty temporary working directory, which must stay empty.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bd3lm
from bd3lm.training.callbacks import read_metrics

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "train.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("BD3LM_DEBUG", None)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bd3lm-cache")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """An empty working directory for the subprocesses (nothing may be written into the CWD)."""
    return tmp_path_factory.mktemp("cwd")


def train_cmd(run_dir: Path, cache_dir: Path, *overrides: str, experiment: str = "smoke") -> list[str]:
    return [
        sys.executable,
        TRAIN,
        f"experiment={experiment}",
        f"run_dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        *overrides,
    ]


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def run_in_process(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``train.main`` on the arguments of ``cmd`` in this process, from ``cwd`` with :data:`ENV`: what the
    command runs, without the seconds a new interpreter spends importing torch and Lightning. For the tests that
    need no real process (signals, DDP ranks and the exit status of the command line keep :func:`run`)."""
    import contextlib
    import io

    import train

    assert cmd[:2] == [sys.executable, TRAIN], cmd
    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(ENV)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train.main(cmd[2:])
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.ckpt")) + sorted(run_dir.rglob("*.tmp"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir, workdir):
    """The smoke experiment for 30 steps (validation every 10), also the resume test's reference run."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    proc = ok(run(train_cmd(run_dir, cache_dir, "trainer.max_steps=30"), workdir))
    return run_dir, proc


# ------------------------------------------------------------------------------------------ smoke + export


@pytest.mark.slow
def test_smoke_trains_validates_checkpoints_and_exports(smoke_run, workdir):
    run_dir, proc = smoke_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1
    hf = run_dir / "hf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (hf / name).is_file(), name
    model = bd3lm.BD3LM.from_pretrained(hf)  # strict: every key present
    assert model.config.block_size == 4 and model.config.model_length == 64
    lo, hi = float(model.sampling_eps_min), float(model.sampling_eps_max)
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["sampling_eps_min"], cfg["sampling_eps_max"]) == pytest.approx((lo, hi), abs=1e-6)
    searches = [json.loads(line) for line in (run_dir / "clip_search.jsonl").read_text().splitlines()]
    assert len(searches) == 3 and tuple(searches[-1]["best"]) == pytest.approx((lo, hi), abs=1e-6)
    assert len(searches[0]["table"]) == 36  # the official grid
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    assert len(tok) == model.config.vocab_size and tok.mask_token_id == model.config.mask_index
    metrics = read_metrics(run_dir / "csv")
    assert len(metrics["train/loss"]) == 30 and len(metrics["val/nll"]) == 3
    assert all(math.isfinite(v) for _, v in metrics["val/ppl"])
    assert (run_dir / "training_curves.png").stat().st_size > 1000
    assert any((run_dir / "tb").iterdir())
    info = json.loads((hf / "training_info.json").read_text())
    assert info["step"] == 30 and info["val_nll"] == pytest.approx(metrics["val/nll"][-1][1], rel=1e-6)
    assert "Final validation NELBO" in proc.stdout and str(hf) in proc.stdout
    assert list(workdir.iterdir()) == []  # nothing in the CWD (no Hydra outputs/)


@pytest.mark.slow
def test_generate_cli_runs_on_the_export(smoke_run, workdir, tmp_path):
    if not (REPO / "generate.py").is_file():
        pytest.skip("generate.py does not exist yet")
    run_dir, _ = smoke_run
    out = tmp_path / "samples.jsonl"
    ok(
        run(
            [
                sys.executable,
                str(REPO / "generate.py"),
                f"checkpoint={run_dir / 'hf'}",
                "max_new_tokens=16",
                "seed=0",
                "stop_at_eos=false",
                f"output={out}",
            ],
            workdir,
        )
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 1 and len(records[0]["token_ids"]) == 16


@pytest.mark.slow
def test_export_mode_rewrites_hf_from_last_checkpoint(smoke_run, workdir, cache_dir):
    run_dir, _ = smoke_run
    before = bd3lm.BD3LM.from_pretrained(run_dir / "hf").state_dict()
    ok(run_in_process(train_cmd(run_dir, cache_dir, "trainer.max_steps=30", "mode=export"), workdir))
    after = bd3lm.BD3LM.from_pretrained(run_dir / "hf").state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_exact_trajectory(smoke_run, tmp_path, cache_dir, workdir):
    reference, _ = smoke_run
    run_dir = tmp_path / "run"
    cmd = train_cmd(run_dir, cache_dir, "trainer.max_steps=20")
    proc = subprocess.Popen(cmd, cwd=workdir, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.is_file(), "the first checkpoint never appeared"
    assert not list(run_dir.rglob("*.tmp"))
    resumed = ok(run(train_cmd(run_dir, cache_dir, "trainer.max_steps=30"), workdir))
    assert "resuming from" in resumed.stdout
    step = int(resumed.stdout.split("resuming from")[1].split("(step ")[1].split(")")[0])
    assert 10 <= step < 30
    ref = read_metrics(reference / "csv")
    got = read_metrics(run_dir / "csv")
    ref_loss, got_loss = dict(ref["train/loss"]), dict(got["train/loss"])
    assert set(got_loss) == set(
        range(30)
    )  # metrics of the killed session are kept (flushed at its checkpoint)
    after = [s for s in ref_loss if s >= step]  # logged step s is optimiser step s + 1
    assert len(after) == 30 - step
    for s in after:
        assert got_loss[s] == pytest.approx(ref_loss[s], abs=1e-6), f"step {s + 1}"
    assert dict(got["val/nll"])[29] == pytest.approx(dict(ref["val/nll"])[29], abs=1e-6)
    a = bd3lm.BD3LM.from_pretrained(reference / "hf").state_dict()
    b = bd3lm.BD3LM.from_pretrained(run_dir / "hf").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


# ------------------------------------------------------------------------------------------ DDP


@pytest.mark.slow
def test_ddp_on_cpu_two_ranks_draw_different_noise(tmp_path, cache_dir, workdir):
    run_dir = tmp_path / "ddp"
    proc = ok(
        run(
            train_cmd(
                run_dir,
                cache_dir,
                "strategy=ddp",
                "trainer.devices=2",
                "trainer.accelerator=cpu",
                "trainer.max_steps=10",
            ),
            workdir,
        )
    )
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["noise_first_draw_sha256"] != ranks[1]["noise_first_draw_sha256"]
    model = bd3lm.BD3LM.from_pretrained(run_dir / "hf")
    assert model.config.block_size == 4
    assert (
        "20,480 tokens" not in proc.stdout and "10,240 tokens" in proc.stdout
    )  # 10 steps x 2 ranks x 8 x 64
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    states = ckpt["bd3lm"]["noise_gen"]
    assert len(states) == 2 and not torch.equal(states[0], states[1])  # every rank's stream is checkpointed


# ------------------------------------------------------------------------------------------ fine-tuning


@pytest.mark.slow
def test_finetune_from_a_block_size_l_pretrain(tmp_path, cache_dir, workdir):
    pre = tmp_path / "mdlm"
    ok(run_in_process(train_cmd(pre, cache_dir, "algo=mdlm", "trainer.max_steps=10"), workdir))
    assert json.loads((pre / "hf" / "config.json").read_text())["block_size"] == 64
    pre_val = read_metrics(pre / "csv")["val/nll"][-1][1]

    ft = tmp_path / "bd3lm"
    proc = ok(
        run_in_process(
            train_cmd(ft, cache_dir, f"init_from={pre / 'hf'}", "algo.block_size=4", "trainer.max_steps=10"),
            workdir,
        )
    )
    assert "warm start" in proc.stdout
    metrics = read_metrics(ft / "csv")
    # the warm start evaluated at the pretrain's block size reproduces the pretrain's final validation NELBO
    assert metrics["init/val_nll_source"][0][1] == pytest.approx(pre_val, rel=1e-6)
    assert metrics["init/val_nll"][0][1] != pytest.approx(pre_val, rel=1e-6)  # at L' = 4 it differs
    lrs = [v for _, v in metrics["train/lr"]]  # a fresh optimiser: the warm-up (5 steps) restarts from 0
    assert lrs[0] == 0.0 and lrs[4] < lrs[5] == pytest.approx(3e-4)
    model = bd3lm.BD3LM.from_pretrained(ft / "hf")
    assert model.config.block_size == 4 and len(metrics["train/loss"]) == 10

    bad = tmp_path / "wrong"
    proc = run_in_process(train_cmd(bad, cache_dir, f"init_from={pre / 'hf'}", "model.hidden_dim=32"), workdir)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "shape mismatch" in lines[0]
    assert checkpoints(bad) == []


def owt_sample(directory: Path, docs: int = 14, words: int = 900) -> Path:
    """An OpenWebText-format sample: jsonl files of ``{"text": ...}`` records (passages of the embedded plays)."""
    from bd3lm.data import DEFAULT_CORPUS, read_documents

    plays = read_documents(DEFAULT_CORPUS)
    directory.mkdir(parents=True)
    for part in range(2):
        with open(directory / f"urlsf_subset0{part}.jsonl", "w") as f:
            for i in range(part * docs // 2, (part + 1) * docs // 2):
                f.write(json.dumps({"text": " ".join(plays[i].split()[:words])}) + "\n")
    return directory


OWT_SMALL_ON_CPU = [  # the recipe's data, tokenizer, L = 1024 and optimiser; a narrow network on one CPU process
    "experiment=owt_small", "model.hidden_dim=32", "model.cond_dim=16", "model.n_blocks=1", "model.n_heads=2",
    "trainer.accelerator=cpu", "trainer.devices=1", "strategy=auto", "trainer.precision=32-true",
    "data.batch_size=1", "data.eval_batch_size=1", "trainer.accumulate_grad_batches=1", "data.num_workers=0",
    "data.num_proc=1", "data.valid_docs=2", "trainer.val_every=2", "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0", "trainer.log_every=1",
]


@pytest.mark.slow
def test_owt_small_recipe_runs_end_to_end_on_a_local_sample(tmp_path, workdir):
    """The README's OpenWebText commands on a local OWT-format sample: prepare, MDLM pretrain, BD3-LM fine-tune."""
    data = [f"data.path={owt_sample(tmp_path / 'owt')}", f"data.cache_dir={tmp_path / 'cache'}"]
    pre, ft = tmp_path / "owt_mdlm", tmp_path / "owt_bd3lm_16"
    proc = ok(run_in_process([sys.executable, TRAIN, *OWT_SMALL_ON_CPU, *data, f"run_dir={pre}", "mode=prepare"],
                             workdir))
    assert "validation chunks of 1024 tokens" in proc.stdout
    (index,) = (tmp_path / "cache").glob("owt-L1024-*/index.json")
    meta = json.loads(index.read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50258 and meta["splits"]["valid"]["documents"] == 2
    ok(run_in_process([sys.executable, TRAIN, *OWT_SMALL_ON_CPU, *data, "algo=mdlm", f"run_dir={pre}",
                       "trainer.max_steps=2"], workdir))
    proc = ok(run_in_process([sys.executable, TRAIN, *OWT_SMALL_ON_CPU, *data, f"run_dir={ft}",
                              f"init_from={pre / 'hf'}", "algo.block_size=16", "algo.search_every=0",
                              "trainer.max_steps=2"], workdir))
    assert "warm start" in proc.stdout
    stored = (ft / "config.yaml").read_text()
    for line in ("lr: 0.0003", "warmup_steps: 2500", "decay: 0.9999", "tokenizer: gpt2", "valid_docs: 2"):
        assert line in stored, line
    model = bd3lm.BD3LM.from_pretrained(ft / "hf")
    assert (model.config.model_length, model.config.block_size, model.config.vocab_size) == (1024, 16, 50258)
    assert bd3lm.BD3LM.from_pretrained(pre / "hf").config.block_size == 1024
    assert len(read_metrics(ft / "csv")["train/loss"]) == 2


def test_ignore_bos_training_is_evaluated_the_same_way(tmp_path, cache_dir, workdir):
    from omegaconf import OmegaConf

    from bd3lm.evaluation import likelihood, load_checkpoint, validation_chunks

    run_dir = tmp_path / "ignore_bos"
    ok(run_in_process(train_cmd(run_dir, cache_dir, "algo.ignore_bos=true", "trainer.max_steps=4",
                                "trainer.val_every=2", "algo.search_every=0"), workdir))
    model, tok = load_checkpoint(run_dir / "hf")
    assert model.config.ignore_bos is True
    valid = validation_chunks(OmegaConf.load(run_dir / "config.yaml"), tok)
    res = likelihood(model, valid, max_sequences=8, num_samples=1)
    assert res.ignore_first and res.tokens_per_sequence == 63
    assert likelihood(model, valid, max_sequences=8, protocol="official").ignore_first


# ------------------------------------------------------------------------------------------ bad input


def _main(argv: list[str], capsys) -> tuple[int, list[str]]:
    sys.path.insert(0, str(REPO))
    try:
        import train
    finally:
        sys.path.remove(str(REPO))
    rc = train.main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


BAD_CASES = {
    "missing data file": lambda d: ["experiment=smoke", f"data.path={d / 'missing.txt'}"],
    "empty corpus": lambda d: ["experiment=smoke", f"data.path={d / 'empty.txt'}"],
    "corpus smaller than one chunk": lambda d: ["experiment=smoke", f"data.path={d / 'tiny.txt'}"],
    "unknown experiment": lambda d: ["experiment=no_such_experiment"],
    "unknown config key": lambda d: ["experiment=smoke", "no_such_key=1"],
    "length not a multiple of block size": lambda d: ["experiment=smoke", "model.length=66"],
    "unwritable run dir": lambda d: ["experiment=smoke", f"run_dir={d / 'a_file' / 'run'}"],
    "corrupt checkpoint": lambda d: ["experiment=smoke", f"run_dir={d / 'corrupt'}"],
    "unknown graph": lambda d: ["experiment=smoke", "algo=sedd", "algo.graph=ring"],
    "graph/loss pair that does not exist": lambda d: ["experiment=smoke", "algo.graph=uniform"],
    "roulette p_m outside [0, 1]": lambda d: ["experiment=smoke", "algo=cedd", "algo.graph=roulette", "algo.p_m=1.5"],
    "learning rate that is not a number": lambda d: ["experiment=smoke", "optim.lr=abc"],
    "clip widths that are not a list": lambda d: ["experiment=smoke", "algo.clip_widths=0.5"],
}
EXPECTED = {
    "missing data file": "not found",
    "empty corpus": "empty",
    "corpus smaller than one chunk": "too small",
    "unknown experiment": "no_such_experiment",
    "unknown config key": "no_such_key",
    "length not a multiple of block size": "multiple",
    "unwritable run dir": "not writable",
    "corrupt checkpoint": "corrupt",
    "unknown graph": "unknown graph 'ring'",
    "graph/loss pair that does not exist": "absorbing graph only",
    "roulette p_m outside [0, 1]": "p_m must be a number in",
    "learning rate that is not a number": "optim.lr must be a number; got 'abc'",
    "clip widths that are not a list": "algo.clip_widths must be a list of numbers; got 0.5",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_and_leaves_no_checkpoint(case, tmp_path, cache_dir, capsys):
    (tmp_path / "empty.txt").write_text("   \n\n")
    (tmp_path / "tiny.txt").write_text("To be, or not to be, that is the question.\n")
    (tmp_path / "a_file").write_text("x")
    corrupt = tmp_path / "corrupt" / "checkpoints"
    corrupt.mkdir(parents=True)
    (corrupt / "last.ckpt").write_bytes(os.urandom(2048))
    run_dir = tmp_path / "run"
    argv = [f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", *BAD_CASES[case](tmp_path)]
    rc, lines = _main(argv, capsys)
    assert rc == 1
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert EXPECTED[case] in lines[0]
    assert checkpoints(run_dir) == []
    assert [p.name for p in checkpoints(tmp_path / "corrupt")] == ["last.ckpt"]  # untouched, nothing added
    if run_dir.exists():
        assert not (run_dir / "tokenizer").exists()  # a failed first run leaves nothing to be reused


@pytest.mark.slow
def test_bad_input_exit_status_from_the_command_line(tmp_path, cache_dir, workdir):
    proc = run(train_cmd(tmp_path / "run", cache_dir, "model.length=66"), workdir)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: model.length 66 is not a multiple of algo.block_size 4"
    assert not (tmp_path / "run").exists() or checkpoints(tmp_path / "run") == []
    debug = subprocess.run(
        train_cmd(tmp_path / "run", cache_dir, "model.length=66"),
        cwd=workdir,
        env={**ENV, "BD3LM_DEBUG": "1"},
        capture_output=True,
        text=True,
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr

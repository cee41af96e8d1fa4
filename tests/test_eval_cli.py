"""The evaluation CLIs end to end on tiny checkpoints (python -m eval.ppl / genppl / long_docs / lengths), their
one-line errors, and the sweep's planning, resume and reporting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize
from omegaconf import OmegaConf
from test_judge import ar_judge_dir  # noqa: F401 - fixture
from test_sampling_cli import SENTENCES, tiny_tokenizer

import bd3lm

ROOT = Path(__file__).resolve().parents[1]


def save_tiny_checkpoint(path, model_length: int = 32, n_blocks: int = 2):
    """A random-weight BD3-LM (L' = 4) with the tiny tokenizer, saved as a checkpoint directory at ``path``."""
    tok = tiny_tokenizer()
    tok.save_pretrained(path)
    cfg = bd3lm.BD3LMConfig(vocab_size=len(tok), model_length=model_length, block_size=4, hidden_dim=32,
                            cond_dim=16, n_blocks=n_blocks, n_heads=4, dropout=0.0)
    torch.manual_seed(0)
    randomize(bd3lm.BD3LM(cfg), 0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("bd3"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(SENTENCES[i % 4] for i in range(k, k + 5))}) + "\n"
                            for k in range(12)))
    return path


def run(module, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", f"eval.{module}", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_ppl_cli_zero_shot_and_official_protocol(ckpt, corpus, tmp_path):
    out = tmp_path / "ppl.json"
    proc = run("ppl", f"checkpoint={ckpt}", f"dataset={corpus}", "protocol=official", "num_samples=2",
               f"output={out}")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["protocol"] == "official" and res["t_range"] == [0.001, 1.0] and res["ignore_first"] is True
    assert res["tokens_per_sequence"] == 31 and res["num_samples"] == 2 and res["n_sequences"] >= 2
    assert res["ppl_ci95"][0] <= res["ppl"] <= res["ppl_ci95"][1]
    assert "PPL ≤" in proc.stdout


def test_ppl_cli_errors(ckpt, corpus, tmp_path):
    assert "num_samples must be an integer >= 1; got 0" in one_error_line(
        run("ppl", f"checkpoint={ckpt}", f"dataset={corpus}", "num_samples=0"))
    small = tmp_path / "small.txt"
    small.write_text("hello world\n")
    line = one_error_line(run("ppl", f"checkpoint={ckpt}", f"dataset={small}"))
    assert "corpus too small to pack" in line and "model_length=32" in line and str(small) in line
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((Path(ckpt) / f).read_bytes())
    assert "has no tokenizer" in one_error_line(run("ppl", f"checkpoint={bare}", f"dataset={corpus}"))
    assert "give dataset=FILE" in one_error_line(run("ppl", f"checkpoint={ckpt}"))


def test_genppl_cli_with_an_ar_judge(ckpt, ar_judge_dir, tmp_path):  # noqa: F811
    out = tmp_path / "gen.json"
    proc = run("genppl", f"checkpoint={ckpt}", f"judge={ar_judge_dir}", "num_samples=3", "batch_size=2",
               "max_new_tokens=8", "top_p=0.9", "top_p_rule=official", f"output={out}")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert len(res["samples"]) == 3 and res["gen_ppl"] > 1 and res["settings"]["top_p_rule"] == "official"
    assert "gen-PPL" in proc.stdout


def test_genppl_cli_errors(ckpt, tmp_path):
    line = one_error_line(run("genppl", f"checkpoint={ckpt}", f"judge={tmp_path / 'none.gguf'}"))
    assert "none.gguf' does not exist" in line
    assert "cannot be loaded offline" in one_error_line(run("genppl", f"checkpoint={ckpt}", "judge=gpt2-large"))
    assert "num_samples must be an integer >= 1; got 0" in one_error_line(
        run("genppl", f"checkpoint={ckpt}", "num_samples=0"))


def test_long_docs_and_lengths_clis(ckpt, ar_judge_dir, tmp_path):  # noqa: F811
    proc = run("long_docs", f"checkpoint={ckpt}", f"judge={ar_judge_dir}", "factors=[1,3]", "num_samples=2",
               f"output={tmp_path / 'long'}")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "long.json").read_text())["rows"]
    assert [(r["factor"], r["mode"]) for r in rows] == [(1, "exact"), (1, "streaming"), (3, "exact"),
                                                        (3, "streaming")]
    assert all(r["tokens_per_s"] > 0 and r["gen_ppl_last"] > 1 for r in rows)
    assert rows[0]["gen_ppl_last"] == rows[1]["gen_ppl_last"]  # inside the first window the modes are identical
    proc = run("lengths", f"checkpoint={ckpt}", "num_samples=5", "max_factor=2", f"output={tmp_path / 'len'}")
    assert proc.returncode == 0, proc.stderr
    st = json.loads((tmp_path / "len.json").read_text())
    assert len(st["lengths"]) == 5 and max(st["lengths"]) <= 64 and sum(st["stop_reasons"].values()) == 5
    assert "max_factor must be an integer >= 1; got 0" in one_error_line(
        run("lengths", f"checkpoint={ckpt}", "max_factor=0"))


def sweep_cfg(tmp_path, **kw):
    cfg = OmegaConf.load(ROOT / "configs" / "eval" / "sweep.yaml")
    cfg.pop("defaults")
    cfg.pop("hydra")
    cfg.out_dir = str(tmp_path / "runs")
    cfg.results_dir = str(tmp_path / "results")
    cfg.budget = 4096
    for k, v in kw.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def test_sweep_plan_and_resume(tmp_path, monkeypatch):
    from eval import sweep

    cfg = sweep_cfg(tmp_path)
    models = sweep.plan(cfg)
    assert [(m.algo, m.block_size, m.init) for m in models] == [
        ("ar", 1, "scratch"), ("bd3lm", 4, "scratch"), ("bd3lm", 8, "scratch"), ("bd3lm", 16, "scratch"),
        ("mdlm", 128, "scratch"), ("bd3lm", 4, "mdlm")]
    ft = sweep.overrides_of(cfg, models[-1], Path(cfg.out_dir))
    assert "trainer.max_steps=1" in ft and f"init_from={Path(cfg.out_dir) / 'mdlm' / 'hf'}" in ft
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        run_dir = Path(next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1])
        (run_dir / "hf").mkdir(parents=True, exist_ok=True)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    sweep.sweep(sweep_cfg(tmp_path, stage="train"))
    assert len(calls) == 6
    sweep.sweep(sweep_cfg(tmp_path, stage="train"))
    assert len(calls) == 6  # finished models are kept, not retrained
    (Path(cfg.out_dir) / "bd3lm_4_ft" / "stale").touch()
    sweep.sweep(sweep_cfg(tmp_path, stage="train", budget=8192))
    assert len(calls) == 12  # a new budget resumes them; the fine-tune's parent changed, so it is retrained
    assert not (Path(cfg.out_dir) / "bd3lm_4_ft" / "stale").exists()
    (Path(cfg.out_dir) / "ar" / "stale").touch()
    sweep.sweep(sweep_cfg(tmp_path, stage="train", budget=8192, seed=5))  # another seed: every run afresh
    assert len(calls) == 18 and not (Path(cfg.out_dir) / "ar" / "stale").exists()
    (Path(cfg.out_dir) / "ar" / "stale").touch()
    sweep.sweep(sweep_cfg(tmp_path, stage="train", budget=4096, seed=5))  # a smaller budget: afresh too
    assert len(calls) == 24 and not (Path(cfg.out_dir) / "ar" / "stale").exists()
    (Path(cfg.out_dir) / "ar" / "sweep_done.json").unlink()
    with pytest.raises(ValueError, match=r"exists but was not written by eval.sweep"):
        sweep.sweep(sweep_cfg(tmp_path, stage="train", budget=4096, seed=5))
    with pytest.raises(ValueError, match=r"^block_sizes is empty"):
        sweep.plan(sweep_cfg(tmp_path, block_sizes=[]))
    with pytest.raises(ValueError, match=r"^block size 3 must divide the sweep's model_length 128$"):
        sweep.plan(sweep_cfg(tmp_path, block_sizes=[3]))


def test_sweep_cli_plans_inside_hydra_and_rejects_a_bad_stage(tmp_path):
    line = one_error_line(run("sweep", "stage=bogus", f"out_dir={tmp_path / 'runs'}"))
    assert "stage must be one of all, train, eval; got 'bogus'" in line


def test_sweep_table_and_pareto_plot(tmp_path):
    from eval.sweep_report import markdown_table, pareto_plot

    rows = [dict(model="ar", name="ar", block_size=1, init="scratch", ppl=100.0, ppl_ci95=[100.0, 100.0],
                 ppl_exact=True, gen_ppl=300.0, entropy=4.2, nfe=128, tokens_per_s=900.0, train_tokens=10),
            dict(model="mdlm", name="mdlm", block_size=128, init="scratch", ppl=200.0, ppl_ci95=[190.0, 210.0],
                 ppl_exact=False, gen_ppl=600.0, entropy=4.4, nfe=120, tokens_per_s=300.0, train_tokens=10)]
    table = markdown_table(rows)
    assert "| ar | 1 | scratch | 100.0 (exact) |" in table and "200.0 [190.0, 210.0]" in table
    png = pareto_plot(rows, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows[0]["gen_ppl"] = rows[1]["gen_ppl"] = float("nan")  # no judge score: the panel says so, nothing crashes
    assert pareto_plot(rows, tmp_path / "q.png").is_file()

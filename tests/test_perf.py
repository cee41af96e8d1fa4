"""Tests of the performance suite (python -m eval.speed suite=perf, eval/perf.py) on tiny random models: the
verdict logic, the target rows computed from measurements, the confidence curve, one smoke run end to end and its
one-line errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_eval_cli import save_tiny_checkpoint
from test_judge import ar_judge_dir  # noqa: F401 - fixture

from eval.common import CLIError
from eval.perf import confidence_targets, run_confidence, speed_targets, verdict
from eval.perf_settings import check_perf, notes

ROOT = Path(__file__).resolve().parents[1]
TINY = {"length": 32, "dim": 32, "layers": 1, "heads": 4, "vocab": 64, "block_size": 4}
TINY_CLI = [f"perf.{k}={v}" for k, v in TINY.items()] + ["perf.repeats=1", "perf.long_factor=2", "threads=1"]
TARGET_NAMES = {"nfe_block1", "nfe_block4", "cache_speedup", "batch8_speedup", "batch64_speedup", "long_default",
                "vs_ar", "confidence"}
INFO_NAMES = {"long_streaming", "long_stride4"}


def _cfg(**perf) -> OmegaConf:
    cfg = OmegaConf.load(ROOT / "configs/eval/speed.yaml")
    cfg.pop("defaults")
    cfg.pop("hydra")
    cfg.suite = "perf"
    cfg.perf.merge_with({**TINY, "repeats": 1, "long_factor": 2, **perf})
    return cfg


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "eval.speed", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_verdict_hand_computed():
    assert verdict(1024, 1024, "<=") == "PASS"  # NFE equal to N new tokens meets "<= N"
    assert verdict(1280, 1024, "<=") == "FAIL"  # 1.25 NFE per token at L'=4
    assert verdict(5.0, 5, ">=") == "PASS"
    assert verdict(1230.0 / 250.0, 5, ">=") == "FAIL"  # 4.92x
    assert verdict(7587.5 / 1230.7, 4, ">=") == "PASS"  # 6.17x
    assert verdict(0.79, 0.8, ">=") == "FAIL"
    assert verdict(math.nan, 1, ">=") == verdict(math.nan, 1, "<=") == "FAIL"
    with pytest.raises(ValueError, match="op must be one of"):
        verdict(1, 1, "<")


def _point(tau, nfe_per_token, ppl):
    return {"threshold": tau, "nfe_per_token": nfe_per_token, "gen_ppl": ppl, "gen_ppl_se": 1.0, "entropy": 4.0,
            "tokens_per_forward": 1 / nfe_per_token}


def test_confidence_target_names_the_best_passing_threshold():
    # first hitting 1.25 NFE/token at gen-PPL 100. tau 0.5: 2.5x fewer but PPL 1.20x (fails quality);
    # tau 0.7: 1.25 / 0.6 = 2.083x at 1.08x (passes); tau 0.9: exactly 2.0x at 1.05x (passes, more NFE than 0.7)
    points = [_point(None, 1.25, 100.0), _point(0.5, 0.5, 120.0), _point(0.7, 0.6, 108.0), _point(0.9, 0.625, 105.0)]
    rows = confidence_targets(points)
    assert [r["name"] for r in rows] == ["confidence_first_hitting", "confidence_tau=0.5", "confidence_tau=0.7",
                                         "confidence_tau=0.9", "confidence"]
    assert all(r["verdict"] == "info" for r in rows[:-1])
    row = rows[-1]
    assert row["verdict"] == "PASS" and row["threshold"] == 0.7
    assert row["measured"] == pytest.approx(1.25 / 0.6) and row["ppl_ratio"] == pytest.approx(1.08)


def test_confidence_target_fails_with_the_closest_threshold():
    # tau 0.5: 2.5x at 1.30x PPL (gap 1.30 / 1.10 = 1.18); tau 0.9: 1.25x at 1.0x (gap 2 / 1.25 = 1.6)
    row = confidence_targets([_point(None, 1.25, 100.0), _point(0.5, 0.5, 130.0), _point(0.9, 1.0, 100.0)])[-1]
    assert row["verdict"] == "FAIL" and row["threshold"] == 0.5 and "closest" in row["detail"]
    assert row["measured"] == pytest.approx(2.5) and row["ppl_ratio"] == pytest.approx(1.3)


def _meas(tps, nfe=10, window="default", new=64):
    return {"tokens_per_second": tps, "nfe": nfe, "window": window, "new_tokens_per_row": new}


def test_speed_targets_from_measurements():
    p = check_perf(_cfg(batches=[2, 8]))
    m = {"base": _meas(100.0, 40), "block1": _meas(50.0, 33), "cache_off": _meas(25.0), "batch2": _meas(150.0),
         "batch8": _meas(390.0), "window1": _meas(110.0), "long_default": _meas(99.0),
         "long_streaming": _meas(105.0, window="streaming=True"), "long_stride4": _meas(11.0), "ar": _meas(120.0)}
    rows = {r["name"]: r for r in speed_targets(m, p)}
    assert (rows["nfe_block1"]["measured"], rows["nfe_block1"]["verdict"]) == (33, "FAIL")  # 33 > N = 32
    assert (rows["nfe_block4"]["measured"], rows["nfe_block4"]["verdict"]) == (40, "FAIL")
    assert (rows["cache_speedup"]["measured"], rows["cache_speedup"]["verdict"]) == (4.0, "FAIL")  # 100 / 25
    assert (rows["batch2_speedup"]["measured"], rows["batch2_speedup"]["verdict"]) == (1.5, "info")
    assert (rows["batch8_speedup"]["measured"], rows["batch8_speedup"]["verdict"]) == (3.9, "FAIL")
    assert rows["batch64_speedup"]["verdict"] == "SKIP" and "not in perf.batches" in rows["batch64_speedup"]["reason"]
    assert (rows["long_default"]["measured"], rows["long_default"]["verdict"]) == (0.9, "PASS")  # 99 / 110
    assert rows["long_streaming"]["verdict"] == rows["long_stride4"]["verdict"] == "info"
    assert rows["long_stride4"]["measured"] == pytest.approx(0.1)
    assert rows["vs_ar"]["measured"] == pytest.approx(100 / 120) and rows["vs_ar"]["verdict"] == "PASS"


@pytest.mark.parametrize(
    "perf, message",
    [
        ({"repeats": 0}, "perf.repeats must be an integer >= 1"),
        ({"thresholds": 0.5}, "perf.thresholds must be a non-empty list"),
        ({"thresholds": [0.5, 0.0]}, "perf.thresholds must be a number in (0, 1]"),
        ({"thresholds": [1.5]}, "perf.thresholds must be a number in (0, 1]"),
        ({"batches": [1, 8]}, "compared with batch 1"),
        ({"long_factor": 1}, "perf.long_factor must be an integer >= 2"),
        ({"heads": 3}, "must divide perf.dim"),
    ],
)
def test_bad_perf_settings_fail_before_any_model(monkeypatch, perf, message):
    import eval.speed

    monkeypatch.setattr(eval.speed, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(CLIError) as info:
        eval.speed.run_speed(_cfg(**perf))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_notes_flag_smoke_runs_and_other_sizes():
    assert notes(check_perf(_cfg())) == [
        "repeats=1 (< 5: smoke run, not a measurement)",
        "model size differs from the targets' reference size (dim 256, layers 8, heads 8, vocab 4097, length 1024, "
        "block_size 4)",
    ]
    cfg = OmegaConf.load(ROOT / "configs/eval/speed.yaml")  # the shipped defaults: a real run at the reference size
    assert notes(check_perf(cfg)) == []


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("perf_ckpt"), model_length=16, n_blocks=1)


def test_confidence_curve_on_a_checkpoint(tiny_ckpt, ar_judge_dir, tmp_path):  # noqa: F811
    p = check_perf(_cfg(checkpoint=str(tiny_ckpt), judge=str(ar_judge_dir), thresholds=[0.5, 0.9], num_samples=3,
                        sample_batch=2))
    points, skipped = run_confidence(p, torch.device("cpu"))
    assert skipped is None
    assert [(pt["sampler"], pt["threshold"]) for pt in points] == [
        ("first_hitting", None), ("confidence", 0.5), ("confidence", 0.9)]
    for pt in points:
        assert pt["new_tokens_per_row"] == 15 and pt["length_mean"] == 15  # model_length - 1
        assert pt["num_samples"] == 3 and pt["seed"] == 0 and pt["dtype"] == "float32"
        assert pt["nfe_per_token"] == pytest.approx(pt["nfe_per_sample"] / 15)
        assert "environment" in pt and pt["threads"] == torch.get_num_threads()
    assert confidence_targets(points)[-1]["verdict"] in ("PASS", "FAIL")

    p["judge"] = str(tmp_path / "no_judge.gguf")
    points, skipped = run_confidence(p, torch.device("cpu"))
    assert points == [] and "cannot be loaded" in skipped and "no_judge.gguf" in skipped


def test_perf_suite_smoke_run_end_to_end(tmp_path):
    from bd3lm.sampling import generate
    from eval.speed import build_model, prompt_token

    out = tmp_path / "perf.json"
    proc = _run_cli("suite=perf", *TINY_CLI, "perf.checkpoint=/nonexistent", f"perf.output={out}")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    smoke = "repeats=1 (< 5: smoke run, not a measurement)"
    assert smoke in data["title"] and smoke in data["settings"]["notes"] and data["settings"]["smoke_run"] is True
    assert "smoke run, not a measurement" in proc.stdout and "reference size" in proc.stdout
    rows = {r["name"]: r for r in data["targets"]}
    assert set(rows) == TARGET_NAMES | INFO_NAMES
    for name, r in rows.items():
        assert {"measured", "target", "verdict"} <= set(r)
        expected = {"info"} if name in INFO_NAMES else {"SKIP"} if name == "confidence" else {"PASS", "FAIL"}
        assert r["verdict"] in expected, (name, r)
        assert r["verdict"] in proc.stdout
    assert "/nonexistent" in rows["confidence"]["reason"] and rows["confidence"]["measured"] is None
    md = (tmp_path / "perf.md").read_text()  # the Markdown twin: one line per target, the same verdicts
    assert all(f"| {name} | {r['shown']} | {r['target_text']} | {r['verdict']} |" in md for name, r in rows.items())

    m = data["measurements"]
    sizes = {"checkpoint": None, **{k: TINY[k] for k in ("vocab", "length", "dim", "layers", "heads")}}
    for name, key, block in (("nfe_block1", "block1", 1), ("nfe_block4", "base", 4)):
        model = build_model(sizes, block, False, torch.device("cpu"))  # the same seeded model, run here directly
        token = prompt_token(model) or 0
        nfe = generate(model, torch.full((1, 1), token), max_new_tokens=32, seed=0).nfe
        assert rows[name]["measured"] == m[key]["nfe"] == nfe and rows[name]["target"] == 32
    for name, num, den in (("cache_speedup", "base", "cache_off"), ("batch64_speedup", "batch64", "base"),
                           ("long_default", "long_default", "window1"), ("vs_ar", "base", "ar")):
        assert rows[name]["measured"] == pytest.approx(m[num]["tokens_per_second"] / m[den]["tokens_per_second"])
    assert (m["window1"]["new_tokens_per_row"], m["long_default"]["new_tokens_per_row"]) == (31, 64)
    assert (m["cache_off"]["cache"], m["long_streaming"]["window"]) == ("off", "streaming=True")
    assert m["batch64"]["new_tokens"] == 64 * 32 and m["ar"]["causal"] is True
    for rec in m.values():
        assert rec["repeats"] == 1 == len(rec["seconds_all"]) and rec["warmup_runs_excluded"] == 1
        assert rec["dtype"] == "float32" and rec["prompt_length"] == 1 and rec["threads"] == 1
        assert rec["torch"] == torch.__version__ and rec["environment"]["torch"] == torch.__version__
        assert rec["tokens_per_second"] == pytest.approx(rec["new_tokens"] / rec["seconds_median"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_unknown_suite_is_one_error_line(tmp_path):
    proc = _run_cli("suite=fast", f"output={tmp_path / 's.json'}")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["error: suite 'fast' is not one of default, perf"], proc.stderr
    assert not (tmp_path / "s.json").exists()

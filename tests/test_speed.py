"""Tests of bd3lm.evaluation.speed (sampling throughput) and the eval.speed CLI on tiny random models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model
from omegaconf import OmegaConf

from bd3lm.evaluation.speed import SpeedResult, environment, speed

ROOT = Path(__file__).resolve().parents[1]
TINY_CLI = [
    "length=32", "dim=32", "layers=1", "heads=4", "vocab=64", "new_tokens=8", "off_tokens=8",
    "block_sizes=[4]", "batches=[1]", "repeats=1",
]


def _ar_model():
    return tiny_model(block_size=1, causal=True, cross_attn=False, adaln=False)


@pytest.mark.parametrize("make", [tiny_model, _ar_model], ids=["bd3lm", "ar"])
def test_speed_counts_generated_tokens_only(make):
    model = make()
    res = speed(model, prompt_length=5, new_tokens=8, batch_size=3, repeats=2)
    assert isinstance(res, SpeedResult)
    assert res.new_tokens == 24  # 3 rows x 8 generated tokens; the 5 prompt tokens per row are not counted
    assert res.prompt_tokens == 5
    assert res.tokens_per_s == 24 / res.seconds
    assert len(res.seconds_all) == res.repeats == 2
    assert min(res.seconds_all) <= res.seconds <= max(res.seconds_all)
    assert res.batch_size == 3 and res.kv_cache is True
    assert res.nfe >= (8 if model.config.causal else 2)
    assert res.tokens_per_forward == 24 / res.nfe
    assert res.settings["new_tokens_per_row"] == 8


def test_speed_defaults_and_kwargs():
    model = tiny_model()  # model_length 16, block size 4
    res = speed(model, repeats=1, warmup=0, prompt_length=0, kv_cache=False, sampler="confidence", threshold=0.5)
    assert res.new_tokens == 16 and res.prompt_tokens == 0 and res.kv_cache is False
    assert res.settings["generate_kwargs"] == {"kv_cache": False, "sampler": "confidence", "threshold": 0.5}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"new_tokens": 0}, "new_tokens"),
        ({"new_tokens": 2.5}, "new_tokens"),
        ({"prompt_length": -1}, "prompt_length"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"bos_token_id": 32}, "bos_token_id"),  # the mask id of the tiny model (vocab 33)
        ({"max_new_tokens": 4}, "max_new_tokens"),
    ],
)
def test_speed_bad_arguments(model, kwargs, name):
    with pytest.raises(ValueError) as info:
        speed(model, **{"repeats": 1, "warmup": 0, "new_tokens": 4, **kwargs})
    msg = str(info.value)
    assert name in msg and "\n" not in msg


def test_speed_ar_needs_a_prompt():
    with pytest.raises(ValueError, match="prompt_length=0"):
        speed(_ar_model(), prompt_length=0, new_tokens=2, repeats=1, warmup=0)


def test_environment_record():
    env = environment(tiny_model())
    for key in ("platform", "processor", "torch", "threads", "device", "dtype", "cpu_flags"):
        assert key in env
    assert env["device"] == "cpu" and env["dtype"] == "float32"
    if os.path.exists("/proc/cpuinfo"):  # oracle: the flags line of /proc/cpuinfo, read here independently
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith(("flags", "Features")))
        flags = set(line.split(":", 1)[1].split())
        assert env["cpu_flags"] == {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                                            "amx_tile", "amx_int8")}
        assert env["cpu_bf16_native"] == bool(flags & {"avx512_bf16", "amx_bf16"})
    json.dumps(env)


def test_run_speed_on_a_checkpoint(tmp_path):
    from eval.speed import run_speed

    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    cfg = OmegaConf.load(ROOT / "configs/eval/speed.yaml")
    cfg.pop("defaults")
    cfg.pop("hydra")
    cfg.merge_with(dict(checkpoint=str(ckpt), new_tokens=8, off_tokens=4, batches=[2], cache=[True, False],
                        repeats=1, prompt_length=3, output=str(tmp_path / "out" / "s.json")))
    result = run_speed(cfg)
    assert json.loads((tmp_path / "out" / "s.json").read_text())["rows"] == result["rows"]
    rows = result["rows"]
    # batch 2: cache on at 8 and 4 tokens, cache off at 4; then first hitting at batch 1 and confidence
    assert [(r["batch"], r["cache"], r["new_tokens_per_seq"], r["sampler"]) for r in rows] == [
        (2, True, 8, "first_hitting"), (2, True, 4, "first_hitting"), (2, False, 4, "first_hitting"),
        (1, True, 8, "first_hitting"), (1, True, 8, "confidence tau=0.9"),
    ]
    for r in rows:
        assert r["model"] == "checkpoint" and r["block_size"] == 4 and r["prompt_tokens"] == 3
        assert r["new_tokens"] == r["batch"] * r["new_tokens_per_seq"]
    assert rows[-1]["nfe_first_hitting"] == rows[-2]["nfe"]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "eval.speed", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_speed_cli_end_to_end(tmp_path):
    out = tmp_path / "speed.json"
    proc = _run_cli(*TINY_CLI, f"output={out}")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["settings"]["new_tokens"] == 8 and "environment" in data["settings"]
    rows = data["rows"]
    # L'=4: cache on, cache off, confidence; AR: cache on, cache off
    assert [(r["model"], r["cache"]) for r in rows] == [
        ("bd3lm L'=4", True), ("bd3lm L'=4", False), ("bd3lm L'=4", True), ("ar", True), ("ar", False),
    ]
    for r in rows:
        assert r["prompt_tokens"] == 1 and r["new_tokens"] == r["batch"] * r["new_tokens_per_seq"] == 8
        assert r["tokens_per_second"] == pytest.approx(r["new_tokens"] / r["seconds"])
    assert not list(tmp_path.glob(".*.tmp")) and not (ROOT / "outputs" / "speed.json").exists()


@pytest.mark.parametrize("bad", ["batches=[0]", "cache=[maybe]", "new_tokens=0", "checkpoint=/no/such/dir"])
def test_speed_cli_bad_values(tmp_path, bad):
    proc = _run_cli(*TINY_CLI, f"output={tmp_path / 's.json'}", bad)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "s.json").exists()

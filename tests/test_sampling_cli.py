"""End-to-end tests of generate.py: a tiny random model + a tiny byte-level BPE tokenizer saved in
tmp_path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import bd3lm

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a block diffusion model denoises one block at a time",
    "to be or not to be, that is the question",
    "hello world, hello block diffusion",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(SENTENCES, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    tok.add_special_tokens({"mask_token": "<|mask|>"})
    assert tok.mask_token_id == len(tok) - 1
    return tok


def save_checkpoint(path, **config):
    """Save :func:`tiny_tokenizer` and a tiny random BD3-LM (block 4, context 32 unless ``config`` says otherwise)
    in ``path`` with ``save_pretrained``; returns ``path``."""
    tok = tiny_tokenizer()
    tok.save_pretrained(path)
    kw = dict(vocab_size=len(tok), model_length=32, block_size=4, hidden_dim=32, cond_dim=16, n_blocks=2,
              n_heads=4, dropout=0.0)
    torch.manual_seed(0)
    randomize(bd3lm.BD3LM(bd3lm.BD3LMConfig(**{**kw, **config})), 0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"))


def run_cli(cwd, *overrides):
    """``python generate.py OVERRIDES`` in a subprocess (the real process: imports, argv, exit code)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def cli_in_process(capsys, *overrides) -> subprocess.CompletedProcess:
    """``generate.cli`` (what ``python generate.py`` runs: argv split, Hydra, run) in this process, without the
    seconds of a new interpreter's imports; the exit code, stdout and stderr as :func:`run_cli` gives them."""
    import generate

    capsys.readouterr()
    code = 0
    try:
        generate.cli(["generate.py", *map(str, overrides)])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["generate.py", *overrides], code, out, err)


def test_generate_cli_end_to_end(checkpoint, tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\nthe quick brown fox\n")
    out = tmp_path / "out" / "samples.jsonl"
    proc = run_cli(
        cwd,
        f"checkpoint={checkpoint}",
        f"prompts_file={prompts}",
        "num_samples=2",
        "max_new_tokens=10",
        "sampler=confidence",
        "threshold=0.5",
        "seed=0",
        f"output={out}",
    )
    assert proc.returncode == 0, proc.stderr
    assert list(cwd.iterdir()) == []  # nothing written in the working directory
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["hello world"] * 2 + ["the quick brown fox"] * 2
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    tok = tiny_tokenizer()
    mask = len(tok) - 1
    for r in records:
        assert r["stop_reason"] in ("eos", "max_new_tokens") and r["nfe"] > 0
        assert 1 <= len(r["token_ids"]) <= 10 and mask not in r["token_ids"]
        assert r["prompt_ids"] == [tok.bos_token_id] + tok(r["prompt"], add_special_tokens=False)["input_ids"]
        assert r["prompt_ids_unread"] == 0
        assert r["text"] == tok.decode(r["token_ids"], skip_special_tokens=True)
    assert proc.stdout.count("===== sample") == 4  # several samples: each printed when done (not a TTY)
    assert "NFE" in proc.stderr

    monkeypatch.chdir(cwd)
    proc = cli_in_process(
        capsys, f"checkpoint={checkpoint}", "prompt=hello", "max_new_tokens=6", "seed=1", "temperature=0"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hello")  # one sample streams as plain text
    assert list(cwd.iterdir()) == []


def test_generate_cli_bad_input_exits_with_one_line(checkpoint, tmp_path):
    proc = run_cli(tmp_path, f"checkpoint={tmp_path / 'missing'}")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: checkpoint directory")


def load_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(checkpoint=None), "checkpoint=DIR is required"),
        (dict(prompts_file="EMPTY"), "contains no prompts"),
        (dict(prompts_file="MISSING"), "does not exist"),
        (dict(prompt="a", prompts_file="EMPTY"), "either prompt= or prompts_file="),
        (dict(prompt="  "), "prompt is empty"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1; got 0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]; got 1.5"),
        (dict(sampler="confidence", threshold=2.0), r"threshold must be in \(0, 1\]; got 2.0"),
        (dict(dtype="int8"), "dtype 'int8' is not one of"),
        (dict(window=30), "window 30 is not a multiple of the block size 4"),
    ],
)
def test_generate_cli_errors(checkpoint, tmp_path, overrides, message):
    cli = load_cli()
    cfg = OmegaConf.load(ROOT / "configs" / "generate.yaml")
    cfg.pop("hydra")
    cfg.pop("defaults")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cfg.checkpoint = str(checkpoint)
    cfg.stream = False
    for key, value in overrides.items():
        value = {"EMPTY": str(empty), "MISSING": str(tmp_path / "nope.txt")}.get(value, value)
        cfg[key] = value
    with pytest.raises((cli.CLIError, ValueError), match=message):
        cli.run(cfg)


def test_generate_cli_infills_with_a_roulette_model(checkpoint, tmp_path, capsys):
    """suffix= on a whole-sequence CEDD/roulette model: the JSONL keeps prompt and suffix ids unchanged around a
    span of max_new_tokens ids, sampled by the default (analytic) rule; a block-causal model is refused."""
    path = save_checkpoint(tmp_path / "roulette", block_size=32, graph="roulette", loss="cedd", p_m=0.9,
                           time_conditioning=True)
    tok = tiny_tokenizer()
    out = tmp_path / "infill.jsonl"
    proc = cli_in_process(capsys, f"checkpoint={path}", "prompt=hello world", "suffix=the lazy dog",
                          "max_new_tokens=7", "num_samples=2", "steps=4", "seed=0", f"output={out}")
    assert proc.returncode == 0, proc.stderr
    suffix_ids = tok("the lazy dog", add_special_tokens=False)["input_ids"]
    prompt_ids = [tok.bos_token_id] + tok("hello world", add_special_tokens=False)["input_ids"]
    for r in (json.loads(line) for line in out.read_text().splitlines()):
        assert r["prompt_ids"] == prompt_ids and r["suffix_ids"] == suffix_ids and r["suffix"] == "the lazy dog"
        assert len(r["token_ids"]) == 7 and r["nfe"] == 5
    assert "NFE 5" in proc.stderr
    proc = cli_in_process(capsys, f"checkpoint={path}", "prompt=hello", "suffix=dog", "max_new_tokens=40")
    assert proc.returncode == 2 and "exceed the model's length 32" in proc.stderr
    proc = cli_in_process(capsys, f"checkpoint={checkpoint}", "prompt=hello", "suffix=dog", "max_new_tokens=4")
    assert proc.returncode == 2 and "needs a whole-sequence model" in proc.stderr

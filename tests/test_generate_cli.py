"""generate.py for a new user: verbatim prompts, Ctrl-C, atomic output, checks before loading, bad checkpoints.

Most runs call ``generate.cli(argv)`` in this process (the same path as ``python generate.py``: argv split, Hydra,
run); the process-level behaviours (a real SIGINT, no torch import before the checks) run in subprocesses.
"""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import write_snapshot
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from test_sampling_cli import ROOT, cli_in_process, save_checkpoint, tiny_tokenizer

import bd3lm
import generate_args
from bd3lm.sampling import generate as sample
from bd3lm.sampling.layout import default_stride
from tests.conftest import tiny_model

CONTEXT = 32
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)  # ~40 tokens, more than CONTEXT
AWKWARD = [
    "To be, or not to be",  # a comma: Hydra's "Ambiguous value for argument"
    "ROMEO: a colon",
    "a=b=c",
    'she said "hi"',
    "it's 'single'",
    '"ROMEO:"',  # a value wholly in quotes (Hydra strips them)
    "1e3",  # Hydra: the float 1000.0
    "true",  # Hydra: the bool True
    "null",  # Hydra: None
    "${oc.env:HOME}",  # OmegaConf: the home directory
    "[a,b]",  # Hydra: a list
    "{a: 1}",  # Hydra: a dict
    "naïve café — 東京 🚀",
    "  two\nlines\tand spaces  ",
    "--help -m",
    "prompt=nested",
    "~",
    "\\n %s \\",
    LONG,
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random BD3-LM (block 4, context 32) and its byte-level BPE tokenizer, saved with save_pretrained."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"))


def cli(capsys, *args):
    """``python generate.py ARGS`` in this process: (exit code, stdout, stderr)."""
    proc = cli_in_process(capsys, *args)
    return proc.returncode, proc.stdout, proc.stderr


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("prompt", AWKWARD, ids=range(len(AWKWARD)))
def test_prompts_are_taken_verbatim(checkpoint, tmp_path, capsys, prompt):
    out = tmp_path / "out.jsonl"
    code, _, err = cli(capsys, f"checkpoint={checkpoint}", f"prompt={prompt}", "max_new_tokens=4", "seed=0",
                       "stream=false", f"output={out}")
    assert code == 0, err
    (record,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    tok = tiny_tokenizer()
    assert record["prompt"] == prompt
    assert record["prompt_ids"] == [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(record["prompt_ids"][1:]) == prompt  # byte-level BPE: the ids spell the exact text
    assert (record["prompt_ids_unread"] > 0) == (len(record["prompt_ids"]) > CONTEXT) == (prompt == LONG)
    assert len(record["token_ids"]) == 4


def test_suffix_is_taken_verbatim(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "roulette", model_length=64, block_size=64, graph="roulette", loss="cedd",
                           p_m=0.9, time_conditioning=True)
    tok = tiny_tokenizer()
    suffix = ' a=b, [c]: "d" ${oc.env:HOME} 1e3'
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli(capsys, f"checkpoint={ckpt}", "prompt=To be, or not", f"suffix={suffix}",
                            "max_new_tokens=3", "steps=2", "seed=0", f"output={out}")
    assert code == 0, err
    (record,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert record["prompt"] == "To be, or not" and record["suffix"] == suffix
    assert record["suffix_ids"] == tok(suffix, add_special_tokens=False)["input_ids"]
    assert f"]{suffix}" in stdout


@pytest.mark.parametrize("causal,window,stride", [(False, 32, None), (False, 16, 4), (True, 16, None), (True, 12, 5)])
def test_a_long_prompt_is_continued_as_the_sampler_continues_its_own_text(one_thread, causal, window, stride):
    """Greedy (deterministic) samples: a prompt longer than the window, cut by ``unread_prompt_tokens`` as the CLI
    cuts it, is continued exactly as the sampler continued that text when it generated it past the window."""
    kw = dict(causal=True, cross_attn=False, adaln=False, block_size=1) if causal else {}
    model = tiny_model(0, model_length=32, **kw)
    bs = 1 if causal else 4
    s = stride or default_stride(window, bs, False)
    args = dict(temperature=0, window=window, window_stride=stride, sampler=None if causal else "confidence")
    lengths = [window + bs, window + 2 * bs + s]  # whole blocks: the sampler generated these tokens block by block
    text = sample(model, [torch.tensor([1, 2, 3, 4])], max_new_tokens=max(lengths) + 4, **args).sequences[0]
    for length in lengths:
        drop = generate_args.unread_prompt_tokens(length, bs, window, s, causal)
        assert drop > 0 and drop % s == 0 and length - drop <= window
        out = sample(model, [text[drop:length]], max_new_tokens=4, **args).sequences[0]
        assert torch.equal(out[length - drop :], text[length : length + 4])


@pytest.mark.parametrize("streaming", [False, True])
def test_unread_tokens_of_a_prompt_that_fills_the_window_are_never_read(one_thread, streaming):
    """A prompt of exactly ``window`` tokens (the sampler takes it whole): without its unread tokens, the seeded
    samples are the same."""
    model = tiny_model(0, model_length=32)
    s = default_stride(32, 4, streaming)
    drop = generate_args.unread_prompt_tokens(32, 4, 32, s, False)
    assert drop == 0  # it fits: the CLI feeds it whole
    drop = s * math.ceil((32 + 4 - 32) / s)  # the sampler's first window start (bd3lm.sampling.layout docstring)
    prompt = torch.randint(0, 32, (32,), generator=torch.Generator().manual_seed(1))
    args = dict(max_new_tokens=8, num_samples=2, seed=3, streaming=streaming)
    whole, cut = sample(model, [prompt], **args), sample(model, [prompt[drop:]], **args)
    for a, b in zip(whole.sequences, cut.sequences, strict=True):
        assert torch.equal(a[32:], b[32 - drop :])


def test_progress_agrees_with_the_sampler(one_thread):
    """Progress (what an interrupted run keeps) replicates the sampler's stop rule: eos, max_new_tokens and the
    entropy stop give the ids, reasons and NFE of ``GenerationResult``."""
    from generate_view import Progress

    model = tiny_model(0, vocab_size=40, model_length=32, block_size=16)
    eos = 5  # with this model and seed, some samples stop at it, the others run to the limit
    for stop_entropy in (None, 100.0):
        progress = Progress(8, 300, eos, stop_entropy)
        res = sample(model, [torch.tensor([1, 2, 3])], max_new_tokens=300, num_samples=8, seed=0, stop=eos,
                     stop_entropy=stop_entropy, sampler="ddpm", steps=1,
                     on_block=lambda i, ids, p=progress: p.add(i, ids.tolist()), on_logits=progress.on_logits)
        assert progress.reasons == res.stop_reasons and progress.nfe == res.nfe_per_sequence
        assert [ids for ids in progress.ids] == [s[3:].tolist() for s in res.sequences]
        assert "eos" in res.stop_reasons and ("entropy" if stop_entropy else "max_new_tokens") in res.stop_reasons


def test_ctrl_c_keeps_the_finished_samples(checkpoint, tmp_path, one_thread):
    """A real SIGINT once the first sample has finished: one line, exit 130, and the finished samples written,
    each equal to what the sampler gives uninterrupted. The prompt, passed by a real process's argv, is one Hydra
    cannot parse (comma, colon, quotes, an interpolation, a float): it comes back verbatim."""
    text = 'x, y: "z" ${a:b} 1e3'
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    n = 16
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "generate.py"), f"checkpoint={checkpoint}", f"prompt={text}", f"num_samples={n}",
         "max_new_tokens=100000", "seed=0", f"output={out}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    watchdog = threading.Timer(120, proc.kill)  # a hung run fails the test instead of blocking it
    watchdog.start()
    try:
        for line in proc.stdout:  # several samples, not a TTY: each is printed when it finishes
            if line.startswith("===== sample"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and err.startswith("interrupted: wrote "), err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert err == f"interrupted: wrote {len(records)} of {n} samples to {out}\n"
    assert 1 <= len(records) < n
    tok = tiny_tokenizer()
    prompt = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert len(prompt) <= CONTEXT and all(r["prompt"] == text for r in records)
    cap = 32  # uninterrupted reference: every sample is the same as in the CLI run for its first `cap` tokens
    model = bd3lm.BD3LM.from_pretrained(checkpoint).eval()
    ref = sample(model, [torch.tensor(prompt)], max_new_tokens=cap, num_samples=n, seed=0, stop=tok.eos_token_id)
    for r in records:
        i = r["index"]
        ref_ids = ref.sequences[i][len(prompt):].tolist()
        assert r["stop_reason"] == "eos" and r["token_ids"][-1] == tok.eos_token_id and r["prompt_ids"] == prompt
        if ref.stop_reasons[i] == "eos":
            assert r["token_ids"] == ref_ids and r["nfe"] == ref.nfe_per_sequence[i]
        else:
            assert len(r["token_ids"]) > cap and r["token_ids"][:cap] == ref_ids
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


@pytest.mark.parametrize("output", [True, False])
def test_ctrl_c_before_any_sample_finished(checkpoint, tmp_path, capsys, monkeypatch, output):
    """KeyboardInterrupt at the 3rd network call (no sample finished): one line, exit 130, an old output file
    left as it was."""
    import generate_view

    def interrupt(self, rows, logits):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(generate_view.Progress, "on_logits", interrupt)
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    code, _, err = cli(capsys, f"checkpoint={checkpoint}", "prompt=hello", "num_samples=3", "max_new_tokens=50",
                       *([f"output={out}"] if output else []))
    assert code == 130 and out.read_text() == "old\n"
    assert err == (f"interrupted: no sample had finished (3 started); {out} was not written\n" if output
                   else "interrupted: 0 of 3 samples had finished (no output= to write them to)\n")


def test_output_is_replaced_atomically(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "samples.jsonl"
    out.write_text("previous run\n")
    args = (f"checkpoint={checkpoint}", "prompt=hello", "max_new_tokens=4", "stream=false", f"output={out}")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # bd3lm.atomic flushes the file before the rename
    code, _, err = cli(capsys, *args)
    assert code == 2 and "No space left on device" in one_error_line(err) and str(out) in err
    assert out.read_text() == "previous run\n" and sorted(tmp_path.iterdir()) == [out]
    monkeypatch.undo()
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert json.loads(out.read_text())["prompt"] == "hello" and sorted(tmp_path.iterdir()) == [out]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def bad_files(tmp_path):
    """prompts/output files that are wrong, by name."""
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9\n".encode("latin-1"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    return {"DIR": str(tmp_path), "LATIN1": str(binary), "MISSING": str(tmp_path / "missing.txt"),
            "UNDER_FILE": str(a_file / "out.jsonl")}


# (arguments, a fragment of the one error line); every one is found before torch is imported
CHEAP_ERRORS = [
    (["max_new_tokens=-5"], "max_new_tokens must be an integer >= 1; got -5"),
    (["max_new_tokens=1e3"], "max_new_tokens must be an integer >= 1; got 1000.0"),
    (["seed=abc"], "seed must be an integer in [0, 2**63) (or null: a random seed); got 'abc'"),
    (["seed=1.5"], "seed must be an integer"),
    (["seed=-1"], "seed must be an integer in [0, 2**63)"),  # what generate() accepts
    ([f"seed={2**63}"], "seed must be an integer in [0, 2**63)"),
    (["num_samples=0"], "num_samples must be an integer >= 1; got 0"),
    (["temperature=-1"], "temperature must be a finite number >= 0 (0 = greedy); got -1"),
    (["temperature=nan"], "temperature must be a finite number >= 0"),
    (["top_k=-1"], "top_k must be an integer >= 0; got -1"),
    (["top_p=0"], "top_p must be in (0, 1]; got 0"),
    (["threshold=1.5"], "threshold must be in (0, 1]; got 1.5"),
    (["steps=0"], "steps must be an integer >= 1; got 0"),
    (["window=x"], "window must be an integer >= 1; got 'x'"),
    (["window_stride=0"], "window_stride must be an integer >= 1; got 0"),
    (["stop_entropy=-2"], "stop_entropy must be a number of nats > 0"),
    (["sampler=greedy"], "unknown sampler 'greedy'; expected one of first_hitting"),
    (["dtype=int8"], "dtype 'int8' is not one of"),
    (["top_p_rule=nucleus"], "top_p_rule must be 'hf' or 'official'; got 'nucleus'"),
    (["add_bos=yes"], "add_bos must be true or false; got 'yes'"),
    (["device=3"], "device must be auto, cpu, cuda or cuda:N; got 3"),
    (["temperature=0,5"], "gives temperature several values"),
    (["foo=1"], "unknown option 'foo'"),
    (["~seed"], "set seed=null instead"),
    (["prompt=a", "prompt=b"], "prompt= is given twice"),
    (["prompt= "], "prompt is empty"),
    (["prompts_file=MISSING"], "prompts_file 'MISSING' does not exist"),
    (["prompts_file=DIR"], "prompts_file 'DIR' is a directory"),
    (["prompts_file=LATIN1"], "prompts_file 'LATIN1' is not UTF-8 text (byte 0xe9 at offset 3)"),
    (["output=DIR"], "output 'DIR' is a directory"),
    (["output=UNDER_FILE"], "is not a directory"),
    (["checkpoint=MISSING"], "checkpoint directory 'MISSING' does not exist"),
]


def test_cheap_errors_come_before_torch_is_imported(checkpoint, tmp_path):
    """Every bad argument is one line, exit code 2, within one process that never imports torch."""
    files = bad_files(tmp_path)
    cases = []
    for args, fragment in CHEAP_ERRORS:
        args = [a.split("=", 1)[0] + "=" + files.get(a.split("=", 1)[1], a.split("=", 1)[1]) if "=" in a else a
                for a in args]
        for key, path in files.items():
            fragment = fragment.replace(f"'{key}'", repr(path))
        ckpt = [] if any(a.startswith("checkpoint=") for a in args) else [f"checkpoint={checkpoint}"]
        cases.append((ckpt + args, fragment))
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        sys.path.insert(0, {str(ROOT)!r})
        import generate
        results = []
        for args, _ in {cases!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    generate.cli(["generate.py", *args])
                    code = 0
                except SystemExit as exc:
                    code = exc.code
            results.append((code, err.getvalue()))
        print(json.dumps({{"results": results, "torch": "torch" in sys.modules}}))
    """)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["torch"] is False
    for (args, fragment), (code, err) in zip(cases, report["results"], strict=True):
        assert code == 2, (args, err)
        assert fragment in one_error_line(err), (args, err)
    assert elapsed < 30  # ~1 s: Hydra's import, not torch's nor a model's


def corrupt(checkpoint, tmp_path, how):
    path = tmp_path / how
    path.mkdir()
    for f in checkpoint.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    weights = path / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "garbage_config":
        (path / "config.json").write_text("{this is not json")
    elif how == "tensor_shape":
        state = load_file(weights)
        state["backbone.blocks.0.mlp.0.bias"] = torch.zeros(7)
        save_file(state, weights, metadata={"format": "pt"})
    elif how == "config_shape":
        config = json.loads((path / "config.json").read_text())
        config["hidden_dim"] = 64
        (path / "config.json").write_text(json.dumps(config))
    elif how == "no_weights":
        weights.unlink()
    elif how == "a_file":
        path = weights
    return path


@pytest.mark.parametrize("how,fragment", [
    ("truncated", "model.safetensors' is not a complete safetensors file"),
    ("garbage_config", "config.json' is not valid JSON"),
    ("tensor_shape", "backbone.blocks.0.mlp.0.bias,[7],[128]"),  # the tensor and both shapes
    ("config_shape", "config_shape,has shape"),
    ("no_weights", "has no model.safetensors"),
    ("a_file", "is not a directory"),
])
def test_bad_checkpoint_is_one_line(checkpoint, tmp_path, capsys, how, fragment):
    code, out, err = cli(capsys, f"checkpoint={corrupt(checkpoint, tmp_path, how)}", "prompt=hello",
                         "max_new_tokens=4")
    line = one_error_line(err)
    assert code == 2 and out == "" and all(f in line for f in fragment.split(",")), line


@pytest.mark.parametrize("exc", [ValueError("checkpoint 'x' has non-finite weights in w"),
                                 RuntimeError("Error(s) in loading:\n\tsize mismatch")])
def test_load_time_errors_are_one_line(checkpoint, capsys, monkeypatch, exc):
    """BD3LM.from_pretrained's own one-line ValueErrors (corrupt / non-finite weights) and any other loading
    failure: one ``error:`` line, exit code 2, no traceback."""
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(bd3lm.BD3LM, "from_pretrained", fail)
    code, _, err = cli(capsys, f"checkpoint={checkpoint}", "prompt=hello")
    line = one_error_line(err)
    assert code == 2 and " ".join(str(exc).split()) in line


def test_options_match_the_config_file_and_the_sampler():
    """generate_args keeps copies of the sampler's names (importing them would import torch)."""
    from bd3lm.sampling.processing import TOP_P_RULES
    from bd3lm.sampling.registry import RULES

    cfg = OmegaConf.load(ROOT / "configs" / "generate.yaml")
    assert [k for k in cfg if k not in ("defaults", "hydra")] == list(generate_args.OPTION_NAMES)
    assert generate_args.SAMPLERS == tuple(RULES) and generate_args.TOP_P_RULES == tuple(TOP_P_RULES)


def test_check_overrides_leaves_hydra_flags_to_hydra():
    generate_args.check_overrides(["--cfg", "job", "seed=1", "-p", "pkg", "--info", "hydra.verbose=true"])
    with pytest.raises(generate_args.CLIError, match="unknown option 'job'"):
        generate_args.check_overrides(["--multirun", "job=1"])


def test_split_text_args():
    rest, text = generate_args.split_text_args(["seed=1", "prompt=a=b", "+suffix=,", "output=o", "--cfg", "job"])
    assert rest == ["seed=1", "--cfg", "job"] and text == {"prompt": "a=b", "suffix": ",", "output": "o"}
    with pytest.raises(generate_args.CLIError, match="suffix= is given twice"):
        generate_args.split_text_args(["suffix=a", "suffix=b"])


def test_show_steps_draws_every_denoising_step(checkpoint, tmp_path, capsys):
    """first_hitting reveals one position per step: every block generated is drawn, its mask count falls by one per
    line down to 0; infilling and a negative delay are refused in one line."""
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli(capsys, f"checkpoint={checkpoint}", "prompt=hi", "max_new_tokens=8", "seed=0",
                            "sampler=first_hitting", "stop_at_eos=false", "show_steps=true", f"output={out}")
    assert code == 0, err
    lines = [line for line in stdout.splitlines() if line.startswith("block ")]
    (record,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    n_prompt = len(record["prompt_ids"])
    blocks = sorted({int(line.split()[1]) for line in lines})
    assert blocks == list(range(n_prompt // 4, (n_prompt + 8 - 1) // 4 + 1))
    per_block = [[line for line in lines if int(line.split()[1]) == b] for b in blocks]
    for steps in per_block:
        masks = [line.split(":", 1)[1].count("░") for line in steps]
        assert masks == sorted(masks, reverse=True) and masks[-1] == 0 and len(set(masks)) == len(masks)
    code, _, err = cli(capsys, f"checkpoint={checkpoint}", "prompt=hi", "suffix=x", "show_steps=true")
    assert code == 2 and "show_steps" in one_error_line(err)
    code, _, err = cli(capsys, f"checkpoint={checkpoint}", "prompt=hi", "step_delay=-1")
    assert code == 2 and "step_delay" in one_error_line(err)


def test_checkpoint_by_hub_id_from_the_cache(checkpoint, tmp_path, capsys, hub_cache):
    """checkpoint=org/name is found in a hand-built Hub cache (offline) and samples exactly as the directory does;
    a missing id is one line that names the cache; a cached model without tokenizer files asks for tokenizer=."""
    cache = hub_cache
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    write_snapshot(cache, "tiny-org/with-tok", checkpoint, files=files)
    write_snapshot(cache, "tiny-org/no-tok", checkpoint, files=files[:2])
    records = []
    for name in (checkpoint, "tiny-org/with-tok"):
        out = tmp_path / f"{len(records)}.jsonl"
        code, _, err = cli(capsys, f"checkpoint={name}", "prompt=hi", "max_new_tokens=8", "seed=3", "stream=false",
                           f"output={out}")
        assert code == 0, err
        records.append(json.loads(out.read_text(encoding="utf-8")))
    assert records[0]["token_ids"] == records[1]["token_ids"]
    code, _, err = cli(capsys, "checkpoint=tiny-org/missing", "prompt=hi")
    assert code == 2 and "not in the local Hugging Face cache" in one_error_line(err) and str(cache) in err
    code, _, err = cli(capsys, "checkpoint=tiny-org/no-tok", "prompt=hi")
    assert code == 2 and "tokenizer=gpt2" in one_error_line(err)
    code, _, err = cli(capsys, "checkpoint=tiny-org/no-tok", f"tokenizer={checkpoint}", "prompt=hi",
                       "max_new_tokens=4", "stream=false")
    assert code == 0, err

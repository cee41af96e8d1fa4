"""Bad input to every eval CLI (python -m eval.X): one ``error:`` line naming the key, exit code 2, before torch.

Each CLI runs as a subprocess with ``torch``, ``transformers`` and ``datasets`` shadowed by modules that fail on
import: an error that comes back after any model, judge or data loading could have started names torch instead of
the bad key, and the test fails. The checkpoint is a stand-in directory (files present, nothing loadable)."""

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "transformers", "datasets")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the probes name: a stand-in checkpoint, broken ones, bad datasets and outputs."""
    d = tmp_path_factory.mktemp("inputs")
    block = d / "block"  # modules that fail on import, first on the child's sys.path
    block.mkdir()
    for name in BLOCKED:
        (block / f"{name}.py").write_text(f"raise ImportError('{name} was imported before the error')\n")
    ckpt = d / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bd3lm", "model_length": 32, "block_size": 4}))
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "tokenizer.json").write_text("{}")
    bad_json = d / "bad_json"
    bad_json.mkdir()
    for f in ("model.safetensors", "tokenizer.json"):
        (bad_json / f).write_bytes((ckpt / f).read_bytes())
    (bad_json / "config.json").write_text("not json {")
    no_tok = d / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((ckpt / f).read_bytes())
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    (d / "records.jsonl").write_text('{"body": "hello"}\n')
    (d / "good.txt").write_text("hello world\n")
    (d / "empty_dir").mkdir()
    (d / "out_dir.json").mkdir()  # a directory where an output file (or a stem's .json) goes
    return {k: str(v) for k, v in dict(block=block, ckpt=ckpt, bad_json=bad_json, no_tok=no_tok,
                                       binary=d / "binary.txt", jsonl=d / "records.jsonl", txt=d / "good.txt",
                                       empty_dir=d / "empty_dir", out_dir=d / "out_dir.json",
                                       stem=d / "out_dir").items()}


def run(files, module, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": files["block"], "OMP_NUM_THREADS": "1"}
    args = [a.format(**files) for a in args]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"eval.{module}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    return proc, time.perf_counter() - t0


def one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "was imported before the error" not in lines[0], lines[0]
    return lines[0]


CKPT = "checkpoint={ckpt}"
DATA = "dataset={txt}"
# (module, arguments, what the error line must contain: the key, the bad value, what was expected)
PROBES = [
    ("ppl", [CKPT, "bogus=1"], "unknown key 'bogus' for eval.ppl"),
    ("ppl", [CKPT, "--cache", "maybe"], "unknown option '--cache': eval.ppl takes key=value settings"),
    ("ppl", [CKPT, "num_samples=abc"], "num_samples must be an integer >= 1; got 'abc'"),
    ("ppl", [CKPT, "num_samples=-1"], "num_samples must be an integer >= 1; got -1"),
    ("ppl", [CKPT, "num_samples=1.5"], "num_samples must be an integer >= 1; got 1.5"),
    ("ppl", [CKPT, "num_samples=1,2"], "'num_samples=1,2' gives num_samples several values"),
    ("ppl", [CKPT, "+num_samples=2"], "num_samples already exists; set it with num_samples=VALUE"),
    ("ppl", [CKPT, "~num_samples"], "keys cannot be deleted; set num_samples=null"),
    ("ppl", [CKPT, "t_min=2"], "t_min must be a number in [0, 1); got 2"),
    ("ppl", [CKPT, "exact=maybe"], "exact must be true or false (or on/off); got 'maybe'"),
    ("ppl", [CKPT, "estimator=j1", "exact=true"], "estimator=j1 is a Monte-Carlo bound"),
    ("ppl", [CKPT, "device=gpu"], "device must be cpu, cuda, cuda:N, mps or auto; got 'gpu'"),
    ("ppl", [CKPT, DATA, "block_size=3"], "block_size 3 must divide the model's model_length 32"),
    ("ppl", [], "checkpoint=DIR is required"),
    ("ppl", ["checkpoint={ckpt}/missing"], "checkpoint directory '{ckpt}/missing' does not exist"),
    ("ppl", ["checkpoint={txt}"], "checkpoint '{txt}' is not a directory"),
    ("ppl", ["checkpoint={bad_json}"], "checkpoint '{bad_json}/config.json' is not valid JSON"),
    ("ppl", ["checkpoint={no_tok}"], "checkpoint '{no_tok}' has no tokenizer"),
    ("ppl", [CKPT], "has no training run beside it"),
    ("ppl", [CKPT, "dataset={binary}"], "dataset '{binary}' is not UTF-8 text (byte 0xff at offset 0)"),
    ("ppl", [CKPT, "dataset={empty_dir}"], "dataset '{empty_dir}' is a directory with no data files"),
    ("ppl", [CKPT, "dataset={jsonl}"], "dataset '{jsonl}' has no field 'text' in its first record (fields: body)"),
    ("ppl", [CKPT, DATA, "output={out_dir}"], "output '{out_dir}' is a directory; expected a file path"),
    ("genppl", [CKPT, "steps=abc"], "steps must be an integer >= 1; got 'abc'"),
    ("genppl", [CKPT, "kv_cache=maybe"], "kv_cache must be true or false (or on/off); got 'maybe'"),
    ("genppl", [CKPT, "stop_at_eos=maybe"], "stop_at_eos must be true or false (or on/off); got 'maybe'"),
    ("genppl", [CKPT, "top_p=2"], "top_p must be a number in (0, 1]; got 2"),
    ("genppl", [CKPT, "sampler=greedy"], "sampler must be one of first_hitting, ddpm, confidence, analytic, euler"),
    ("genppl", [CKPT, "sampler=first_hitting", "steps=4"], "steps=4 applies only to sampler ddpm, analytic, euler"),
    ("genppl", [CKPT, "streaming=true", "kv_cache=false"], "streaming=true keeps stale cache entries"),
    ("genppl", [CKPT, "judge={txt}.gguf"], "judge GGUF file '{txt}.gguf' does not exist"),
    ("genppl", [CKPT, "prompt=Hello, world"], "gives prompt several values"),
    ("lengths", [CKPT, "max_factor=-1"], "max_factor must be an integer >= 1; got -1"),
    ("lengths", [CKPT, "stop_entropy=abc"], "stop_entropy must be a number >= 0; got 'abc'"),
    ("lengths", [CKPT, "output={stem}"], "output '{out_dir}' is a directory; expected a file path"),
    ("long_docs", [CKPT, "factors=[]"], "factors must be a non-empty list such as factors=[1,4,10]; got []"),
    ("long_docs", [CKPT, "factors=[1,0]"], "every value of factors must be an integer >= 1; got 0"),
    ("long_docs", [CKPT, "modes=[maybe]"], "every value of modes must be one of exact, streaming; got 'maybe'"),
    ("speed", ["cache=maybe"], "every value of cache must be true or false (or on/off); got 'maybe'"),
    ("speed", ["cache=[]"], "cache must be a non-empty list such as cache=[true,false]; got []"),
    ("speed", ["--cache", "maybe"], "unknown option '--cache': eval.speed takes key=value settings (see "
                                    "configs/eval/speed.yaml); did you mean cache=maybe?"),
    ("speed", ["ar=maybe"], "ar must be true or false (or on/off); got 'maybe'"),
    ("speed", ["new_tokens=1.5"], "new_tokens must be an integer >= 1; got 1.5"),
    ("speed", ["checkpoint={bad_json}"], "checkpoint '{bad_json}/config.json' is not valid JSON"),
    ("speed", ["perf=5"], "perf is a group of settings; set its keys, e.g. perf.repeats=VALUE"),
    ("speed", ["suite=perf", "perf.bogus=1"], "unknown key 'perf.bogus' for eval.speed"),
    ("speed", ["suite=perf", "perf.thresholds=[]"], "perf.thresholds must be a non-empty list"),
    ("perf", ["perf.repeats=0"], "perf.repeats must be an integer >= 1; got 0"),
    ("train_speed", ["steps=abc"], "steps must be an integer >= 1; got 'abc'"),
    ("train_speed", ["steps=-1"], "steps must be an integer >= 1; got -1"),
    ("train_speed", ["variants=[]"], "variants must be a non-empty list such as variants=[bd3lm,ar]; got []"),
    ("train_speed", ["precisions=[fp8]"], "every value of precisions must be one of fp32, bf16; got 'fp8'"),
    ("train_speed", ["output={out_dir}"], "output '{out_dir}' is a directory"),
    ("sweep", ["budget=abc"], "budget must be an integer >= 1; got 'abc'"),
    ("sweep", ["finetune_fraction=2"], "finetune_fraction must be a number in (0, 1]; got 2"),
    ("sweep", ["train_overrides=abc"], "train_overrides must be a list such as"),
    ("sweep", ["long_docs.enabled=maybe"], "long_docs.enabled must be true or false (or on/off); got 'maybe'"),
    ("sweep", ["results_dir={txt}"], "results_dir '{txt}' is a file; expected a directory"),
]


@pytest.mark.parametrize("module, args, expected", PROBES,
                         ids=[f"{m}-{' '.join(a).replace('{', '').replace('}', '')}" for m, a, _ in PROBES])
def test_bad_argument_is_one_error_line_before_torch(files, module, args, expected):
    proc, seconds = run(files, module, *args)
    line = one_error_line(proc)
    assert expected.format(**files) in line
    assert seconds < 5, f"eval.{module} took {seconds:.1f} s to reject {args}"


def test_hydra_flags_still_reach_hydra(files):
    proc, _ = run(files, "ppl", "--cfg", "job", "num_samples=3")
    assert proc.returncode == 0, proc.stderr
    assert OmegaConf.create(proc.stdout).num_samples == 3


def cfg_of(name: str, **values):
    cfg = OmegaConf.load(ROOT / "configs" / "eval" / f"{name}.yaml")
    cfg.pop("defaults")
    cfg.pop("hydra")
    for k, v in values.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def _flat(spec, prefix=""):
    out = set()
    for k, v in spec.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def test_every_config_key_has_a_check():
    from eval import genppl, lengths, long_docs, ppl, speed, sweep, train_speed
    from eval.config_checks import _keys

    for module in (genppl, lengths, long_docs, ppl, speed, sweep, train_speed):
        name = module.__name__.split(".")[-1]
        assert _flat(module.KEYS) == set(_keys(cfg_of(name))), name


def test_the_defaults_pass_and_words_are_normalised(files):
    from eval.config_checks import validate
    from eval.speed import KEYS, check_config

    cfg = cfg_of("speed", cache="off", ar="yes")
    s = check_config(cfg)
    assert s["cache"] == [False] and s["ar"] is True and cfg.cache == [False] and cfg.ar is True
    from eval.genppl import KEYS as GENPPL

    a = validate(cfg_of("genppl", checkpoint=files["ckpt"], stop_at_eos="On", prompt=42), GENPPL)
    assert a["stop_at_eos"] is True and a["prompt"] == "42" and a["checkpoint"] == files["ckpt"]
    assert set(validate(cfg_of("speed"), KEYS)) == set(KEYS)


def test_constants_match_the_library():
    from bd3lm.evaluation import PROTOCOLS
    from bd3lm.evaluation.long_documents import MODES
    from bd3lm.sampling.processing import TOP_P_RULES
    from bd3lm.sampling.registry import RULES, STEPPED
    from eval import common, long_docs, ppl

    assert common.SAMPLERS == RULES and common.STEPPED == STEPPED and common.TOP_P_RULES == TOP_P_RULES
    assert long_docs.MODES == MODES and ppl.PROTOCOLS == tuple(PROTOCOLS)
    from bd3lm import checkpoint
    from bd3lm.data import corpus
    from bd3lm.evaluation import checks, corpora

    assert checks.CHECKPOINT_WEIGHTS == checkpoint.WEIGHT_FILES
    assert checks.TOKENIZER_FILES == corpora._TOKENIZER_FILES
    assert set(checks.DATASET_SUFFIXES) == set(corpus._KINDS)


def test_file_checks(tmp_path):
    from bd3lm.evaluation.checks import check_dataset, check_output

    gz = tmp_path / "a.txt.gz"
    gz.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(ValueError, match=r"^dataset '.*a.txt.gz' cannot be read: Not a gzipped file"):
        check_dataset(str(gz))
    good = tmp_path / "b.txt.gz"
    good.write_bytes(gzip.compress("héllo".encode()))
    assert check_dataset(str(good)) == str(good)
    pq = tmp_path / "c.parquet"
    pq.write_text("{}")
    with pytest.raises(ValueError, match=r"is not a Parquet file"):
        check_dataset(str(pq))
    odd = tmp_path / "d.csv"
    odd.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"is not a supported corpus file"):
        check_dataset(str(odd))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"^output '.*file/sub/out.json' cannot be created: '.*file' is a file"):
        check_output(str(blocker / "sub" / "out.json"))
    assert check_output(str(tmp_path / "new" / "out"), suffixes=(".json", ".md")) == str(tmp_path / "new" / "out")

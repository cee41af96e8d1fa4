"""Benchmark: training data at scale (a benchmark script, not a timed test).

    python -m eval.data_scale quick=true       # the whole pipeline on 20 MB, about a minute (development)
    python -m eval.data_scale                  # 200 MB and 2 GB: the figures (30-60 min on 2 cores, ~7 GB disk)

For every size (bytes of document text; 1 MB = 10^6 bytes, as every MB here):

1. **corpus**: a synthetic OpenWebText-like directory of jsonl files (:mod:`eval.data_scale_corpus`) under
   ``work_dir/corpora``, reused when its manifest records the same settings; the writing speed (MB of text/s,
   the source words loaded beforehand) is reported when it is written.
2. **prepare**: ``bd3lm.data.prepare_shards(corpus, gpt2, ShardOptions(model_length, insert_eos=True,
   valid_fraction), cache_dir=work_dir/cache/SIZE, num_proc)`` in a child process (``python -m eval.data_scale
   child=prepare ...``) on an emptied cache: the jsonl -> Arrow conversion, the tokenisation and the shard writing.
   Throughput is corpus text MB and tokens (all tokens of both splits, EOS included) per second of the
   ``prepare_shards`` call; wall time is the whole child (interpreter and imports included). Every ``poll_s``
   the memory of the child and of all its descendants (the ``datasets.map(num_proc=)`` workers, forked) is read
   from /proc: the peak RSS of the main process is its kernel high-water mark (VmHWM); the tree figure is the
   largest sum of the RSS of the processes alive at one poll, which counts the pages a fork shares with its parent
   once per process; the largest sum of PSS (shared pages split between their processes) is the tree's real
   footprint. In brackets: the anonymous part (RssAnon, Pss_Anon) -- the rest is file-backed (libraries and the
   memory-mapped Arrow files and shards), which the kernel can drop under memory pressure.
3. **start**: ``python train.py experiment=owt_small <train_args> trainer.max_steps=1 ...`` on the prepared cache;
   the time from starting the process to reading its ``step 1/1`` progress line (printed at the end of the first
   optimiser step) -- or, without that line, the wall time to exit, an upper bound. Whether the run reused the
   shards (no new entry in the cache directory) is reported; if not, the time includes a preparation.
4. **train**: the same run for ``train_steps`` steps (one 1-batch validation at the end): the peak RSS (VmHWM) of
   the training process (in brackets its anonymous part; with the default tiny model it is mostly the imported
   libraries and the logits over the 50258-token vocabulary, the same for every corpus); the ratio of that peak
   on the largest corpus to the one on the smallest shows whether training memory depends on the corpus size (it
   should not: the shards are memory-mapped).

Every figure is compared with its target in ``targets`` (PASS/FAIL, never asserted). The table is printed and the
JSON (``{"settings", "environment", "sizes": [...], "checks": [...]}``) written atomically to ``output``. A
child that fails is reported (its last error line) and makes the exit status 1 once everything is written. Keys:
``configs/eval/data_scale.yaml``; bad input is one ``error:`` line and exit code 2, before anything runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from eval.common import (
    ROOT,
    CLIError,
    boolean,
    choice,
    integer,
    list_of,
    log,
    number,
    optional,
    output,
    text,
    write_json,
)
from eval.config_checks import hydra_main, validate
from eval.data_scale_monitor import run_child

STAGES = ("prepare", "start", "train")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
#: train.py keys set by the benchmark itself (not allowed in train_args).
OWN_KEYS = ("experiment", "run_dir", "data.path", "data.cache_dir", "model.length", "trainer.max_steps",
            "trainer.val_every", "trainer.log_every", "trainer.progress_bar", "data.valid_docs", "data.valid_fraction",
            "data.num_proc")


def size_bytes(value: object, name: str) -> int:
    """A size: an integer (bytes) or a number with a unit, 20MB, 2GB, 1.5GB, 512MiB (decimal unless ``i``)."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?", str(value).strip(), re.I)
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]) if m and not isinstance(value, bool) else 0
    if n < 1:
        raise CLIError(f"{name} must be a size such as 20MB, 200MB or 2GB (or a number of bytes); got {value!r}")
    return n


def label(n: int) -> str:
    """``2000000000`` -> ``2GB``, ``20000000`` -> ``20MB``; bytes when no unit gives a short exact number."""
    for unit, f in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= f and float(f"{n / f:g}") * f == n:
            return f"{n / f:g}{unit}"
    return f"{n}B"


def train_arg(value: object, name: str) -> str:
    arg = text(value, name)
    key = arg.split("=", 1)[0].lstrip("+~")
    if "=" not in arg or key in OWN_KEYS:
        raise CLIError(f"{name} must be a train.py override key=value, not one of {', '.join(OWN_KEYS)} (set by "
                       f"the benchmark); got {arg!r}")
    return arg


def output_or_auto(value: object, name: str) -> str | None:
    return None if value is None else "auto" if value == "auto" else output()(value, name)


#: Every key of configs/eval/data_scale.yaml and its check.
KEYS = {
    "sizes": list_of(size_bytes, "sizes=[200MB,2GB]"),
    "quick": boolean,
    "quick_sizes": list_of(size_bytes, "quick_sizes=[20MB]"),
    "quick_train_steps": integer(1),
    "work_dir": text,
    "keep": boolean,
    "stages": list_of(choice(*STAGES), "stages=[prepare,start,train]", empty=True),
    "seed": integer(0),
    "mean_doc_bytes": number(16),
    "doc_sigma": number(0, 3),
    "file_mb": number(0, low_open=True),
    "num_proc": integer(1),
    "model_length": integer(1),
    "valid_fraction": number(0, 1, low_open=True, high_open=True),
    "poll_s": number(0.01),
    "timeout_s": number(1),
    "train_steps": integer(1),
    "train_args": list_of(train_arg, "'train_args=[\"model=tiny\",\"data.batch_size=2\"]'", empty=True),
    "targets": {k: number(0, low_open=True) for k in ("corpus_mb_s", "prepare_rss_mb", "first_step_s", "rss_ratio")},
    "output": output_or_auto,
    "child": optional(choice("prepare")),
    "child_corpus": optional(text),
    "child_cache": optional(text),
}


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """The validated settings (plain Python values); raises :class:`CLIError` on bad input."""
    s = validate(cfg, KEYS)
    s["run_sizes"] = sorted(set(s["quick_sizes"] if s["quick"] else s["sizes"]))
    if s["quick"]:
        s["train_steps"] = s["quick_train_steps"]
    work = Path(os.path.expanduser(s["work_dir"]))
    s["work_dir"] = str(work if work.is_absolute() else ROOT / work)
    if s["output"] == "auto":
        s["output"] = str(ROOT / "docs" / "results" / f"data_scale{'_quick' if s['quick'] else ''}.json")
    if s["child"] and not (s["child_corpus"] and s["child_cache"]):
        raise CLIError("child=prepare needs child_corpus=DIR and child_cache=DIR")
    return s


# ---------------------------------------------------------------------------------------------- child processes


def _error(r: dict[str, Any], name: str) -> dict[str, Any]:
    """``error`` (one line: the child's last stderr line) and ``stderr_tail`` (its last 30 lines)."""
    err = [t for _, t in r["stderr"] if t.strip()]
    why = "timed out" if r["timed_out"] else f"exit code {r['returncode']}"
    return {"error": f"{name} failed ({why}): {err[-1] if err else 'no output'}", "stderr_tail": err[-30:]}


def _hydra_value(value: str) -> str:
    return value if re.fullmatch(r"[\w./~+-]+", value) else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --------------------------------------------------------------------------------------------------- the stages


def prepare_in_process(s: dict[str, Any]) -> dict[str, Any]:
    """``child=prepare``: prepare the shards of ``child_corpus`` in ``child_cache``; the result row."""
    t0 = time.perf_counter()
    from bd3lm.data import ShardOptions, open_split, prepare_shards, read_index
    from bd3lm.tokenizer import load_tokenizer

    t1 = time.perf_counter()
    tokenizer = load_tokenizer("gpt2")
    opts = ShardOptions(model_length=s["model_length"], insert_eos=True, valid_fraction=s["valid_fraction"],
                        valid_docs=None, text_field="text", dtype="auto")
    t2 = time.perf_counter()
    shard_dir = prepare_shards(s["child_corpus"], tokenizer, opts, cache_dir=s["child_cache"], num_proc=s["num_proc"])
    t3 = time.perf_counter()
    index, train = read_index(shard_dir), open_split(shard_dir, "train")
    for i in (0, len(train) - 1):  # the first and last chunks read back as (model_length,) int64
        chunk = train[i]
        if tuple(chunk.shape) != (s["model_length"],) or str(chunk.dtype) != "torch.int64":
            raise ValueError(f"train chunk {i} has shape {tuple(chunk.shape)} and dtype {chunk.dtype}")
    splits = index["splits"].values()
    return {"import_s": t1 - t0, "tokenizer_s": t2 - t1, "prepare_s": t3 - t2, "shard_dir": str(shard_dir),
            "dtype": index["dtype"], "train_chunks": len(train), "valid_chunks": index["splits"]["valid"]["num_chunks"],
            "documents": sum(sp["documents"] for sp in splits),
            "tokens": sum(sh["tokens"] for sp in splits for sh in sp["shards"])
            + sum(sp["tokens_dropped"] for sp in splits),
            "shard_mb": sum(f.stat().st_size for f in Path(shard_dir).glob("*.bin")) / 1e6}


def prepare(s: dict[str, Any], corpus: dict[str, Any], cache: Path) -> dict[str, Any]:
    shutil.rmtree(cache, ignore_errors=True)  # a measurement of a real preparation, never a cache hit
    cmd = [sys.executable, "-m", "eval.data_scale", "child=prepare", f"child_corpus={_hydra_value(corpus['dir'])}",
           f"child_cache={_hydra_value(str(cache))}"] + [f"{k}={s[k]}" for k in ("num_proc", "model_length",
                                                                                  "valid_fraction")]
    r = run_child(cmd, poll_s=s["poll_s"], timeout_s=s["timeout_s"], name="prepare")
    out = {k: r[k] for k in ("wall_s", "peak_mb", "maxrss_mb", "samples", "at_peak")}
    try:
        row = json.loads(r["stdout"][-1][1]) if r["returncode"] == 0 and r["stdout"] else None
    except ValueError:
        row = None
    if row is None:
        return {**out, **_error(r, "prepare_shards")}
    return {**out, **row, "text_mb_s": corpus["text_bytes"] / 1e6 / row["prepare_s"],
            "tokens_per_s": row["tokens"] / row["prepare_s"]}


def train_run(s: dict[str, Any], corpus: dict[str, Any], cache: Path, run_dir: Path, steps: int) -> dict[str, Any]:
    """``train.py`` for ``steps`` steps on the corpus and cache: first-step time, peak RSS, shard reuse."""
    shutil.rmtree(run_dir, ignore_errors=True)
    before = set(os.listdir(cache)) if cache.is_dir() else set()
    cmd = [sys.executable, "train.py", "experiment=owt_small", *s["train_args"], f"model.length={s['model_length']}",
           f"trainer.max_steps={steps}", f"trainer.val_every={steps}", "trainer.log_every=1",
           "trainer.progress_bar=lines", f"run_dir={_hydra_value(str(run_dir))}",
           f"data.path={_hydra_value(corpus['dir'])}", f"data.cache_dir={_hydra_value(str(cache))}",
           "data.valid_docs=null", f"data.valid_fraction={s['valid_fraction']}", f"data.num_proc={s['num_proc']}"]
    r = run_child(cmd, poll_s=s["poll_s"], timeout_s=s["timeout_s"], name=f"train.py ({steps} steps)")
    new = sorted(set(os.listdir(cache)) - before) if cache.is_dir() else ["(no cache directory)"]
    steps_seen = [(t, int(m.group(1))) for t, line in r["stdout"] if (m := re.match(r"step (\d+)/\d+", line))]
    ready = next((t for t, line in r["stdout"] if line.startswith("bd3lm:")), None)
    out = {"command": " ".join(cmd[1:]), **{k: r[k] for k in ("wall_s", "peak_mb", "maxrss_mb", "samples", "at_peak")},
           "shards_reused": not new, "new_cache_entries": new, "ready_s": ready,
           "first_step_s": steps_seen[0][0] if steps_seen and steps_seen[0][1] == 1 else None,
           "first_step_upper_bound": not (steps_seen and steps_seen[0][1] == 1)}
    if r["returncode"] != 0:
        out.update(_error(r, "train.py"))
    elif out["first_step_s"] is None and steps == 1:
        out["first_step_s"] = r["wall_s"]  # no progress line: the wall time to exit bounds it from above
    return out


def measure_size(s: dict[str, Any], n: int) -> dict[str, Any]:
    from eval.data_scale_corpus import write_corpus

    lab, work = label(n), Path(s["work_dir"])
    corpus_dir, cache = work / "corpora" / f"owt-{lab}-seed{s['seed']}", work / "cache" / lab
    log(f"[{lab}] corpus {corpus_dir}")
    m = write_corpus(corpus_dir, n, seed=s["seed"], mean_doc_bytes=s["mean_doc_bytes"], sigma=s["doc_sigma"],
                     file_bytes=int(s["file_mb"] * 1e6), log=log)
    corpus = {"dir": str(corpus_dir), **{k: m[k] for k in ("reused", "docs", "text_bytes", "file_bytes", "seconds",
                                                          "setup_seconds", "mb_per_s", "doc_bytes")},
              "files": len(m["files"])}
    log(f"[{lab}] corpus: {corpus['text_bytes'] / 1e6:.0f} MB of text, {corpus['docs']} documents, "
        + ("reused" if m["reused"] else f"written at {corpus['mb_per_s']:.0f} MB/s"))
    row: dict[str, Any] = {"size": lab, "size_bytes": n, "corpus": corpus}
    if "prepare" in s["stages"]:
        p = row["prepare"] = prepare(s, corpus, cache)
        log(f"[{lab}] prepare: " + p.get("error", f"{p.get('prepare_s', 0):.1f} s, {p.get('text_mb_s', 0):.2f} MB/s, "
                                                 f"peak RSS {p['peak_mb']['main_rss']:.0f} MB main, "
                                                 f"{p['peak_mb']['tree_rss']:.0f} MB tree"))
    if "error" not in row.get("prepare", {}):
        for stage, steps in (("start", 1), ("train", s["train_steps"])):
            if stage in s["stages"]:
                r = row[stage] = train_run(s, corpus, cache, work / "runs" / f"{lab}-{stage}", steps)
                log(f"[{lab}] {stage}: " + r.get("error", f"first step {r['first_step_s']} s, wall {r['wall_s']:.1f}"
                                                         f" s, peak RSS {r['peak_mb']['main_rss']:.0f} MB, shards "
                                                         f"reused {r['shards_reused']}"))
    if not s["keep"]:
        shutil.rmtree(cache, ignore_errors=True)
        for stage in ("start", "train"):
            shutil.rmtree(work / "runs" / f"{lab}-{stage}", ignore_errors=True)
    return row


# ------------------------------------------------------------------------------------------------------ report


def _verdict(value: float | None, target: float, higher_is_better: bool = False) -> str:
    if value is None:
        return "n/a"
    return "PASS" if (value > target if higher_is_better else value < target) else "FAIL"


def checks(s: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per figure: size, what, value (text), target (text), verdict (PASS, FAIL, n/a, ERROR)."""
    t, out = s["targets"], []

    def add(size, what, value, shown, target=None, verdict="", higher=False):
        if target is not None and not verdict:
            verdict = _verdict(value, target, higher)
        out.append({"size": size, "what": what, "value": value, "shown": shown, "verdict": verdict,
                    "target": None if target is None else ("> " if higher else "< ") + f"{target:g}"})

    for r in rows:
        c, z = r["corpus"], r["size"]
        add(z, "corpus writing (MB of text/s)", None if c["reused"] else c["mb_per_s"],
            "reused" if c["reused"] else f"{c['mb_per_s']:.0f}", t["corpus_mb_s"], higher=True)
        p = r.get("prepare")
        if p and "error" in p:
            add(z, "prepare_shards", None, p["error"][:90], verdict="ERROR")
        elif p:
            add(z, "prepare: prepare_shards / process wall (s)", p["prepare_s"],
                f"{p['prepare_s']:.1f} / {p['wall_s']:.1f}")
            add(z, "prepare: throughput (MB text/s, tokens/s)", p["text_mb_s"],
                f"{p['text_mb_s']:.2f}, {p['tokens_per_s']:,.0f}")
            pk = p["peak_mb"]
            add(z, "prepare: peak RSS, main process (MB; anonymous)", pk["main_rss"],
                f"{pk['main_rss']:.0f} ({pk['main_anon']:.0f})", t["prepare_rss_mb"])
            add(z, f"prepare: peak RSS summed over the tree (MB; {pk['processes']} processes)", pk["tree_rss"],
                f"{pk['tree_rss']:.0f}", t["prepare_rss_mb"])
            add(z, "prepare: peak PSS summed over the tree (MB; anonymous)", pk["tree_pss"],
                f"{pk['tree_pss']:.0f} ({pk['tree_pss_anon']:.0f})", t["prepare_rss_mb"])
        for stage, what in (("start", "start: python train.py -> first step (s)"),
                            ("train", f"train: {s['train_steps']} steps, peak RSS (MB; anonymous)")):
            g = r.get(stage)
            if g is None:
                continue
            if "error" in g:
                add(z, what, None, g["error"][:90], verdict="ERROR")
                continue
            if stage == "start":
                v = g["first_step_s"]
                shown = "none" if v is None else f"{'<= ' if g['first_step_upper_bound'] else ''}{v:.1f}"
                add(z, what, v, shown + ("" if g["shards_reused"] else " (shards re-prepared)"), t["first_step_s"])
            else:
                pk = g["peak_mb"]
                add(z, what, pk["main_rss"], f"{pk['main_rss']:.0f} ({pk['main_anon']:.0f})")
    trained = [r for r in rows if r.get("train") and "error" not in r["train"]]
    if len(trained) >= 2:
        lo, hi = trained[0], trained[-1]
        ratio = hi["train"]["peak_mb"]["main_rss"] / lo["train"]["peak_mb"]["main_rss"]
        add(f"{hi['size']}/{lo['size']}", "train: peak RSS ratio, largest / smallest corpus", ratio, f"{ratio:.3f}",
            t["rss_ratio"])
    return out


def print_table(lines: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=160)
    table = Table(title=title)
    for col in ("size", "measurement", "value", "target", "result"):
        table.add_column(col, justify="right" if col in ("value", "target") else "left")
    for c in lines:
        table.add_row(c["size"], c["what"], c["shown"], c["target"] or "", c["verdict"])
    console.print(table)


def run_data_scale(cfg: DictConfig) -> dict[str, Any]:
    """Measure every size (see the module docstring), print the table, write ``output``; with ``child=prepare``,
    prepare one corpus in this process and print its result as one JSON line."""
    s = check_config(cfg)
    if s["child"] == "prepare":
        row = prepare_in_process(s)
        print(json.dumps(row), flush=True)
        return row
    log(f"data_scale: sizes {', '.join(map(label, s['run_sizes']))}, stages {', '.join(s['stages']) or 'corpus'}, "
        f"work_dir {s['work_dir']}")
    t0 = time.perf_counter()
    rows = [measure_size(s, n) for n in s["run_sizes"]]
    lines = checks(s, rows)
    from bd3lm.evaluation.speed import environment

    settings = {k: v for k, v in s.items() if not k.startswith("child")}
    result = {"settings": {**settings, "seconds": time.perf_counter() - t0}, "environment": environment(),
              "sizes": rows, "checks": lines}
    print_table(lines, f"training data at scale: {', '.join(map(label, s['run_sizes']))}, GPT-2 tokenizer, "
                       f"L={s['model_length']}, num_proc={s['num_proc']}, {os.cpu_count()} CPUs")
    if s["output"] is not None:
        write_json(s["output"], result)
        log(f"wrote {s['output']}")
    errors = [c for c in lines if c["verdict"] == "ERROR"]
    if errors:
        log(f"error: {len(errors)} stage(s) failed; first: {errors[0]['size']} {errors[0]['shown']}")
        sys.exit(1)
    return result


main = hydra_main("data_scale", run_data_scale)

if __name__ == "__main__":
    main()

"""The block-size sweep: the paper's table in miniature, on this machine.

    python -m eval.sweep [budget=1200000 out_dir=runs/sweep results_dir=docs/results stage=all|train|eval ...]

Trains AR, BD3-LM at each ``block_sizes`` and MDLM of one size on the same data and token budget, plus BD3-LM
``finetune_block_size`` fine-tuned from the MDLM run with ``finetune_fraction`` of the budget (the paper's
recipe). Each model is trained by ``train.py experiment=sweep`` in its own process and run directory; a model
whose run directory holds a finished export for the same command line is not retrained (a larger ``budget``
resumes it from its last checkpoint). Every model is then evaluated with :func:`bd3lm.evaluation.likelihood`
(NELBO perplexity bound on the validation split), :func:`bd3lm.evaluation.sample_quality` (gen-PPL under the
offline judge) and :func:`bd3lm.evaluation.speed` (tokens/s at batch 1), and the results go to
``results_dir``: ``sweep.json`` (one row per model), ``sweep.md`` and ``sweep.png`` (the Pareto plot).
Optionally the long-document table (``long_docs.*``) and the variable-length statistics (``lengths.*``).
See ``configs/eval/sweep.yaml`` for every option.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eval.common import (
    ROOT,
    TOP_P_RULES,
    CLIError,
    boolean,
    choice,
    integer,
    judge,
    list_of,
    log,
    number,
    optional,
    text,
    write_json,
    write_text,
)
from eval.config_checks import hydra_main, validate
from eval.ppl import PROTOCOLS
from eval.sweep_report import markdown_table, pareto_plot

RESUMABLE = ("trainer.max_steps=", "trainer.val_every=")  # overrides a larger budget may change on resume
#: Every key of configs/eval/sweep.yaml and its check (block sizes against model_length in plan()).
KEYS = {
    "budget": integer(),
    "finetune_fraction": number(0, 1, low_open=True),
    "block_sizes": list_of(integer(), "block_sizes=[4,8,16]"),
    "finetune_block_size": integer(),
    "out_dir": text,
    "results_dir": text,
    "stage": choice("all", "train", "eval"),
    "experiment": text,
    "train_overrides": list_of(text, "'train_overrides=[trainer.accelerator=cpu]'", single=False, empty=True),
    "seed": integer(0),
    "threads": optional(integer()),
    "ppl": {"protocol": choice(*PROTOCOLS), "num_samples": integer(), "max_sequences": integer()},
    "genppl": {"judge": judge, "num_samples": integer(), "batch_size": integer(),
               "top_p": number(0, 1, low_open=True), "top_p_rule": choice(*TOP_P_RULES)},
    "speed": {"repeats": integer()},
    "long_docs": {"enabled": boolean, "factors": list_of(integer(), "long_docs.factors=[1,4,10]"),
                  "num_samples": integer()},
    "lengths": {"enabled": boolean, "num_samples": integer(), "max_factor": integer()},
}


@dataclass(frozen=True)
class SweepModel:
    """One model of the sweep: ``algo`` (ar | bd3lm | mdlm), its block size and its parent run (or scratch)."""

    name: str
    algo: str
    block_size: int
    init: str = "scratch"
    fraction: float = 1.0


def train_shape(cfg: DictConfig) -> tuple[int, int]:
    """``(model_length, tokens per optimiser step)`` of the experiment with the sweep's train overrides."""
    return _shape(str(cfg.experiment), tuple(str(o) for o in cfg.train_overrides))


@functools.lru_cache(maxsize=8)
def _shape(experiment: str, overrides: tuple[str, ...]) -> tuple[int, int]:
    sys.path.insert(0, str(ROOT))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT))
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()  # inside @hydra.main: set the CLI's Hydra aside while composing train.yaml
    saved = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        tc = train.compose_config([f"experiment={experiment}", *overrides])
    finally:
        gh.clear()
        if saved is not None:
            gh.initialize(saved)
    length = int(tc.model.length)
    return length, int(tc.data.batch_size) * int(tc.trainer.accumulate_grad_batches) * int(tc.trainer.devices) * length


def plan(cfg: DictConfig) -> list[SweepModel]:
    """The models of the sweep, parents before children."""
    sizes = [int(b) for b in cfg.block_sizes]
    if not sizes:
        raise CLIError("block_sizes is empty: give at least one BD3-LM block size, e.g. [4, 8, 16]")
    length = train_shape(cfg)[0]
    for b in sizes + [int(cfg.finetune_block_size)]:
        if b < 1 or length % b:
            raise CLIError(f"block size {b} must divide the sweep's model_length {length}")
    frac = float(cfg.finetune_fraction)
    if not 0 < frac <= 1:
        raise CLIError(f"finetune_fraction must be in (0, 1]; got {frac}")
    models = [SweepModel("ar", "ar", 1)]
    models += [SweepModel(f"bd3lm_{b}", "bd3lm", b) for b in sizes]
    models.append(SweepModel("mdlm", "mdlm", length))
    fb = int(cfg.finetune_block_size)
    models.append(SweepModel(f"bd3lm_{fb}_ft", "bd3lm", fb, init="mdlm", fraction=frac))
    return models


def steps_of(cfg: DictConfig, m: SweepModel) -> int:
    budget = int(cfg.budget)
    per_step = train_shape(cfg)[1]
    if budget < per_step:
        raise CLIError(f"budget {budget} is below one training step ({per_step} tokens)")
    return max(1, round(budget * m.fraction / per_step))


def overrides_of(cfg: DictConfig, m: SweepModel, out: Path) -> list[str]:
    """train.py's command line for model ``m``."""
    steps = steps_of(cfg, m)
    ov = [
        f"experiment={cfg.experiment}",
        f"algo={m.algo}",
        f"run_dir={out / m.name}",
        f"seed={int(cfg.seed) + 1}",
        f"trainer.max_steps={steps}",
        f"trainer.val_every={max(1, steps // 3)}",
    ]
    if m.algo == "bd3lm":
        ov += [f"algo.block_size={m.block_size}", "algo.search_batches=1"]
    if m.init != "scratch":
        ov.append(f"init_from={out / m.init / 'hf'}")
    return ov + [str(o) for o in cfg.train_overrides]


def _fixed(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(RESUMABLE)]


def _steps(overrides: list[str]) -> int:
    return int(next(o for o in overrides if o.startswith("trainer.max_steps=")).split("=", 1)[1])


def train_model(cfg: DictConfig, m: SweepModel, out: Path) -> Path:
    """Train ``m`` with train.py in a child process, unless it is already trained with the same command line.

    The run directory's ``sweep_done.json`` records the command line, the parent's and whether training finished.
    Same everything: kept. Only a larger budget (max_steps): resumed from ``last.ckpt``. Anything else (another
    model, seed, override, a smaller budget, a retrained parent): the directory is removed and trained afresh.
    """
    run_dir = out / m.name
    marker = run_dir / "sweep_done.json"
    key = {"overrides": overrides_of(cfg, m, out), "parent": None}
    if m.init != "scratch":
        parent = out / m.init / "sweep_done.json"
        key["parent"] = json.loads(parent.read_text())["overrides"] if parent.is_file() else None
    done = json.loads(marker.read_text()) if marker.is_file() else None
    if done is None and run_dir.exists():
        raise CLIError(f"{run_dir} exists but was not written by eval.sweep: remove it or choose another out_dir")
    if done is not None:
        same = {k: done.get(k) for k in key} == key
        if same and done.get("state") == "done" and (run_dir / "hf").is_dir():
            log(f"sweep: {m.name} already trained ({run_dir}), kept")
            return run_dir / "hf"
        resumable = (_fixed(done["overrides"]) == _fixed(key["overrides"]) and done.get("parent") == key["parent"]
                     and _steps(done["overrides"]) <= _steps(key["overrides"]))
        if not resumable:
            log(f"sweep: {m.name} was trained with other settings: training it afresh")
            shutil.rmtree(run_dir)
    ov = key["overrides"]
    write_json(marker, {**key, "state": "running"})
    log(f"sweep: training {m.name}: python train.py {' '.join(ov)}")
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *ov], cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise CLIError(f"training {m.name} failed with exit code {proc.returncode} (see its output above)")
    write_json(marker, {**key, "state": "done", "seconds": time.perf_counter() - t0})
    return run_dir / "hf"


def evaluate_model(cfg: DictConfig, m: SweepModel, hf: Path, judge) -> dict:
    """One row of the sweep table: likelihood bound, sample quality and speed of the trained model."""
    from bd3lm.evaluation import likelihood, load_checkpoint, sample_quality, speed, validation_chunks

    model, tok = load_checkpoint(hf)
    info = json.loads((hf / "training_info.json").read_text()) if (hf / "training_info.json").is_file() else {}
    train_cfg = OmegaConf.load(hf.parent / "config.yaml")
    chunks = validation_chunks(train_cfg, tok)
    p = cfg.ppl
    lik = likelihood(model, chunks, protocol=str(p.protocol), num_samples=int(p.num_samples),
                     max_sequences=int(p.max_sequences), seed=int(cfg.seed))
    g = cfg.genppl
    q = sample_quality(model, tok, judge, num_samples=int(g.num_samples), batch_size=int(g.batch_size),
                       top_p=float(g.top_p), top_p_rule=str(g.top_p_rule), seed=int(cfg.seed))
    # one context per sample: BOS + (model_length - 1) new tokens, so MDLM denoises exactly one window too
    sp = speed(model, batch_size=1, new_tokens=model.config.model_length - 1, repeats=int(cfg.speed.repeats), warmup=2,
               bos_token_id=tok.bos_token_id, sampler="first_hitting")
    own = int(info.get("tokens", steps_of(cfg, m) * train_shape(cfg)[1]))
    parent_tokens = 0
    if m.init != "scratch":  # the fine-tune's cost includes its pretrain
        pinfo = hf.parent.parent / m.init / "hf" / "training_info.json"
        parent_tokens = int(json.loads(pinfo.read_text()).get("tokens", 0)) if pinfo.is_file() else 0
    return {
        "model": m.algo,
        "name": m.name,
        "block_size": m.block_size,
        "init": m.init,
        "ppl": lik.ppl,
        "ppl_ci95": list(lik.ppl_ci95),
        "nll": lik.nll,
        "nll_se": lik.se,
        "ppl_exact": lik.exact,
        "gen_ppl": q.gen_ppl,
        "gen_ppl_pooled": q.pooled_ppl,
        "entropy": q.entropy,
        "nfe": q.nfe_per_sample,
        "tokens_per_forward": q.tokens_per_forward,
        "tokens_per_s": sp.tokens_per_s,
        "train_tokens": own,
        "total_train_tokens": own + parent_tokens,
        "val_nll_in_training": info.get("val_nll"),
        "train_seconds": json.loads((hf.parent / "sweep_done.json").read_text()).get("seconds")
        if (hf.parent / "sweep_done.json").is_file() else None,
    }


def reference_quality(judge, hf: Path, num: int, seed: int) -> dict:
    """The judge's gen-PPL of real validation text (one context per text, as a sample) and of the same text with
    its words shuffled: the two ends of the scale that the samples' gen-PPL sits on."""
    import random
    import statistics

    from bd3lm.evaluation import load_checkpoint, score_texts, to_judge_ids, validation_chunks
    from bd3lm.evaluation.sample_quality import score_ids

    _, tok = load_checkpoint(hf)
    chunks = validation_chunks(OmegaConf.load(hf.parent / "config.yaml"), tok)
    step = max(1, chunks.shape[0] // num)
    picked = [chunks[i, 1:].tolist() for i in range(0, chunks.shape[0], step)][:num]  # as a sample after BOS
    real = [score_ids(judge, to_judge_ids(ids, tok, judge)) for ids in picked]
    rng = random.Random(seed)
    shuffled = []
    for ids in picked:
        words = tok.decode(ids, skip_special_tokens=True).split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    mixed = score_texts(judge, shuffled)
    texts = picked
    return {"texts": len(texts), "data_gen_ppl": statistics.fmean(s.ppl for s in real),
            "data_entropy": statistics.fmean(s.entropy for s in real),
            "shuffled_gen_ppl": statistics.fmean(s.ppl for s in mixed)}


def sweep(cfg: DictConfig) -> list[dict]:
    """Train (or keep) every model, evaluate it, write the results; returns the rows."""
    validate(cfg, KEYS)
    out = (ROOT / str(cfg.out_dir)).resolve() if not os.path.isabs(str(cfg.out_dir)) else Path(str(cfg.out_dir))
    results = (ROOT / str(cfg.results_dir)) if not os.path.isabs(str(cfg.results_dir)) else Path(cfg.results_dir)
    for key, path in (("out_dir", out), ("results_dir", results)):
        if path.exists() and not path.is_dir():
            raise CLIError(f"{key} {str(path)!r} is a file; expected a directory")
    models = plan(cfg)
    for m in models:
        steps_of(cfg, m)
    hf = {}
    if cfg.stage in ("all", "train"):
        for m in models:
            hf[m.name] = train_model(cfg, m, out)
    if cfg.stage == "train":
        return []
    for m in models:
        hf.setdefault(m.name, out / m.name / "hf")
        if not (hf[m.name] / "config.json").is_file():
            raise CLIError(f"model {m.name} is not trained yet ({hf[m.name]} is missing): run stage=train first")
    import torch

    from bd3lm.evaluation import load_judge

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    judge = load_judge(str(cfg.genppl.judge))
    rows = []
    for m in models:
        log(f"sweep: evaluating {m.name}")
        rows.append(evaluate_model(cfg, m, hf[m.name], judge))
        log("  " + json.dumps({k: rows[-1][k] for k in ("ppl", "gen_ppl", "entropy", "nfe", "tokens_per_s")}))
    ref = reference_quality(judge, hf[models[0].name], int(cfg.genppl.num_samples), int(cfg.seed))
    settings = {"budget": int(cfg.budget), "models": [asdict(m) for m in models], "judge_reference": ref,
                **environment()}
    write_json(results / "sweep.json", rows)
    write_json(results / "sweep_settings.json", {**settings, "config": OmegaConf.to_container(cfg)})
    write_text(results / "sweep.md", markdown_table(rows, ref))
    pareto_plot(rows, results / "sweep.png")
    print(markdown_table(rows, ref))
    first = next(m for m in models if m.algo == "bd3lm" and m.init == "scratch")
    if cfg.long_docs.enabled:
        from bd3lm.evaluation import load_checkpoint, long_documents
        from eval.long_docs import report as long_report

        model, tok = load_checkpoint(hf[first.name])
        ld = long_documents(model, tok, judge, factors=[int(f) for f in cfg.long_docs.factors],
                            num_samples=int(cfg.long_docs.num_samples), seed=int(cfg.seed))
        long_report(ld, results / "long_docs", title=f"{first.name}, L = {model.config.model_length}")
    if cfg.lengths.enabled:
        from bd3lm.evaluation import length_statistics, load_checkpoint
        from eval.lengths import report as lengths_report

        big = max((m for m in models if m.algo == "bd3lm" and m.init == "scratch"), key=lambda m: m.block_size)
        model, tok = load_checkpoint(hf[big.name])
        st = length_statistics(model, tok, num_samples=int(cfg.lengths.num_samples),
                               max_new_tokens=int(cfg.lengths.max_factor) * model.config.model_length,
                               seed=int(cfg.seed))
        lengths_report(st, results / "lengths", title=big.name)
    return rows


def environment() -> dict:
    import platform

    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


main = hydra_main("sweep", sweep)

if __name__ == "__main__":
    main()

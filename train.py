"""Train a BD3-LM (or its MDLM / AR baselines) with Lightning, configured by Hydra.

    python train.py experiment=smoke run_dir=DIR [key=value ...]
    python train.py experiment=quickstart                 # the demo model, into runs/quickstart
    python train.py experiment=smoke algo=mdlm run_dir=PRE   # pretrain at block size L (MDLM)
    python train.py experiment=smoke init_from=PRE/hf algo.block_size=4   # fine-tune it at L' = 4
    python train.py experiment=smoke run_dir=DIR mode=export  # re-export DIR/hf from its last.ckpt
    python train.py experiment=owt_small data.path=OWT mode=prepare   # tokenise into the shard cache, then stop
    python train.py experiment=smoke --cfg                 # print the composed configuration

Everything a run writes is under ``run_dir``: ``checkpoints/{last,best-*}.ckpt``, ``hf/`` (the EMA weights in
the Hugging Face layout + tokenizer), ``tokenizer/``, ``csv/version_N/metrics.csv``, ``tb/`` (TensorBoard),
``config.yaml``, ``training_curves.png``, ``clip_search.jsonl``, ``ranks/``. Running the same command again
resumes from ``last.ckpt`` (a resume may change only the settings listed in ``bd3lm/training/run_dir.py``). One
process at a time owns a run_dir (``run_dir/.lock``). SIGTERM/SIGINT stop at the end of the current step
with a checkpoint (exit status 143/130; no export); a NaN/inf loss or weight stops the run without saving.
Errors are one ``error: ...`` line on stderr with exit status 1, or 2 when the run is refused (run_dir in
use, configuration changed on resume); set ``BD3LM_DEBUG=1`` for the traceback. Configuration groups live
in ``configs/`` (``train.yaml`` is the root); Hydra composes them (``@hydra.main``) and builds the network,
training settings, optimizer, data module and strategy from their ``_target_`` nodes (``hydra.utils.instantiate``).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

import hydra

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent
CONFIG_DIR = REPO / "configs"


class ConfigError(ValueError):
    """Invalid configuration or command line."""


def one_line(exc: BaseException) -> str:
    """An exception as one line (multi-line Hydra/torch messages are joined)."""
    msg = " ".join(str(exc).split())
    for tail in (" Set the environment variable HYDRA_FULL_ERROR=1", " Config search path:"):
        msg = msg.split(tail)[0]
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).split()[0] not in msg:
        msg += f" ({str(cause).strip().splitlines()[0].strip()})"
    return msg or type(exc).__name__


def compose_config(argv: list[str]):
    """``configs/train.yaml`` composed with the overrides (Hydra's compose API: errors stay exceptions)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
        return compose(config_name="train", overrides=list(argv))


def _positive(cfg, key: str) -> int:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer; got {value!r}")
    return value


POSITIVE = ("model.length", "algo.block_size", "model.hidden_dim", "model.n_blocks", "model.n_heads", "model.cond_dim",
            "data.batch_size", "data.eval_batch_size", "trainer.max_steps", "trainer.val_every", "trainer.log_every",
            "trainer.accumulate_grad_batches")
CHOICES = {"mode": ("train", "export", "prepare"), "strategy.name": ("auto", "ddp", "fsdp"),
           "trainer.progress_bar": ("auto", "rich", "lines", "none"), "optim.schedule": ("constant", "cosine")}
NUMBERS = ("optim.lr", "optim.eps", "optim.weight_decay", "optim.betas", "algo.clip_widths")  # lists: every item


def _numbers(cfg, key: str) -> None:
    """``key`` is a number (or, for a list key, a non-empty list of numbers): checked before the run dir is written,
    since ``instantiate`` passes any value on and a wrong one would first fail steps into training."""
    from omegaconf import OmegaConf

    value, listed = OmegaConf.select(cfg, key), key in ("optim.betas", "algo.clip_widths")
    items = list(value) if OmegaConf.is_list(value) else [value]
    if not items or OmegaConf.is_list(value) != listed or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise ConfigError(f"{key} must be {'a list of numbers' if listed else 'a number'}; got {value!r}")


def validate_config(cfg) -> None:
    """Cheap checks before anything is written (so bad input leaves no partial run behind)."""
    from omegaconf import OmegaConf

    for key in POSITIVE + (("trainer.ckpt_every",) if cfg.trainer.ckpt_every is not None else ()):
        _positive(cfg, key)
    for key in NUMBERS:
        _numbers(cfg, key)
    if cfg.model.length % cfg.algo.block_size:
        raise ConfigError(f"model.length {cfg.model.length} is not a multiple of algo.block_size {cfg.algo.block_size}")
    for key, allowed in CHOICES.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {OmegaConf.select(cfg, key)!r}")
    if cfg.strategy.name == "fsdp" and cfg.ema.decay and cfg.strategy.spec.state_dict_type != "full":
        raise ConfigError("ema.decay with strategy=fsdp needs strategy.spec.state_dict_type=full")
    from bd3lm.graphs import check_family
    from bd3lm.schedules import get_schedule

    get_schedule(cfg.noise.name)
    a = cfg.algo
    graph, loss = str(a.get("graph", "absorbing")), str(a.get("loss", "subs"))
    try:
        check_family(graph, loss, a.get("p_m"))
    except ValueError as e:
        raise ConfigError(f"algo: {e}") from None
    if loss != "subs" and bool(a.causal):
        raise ConfigError(f"algo.loss={loss} needs a diffusion model; the autoregressive algo (causal) has none")
    if loss != "subs" and bool(a.var_min):
        raise ConfigError(f"algo.var_min (the clipped-schedule search) applies to loss=subs; got algo.loss={loss}")
    if str(a.get("cedd_weight", "one")) not in ("one", "log"):
        raise ConfigError(f"algo.cedd_weight must be one or log; got {a.get('cedd_weight')!r}")


def prepare_run_dir(cfg) -> tuple[Path, bool]:
    """Create ``run_dir`` and check that it is writable; returns it and whether it was created now."""
    run_dir = Path(os.path.expanduser(str(cfg.run_dir))).resolve()
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} is not writable ({e.strerror or e})") from None
    return run_dir, created


def init_source(cfg, resume: bool) -> str | None:
    """Where a fresh start takes its weights and tokenizer from (None: from scratch, or a resume): a local directory
    or ``.ckpt`` as given, else a Hub id through the local Hub cache (:func:`bd3lm.hub.resolve_model_dir`)."""
    if resume or not cfg.init_from:
        return None
    name = str(cfg.init_from)
    if os.path.exists(os.path.expanduser(name)):
        return os.path.expanduser(name)
    from bd3lm.hub import resolve_model_dir

    try:
        return str(resolve_model_dir(name))
    except OSError as exc:
        raise ConfigError(f"init_from: {one_line(exc)}") from None


def group_defaults(stored: Mapping) -> dict:
    """The default configuration of the config groups ``stored`` was composed from (for the keys an old
    ``config.yaml`` lacks, see :func:`bd3lm.training.run_dir.check_resume_config`)."""
    from omegaconf import OmegaConf

    overrides = [
        f"{group}={stored[group]['name']}"
        for group in ("model", "algo", "noise", "data", "strategy")
        if isinstance(stored.get(group), Mapping)
        and (CONFIG_DIR / group / f"{stored[group].get('name')}.yaml").is_file()
    ]
    return OmegaConf.to_container(compose_config(overrides), resolve=True)


def export_from_checkpoint(cfg, run_dir: Path, tokenizer) -> Path:
    """``mode=export``: write ``run_dir/hf`` from ``last.ckpt`` (EMA weights) without training."""
    from bd3lm.training.build import build_model
    from bd3lm.training.checkpoint import export_hf, inspect_checkpoint, read_state_dict

    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"nothing to export: {last} does not exist")
    ckpt = inspect_checkpoint(last)
    model = build_model(cfg, tokenizer)
    model.load_state_dict(read_state_dict(last), strict=True)
    info = {"step": int(ckpt.get("global_step", 0)), **ckpt["bd3lm"].get("last_val", {})}
    return export_hf(model, run_dir / "hf", tokenizer=tokenizer, info=info)


def run(cfg) -> dict:
    """Train (export, prepare) according to ``cfg``; returns the summary. Holds the run_dir lock throughout (global
    rank 0) and refuses a configuration the run_dir was not started with before writing anything."""
    validate_config(cfg)
    from omegaconf import OmegaConf

    from bd3lm.faults import Interrupted
    from bd3lm.training.run_dir import check_resume_config, owns_run_dir, run_dir_lock

    run_dir, created = prepare_run_dir(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    owner = owns_run_dir()
    try:
        with run_dir_lock(run_dir, created=created, owner=owner):
            resume = last.is_file()
            check_resume_config(run_dir, OmegaConf.to_container(cfg, resolve=True), resuming=resume,
                                defaults=group_defaults)
            return _run(cfg, run_dir, resume=resume, owner=owner)
    except Interrupted as e:  # raised by the signal handlers of main() outside the training loop
        raise e.located(step=None, checkpoint=last) from None


def commit_start(cfg, run_dir: Path, tokenizer, *, global_zero: bool) -> None:
    """Write the tokenizer (first start) and ``config.yaml`` once everything has loaded: a start that fails earlier
    writes nothing that a rerun would reuse."""
    from omegaconf import OmegaConf

    from bd3lm.atomic import write_text_atomic
    from bd3lm.training.data import local_rank_from_env, save_run_tokenizer

    if local_rank_from_env() == 0:
        save_run_tokenizer(tokenizer, run_dir)
    if global_zero:
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _run(cfg, run_dir: Path, *, resume: bool, owner: bool) -> dict:
    import lightning as L
    from hydra.utils import instantiate
    from transformers.utils import logging as hf_logging

    from bd3lm.data import resolve_cache_dir
    from bd3lm.training.build import build_model, build_trainer, quiet_lightning, resolve_precision
    from bd3lm.training.callbacks import plot_metrics, session_tokens_per_second
    from bd3lm.training.checkpoint import clean_stale_temporaries, export_hf, inspect_checkpoint, load_init_weights
    from bd3lm.training.data import local_rank_from_env, prepare_data, prepare_tokenizer
    from bd3lm.training.module import BD3LMLit

    quiet_lightning()
    hf_logging.disable_progress_bar()
    t0, cache_dir = time.perf_counter(), resolve_cache_dir(cfg.data.cache_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if owner:
        clean_stale_temporaries(run_dir)
    if resume:  # fail early, before anything else is written, on a corrupt checkpoint
        resumed_step = int(inspect_checkpoint(last).get("global_step", 0))
    init_from = init_source(cfg, resume)
    tokenizer = prepare_tokenizer(cfg.data, run_dir=run_dir, cache_dir=cache_dir, init_from=init_from)
    if cfg.mode == "export":
        out = export_from_checkpoint(cfg, run_dir, tokenizer)
        print(f"exported {out}")
        return {"export": str(out)}
    train, valid = prepare_data(cfg.data, tokenizer, cfg.model.length, cache_dir=cache_dir)
    if cfg.mode == "prepare":
        print(f"prepared {len(train)} training / {len(valid)} validation chunks of {cfg.model.length} tokens")
        return {"train_chunks": len(train), "valid_chunks": len(valid)}

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model = build_model(cfg, tokenizer)
    init_info = load_init_weights(model, init_from) if init_from else None
    lit = BD3LMLit(model, instantiate(cfg.settings, log_dir=str(run_dir), init_eval=init_info or {}))
    dm = instantiate(cfg.datamodule, train, valid)
    precision = resolve_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    trainer = build_trainer(cfg, run_dir, precision)
    rank0 = local_rank_from_env() == 0 and trainer.is_global_zero
    commit_start(cfg, run_dir, tokenizer, global_zero=rank0)
    n_params = sum(p.numel() for p in model.parameters())
    if rank0:
        what = f"warm start from {init_from}" if init_info else "fresh start"
        what = f"resuming from {last} (step {resumed_step})" if resume else what
        print(
            f"bd3lm: {cfg.algo.name} L={cfg.model.length} L'={cfg.algo.block_size}, {n_params / 1e6:.2f}M "
            f"parameters, vocabulary {len(tokenizer)}, {len(train)} training / {len(valid)} validation chunks, "
            f"precision {precision}; {what}; run_dir {run_dir}",
            flush=True,
        )
    trainer.fit(lit, datamodule=dm, ckpt_path=str(last) if resume else None, weights_only=True)
    if lit.last_val_step != trainer.global_step:
        trainer.validate(lit, datamodule=dm, verbose=False)
    export_model, export_ema = model, lit.ema
    if cfg.strategy.name == "fsdp":  # gather the sharded weights and EMA (collectives: every rank takes part)
        from bd3lm.ema import EMA

        full, ema_state = trainer.strategy.lightning_module_state_dict(), lit.ema_state_dict()
        if trainer.is_global_zero:
            export_model = build_model(cfg, tokenizer)
            export_model.load_state_dict({k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")})
            export_ema = EMA.from_state_dict(export_model, ema_state) if ema_state is not None else None
    if not trainer.is_global_zero:
        return {}
    nll = lit.last_val.get("val/nll", float("nan"))
    lo, hi = lit.interval()
    summary = {
        "step": int(trainer.global_step),
        "tokens": int(lit.batches_seen * cfg.data.batch_size * cfg.model.length * trainer.world_size),
        "val_nll": nll,
        "val_ppl": math.exp(nll) if math.isfinite(nll) else float("nan"),
        "interval": [lo, hi] if lit.searches else None,
        "parameters": int(n_params),
        "seconds": time.perf_counter() - t0,
        "tokens_per_second": session_tokens_per_second(trainer),
        "precision": precision,
        "run_dir": str(run_dir),
        "metrics": str(run_dir / "csv"),
    }
    if cfg.export:
        info = {k: summary[k] for k in ("step", "tokens", "val_nll", "val_ppl", "interval")}
        summary["export"] = str(export_hf(export_model, run_dir / "hf", ema=export_ema, tokenizer=tokenizer, info=info))
    title = f"{cfg.name}: {cfg.algo.name} L={cfg.model.length} L'={cfg.algo.block_size}"
    png = plot_metrics(run_dir / "csv", run_dir / "training_curves.png", title=title)
    summary["plot"] = str(png) if png else None
    print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    tps = f", {s['tokens_per_second']:.0f} tokens/s" if s.get("tokens_per_second") else ""
    parts = [f"Trained {s['step']} steps on {s['tokens']:,} tokens (this session: {s['seconds']:.0f}s{tps}; "
             f"{s['parameters'] / 1e6:.2f}M parameters, {s['precision']})."]
    if math.isfinite(s["val_nll"]):
        parts.append(f"Final validation NELBO {s['val_nll']:.4f} nats/token, perplexity <= {s['val_ppl']:.2f}.")
    if s.get("interval"):
        parts.append(f"Training clip interval [{s['interval'][0]:.3g}, {s['interval'][1]:.3g}].")
    if s.get("export"):
        parts.append(f"Model exported to {s['export']} (load with BD3LM.from_pretrained or generate.py).")
    plot = f"; curves: {s['plot']}." if s.get("plot") else "."
    parts.append(f"Metrics: {s['metrics']} (TensorBoard: {s['run_dir']}/tb){plot}")
    print("\n" + " ".join(parts), flush=True)


_EXIT: dict[str, int] = {}


def _report(exc: BaseException) -> int:
    """The exit status of a failed run, after printing its one line (an interruption prints its own message)."""
    if os.environ.get("BD3LM_DEBUG"):
        traceback.print_exc()
    if getattr(exc, "signum", None):  # bd3lm.faults.Interrupted: not an error; every rank stopped, one says so
        from bd3lm.training.run_dir import owns_run_dir

        if owns_run_dir():
            print(str(exc), file=sys.stderr, flush=True)
    else:
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    return int(getattr(exc, "exit_code", 1))


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="train")
def hydra_app(cfg) -> None:
    """The Hydra job: :func:`run` under the SIGTERM/SIGINT handlers; the exit status goes to :func:`main`."""
    from bd3lm.faults import interrupt_handlers

    try:
        with interrupt_handlers():  # SIGTERM/SIGINT -> Interrupted (the training loop stops at a step boundary)
            run(cfg)
        _EXIT["code"] = 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        _EXIT["code"] = 130
    except Exception as e:  # noqa: BLE001 - the top level turns every failure into one line
        _EXIT["code"] = _report(e)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status. The overrides are composed once first, so that a bad
    one is a single ``error:`` line rather than Hydra's multi-line report."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    show_cfg, argv = "--cfg" in argv, [a for a in argv if a != "--cfg"]
    try:
        cfg = compose_config(argv)
    except Exception as e:  # noqa: BLE001
        return _report(e)
    if show_cfg:
        from omegaconf import OmegaConf

        return print(OmegaConf.to_yaml(cfg, resolve=True)) or 0
    saved, sys.argv = sys.argv, [str(REPO / "train.py"), *argv]
    try:
        _EXIT["code"] = 1
        hydra_app()
    finally:
        sys.argv = saved
    return _EXIT["code"]


if __name__ == "__main__":
    sys.exit(main())

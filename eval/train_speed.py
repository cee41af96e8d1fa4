"""Benchmark: time and peak memory of one training step on CPU for BD3-LM, MDLM and AR of the same size.

    python -m eval.train_speed [length=256 block_size=4 layers=4 dim=256 vocab=4096 batch=16 steps=5 ...]
    python -m eval.train_speed 'variants=[bd3lm,ar]' 'precisions=[fp32]'

Each variant x precision runs in its own child process (peak RSS is per process): the parent runs
``python -m eval.train_speed variant=X precision=Y <sizes>`` and reads the row the child prints as its last stdout
line (a JSON object); with ``variant=`` set, this module measures that one variant in-process and writes nothing.
``bd3lm-official-like`` runs the output head and a full-vocabulary fp32 log-softmax on all 2L positions before
gathering the masked ones (what the official code does); ``bd3lm`` runs the head on the masked x_t rows only;
``mdlm`` is block size L without the x_0 stream; ``ar`` a causal transformer; ``sedd-*`` / ``cedd-*`` are the
score-entropy family at block size L with σ conditioning (:mod:`bd3lm.score_objectives`). A step is forward,
backward and AdamW update; the median of ``steps`` timed steps after ``warmup`` untimed ones is reported, with
training tokens per second (batch x length / median) and the process's peak RSS. Results print as a table and go to JSON
``output`` (``{"settings": ..., "rows": [...]}``, written atomically, with the environment record). Every key is
documented in ``configs/eval/train_speed.yaml``. Bad input is one ``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from omegaconf import DictConfig

from eval.common import (
    ROOT,
    CLIError,
    choice,
    integer,
    list_of,
    log,
    optional,
    output,
    write_json,
)
from eval.config_checks import hydra_main, validate

VARIANTS = ["bd3lm", "bd3lm-official-like", "mdlm", "ar", "sedd-absorbing", "sedd-uniform", "cedd-absorbing",
            "cedd-roulette"]
#: The score-entropy family (whole-sequence, σ-conditioned, as SEDD): variant -> (graph, loss, p_m).
FAMILY = {"sedd-absorbing": ("absorbing", "score_entropy", None), "sedd-uniform": ("uniform", "score_entropy", None),
          "cedd-absorbing": ("absorbing", "cedd", None), "cedd-roulette": ("roulette", "cedd", 0.95)}
PRECISIONS = ["fp32", "bf16"]
#: The keys a child process needs (besides ``variant`` and ``precision``).
SIZE_KEYS = ("length", "block_size", "layers", "dim", "vocab", "batch", "steps", "warmup", "threads")


#: Every key of configs/eval/train_speed.yaml and its check (cross-key checks in check_config).
KEYS = {
    **{k: integer(0 if k == "warmup" else 1) for k in SIZE_KEYS},
    "variants": list_of(choice(*VARIANTS), "variants=[bd3lm,ar]"),
    "precisions": list_of(choice(*PRECISIONS), "precisions=[fp32]"),
    "output": optional(output()),
    "variant": optional(choice(*VARIANTS)),
    "precision": optional(choice(*PRECISIONS)),
}


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """The validated settings (plain Python values); raises :class:`CLIError` on bad input."""
    s = validate(cfg, KEYS)
    s["variants"] = list(dict.fromkeys(s["variants"]))
    s["precisions"] = list(dict.fromkeys(s["precisions"]))
    if s["length"] % s["block_size"]:
        raise CLIError(f"block_size {s['block_size']} must divide length {s['length']}")
    if s["dim"] % 64:
        raise CLIError(f"dim must be a multiple of 64 (heads = dim // 64); got {s['dim']}")
    if s["vocab"] < 2:
        raise CLIError(f"vocab must be at least 2 (one token and the mask); got {s['vocab']}")
    return s


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def measure_step(s: dict[str, Any], variant: str, precision: str) -> dict[str, Any]:
    """Time ``s["steps"]`` training steps of ``variant`` at ``precision`` in this process; one result row."""
    import torch

    import bd3lm
    from bd3lm.noise import sample_mask
    from bd3lm.objectives import loss, stratified_t
    from bd3lm.schedules import get_schedule

    torch.manual_seed(0)
    torch.set_num_threads(s["threads"])
    length, bs, batch = s["length"], s["block_size"], s["batch"]
    kw = dict(vocab_size=s["vocab"], model_length=length, hidden_dim=s["dim"], cond_dim=128,
              n_blocks=s["layers"], n_heads=s["dim"] // 64, dropout=0.0)
    if variant == "ar":
        config = bd3lm.BD3LMConfig(block_size=1, causal=True, cross_attn=False, adaln=False, **kw)
    elif variant == "mdlm":
        config = bd3lm.BD3LMConfig(block_size=length, cross_attn=False, **kw)
    elif variant in FAMILY:
        graph, loss_name, p_m = FAMILY[variant]
        config = bd3lm.BD3LMConfig(block_size=length, cross_attn=False, time_conditioning=True, graph=graph,
                                   loss=loss_name, p_m=p_m, **kw)
    else:
        config = bd3lm.BD3LMConfig(block_size=bs, **kw)
    model = bd3lm.BD3LM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randint(0, s["vocab"] - 1, (batch, length))
    g = torch.Generator().manual_seed(0)

    def official_like() -> torch.Tensor:
        """The official loss layout: head + fp32 log-softmax over all 2L positions, then gather."""
        t = stratified_t(batch, length // bs, (1e-3, 1.0), g)
        masked = sample_mask(batch, length, bs, t, get_schedule("loglinear"), generator=g)
        xt = torch.where(masked, config.mask_index, x0)
        logits = model(input_ids=torch.cat([xt, x0], 1), output_all=True).logits
        logp = logits.float()
        logp[..., config.mask_index] = -1e6
        logp = logp.log_softmax(-1)[:, :length]
        nll = -logp.gather(-1, x0[..., None]).squeeze(-1)
        w = (1 / t).repeat_interleave(bs, 1)
        return (nll * masked * w).sum() / x0.numel()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = official_like() if variant == "bd3lm-official-like" else loss(model, x0, generator=g).loss
        out.backward()
        opt.step()

    for _ in range(s["warmup"]):
        step()
    times = []
    for _ in range(s["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {
        "variant": variant,
        "precision": precision,
        "seconds_per_step": seconds,
        "seconds_all": times,
        "tokens_per_second": batch * length / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def _child(s: dict[str, Any], variant: str, precision: str) -> dict[str, Any]:
    """Run one variant in a fresh ``python -m eval.train_speed variant=... precision=...`` process."""
    cmd = [sys.executable, "-m", "eval.train_speed", f"variant={variant}", f"precision={precision}"]
    cmd += [f"{k}={s[k]}" for k in SIZE_KEYS]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise CLIError(
            f"child {variant}/{precision} failed with exit code {proc.returncode}: {err[-1] if err else 'no output'}"
        )
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise CLIError(f"child {variant}/{precision} printed no result row (last line {lines[-1][:80]!r})") from None


def _print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=160)
    table = Table(title=title)
    for col in ("variant", "precision", "ms/step", "tok/s", "peak RSS MB", "params M"):
        table.add_column(col, justify="left" if col in ("variant", "precision") else "right")
    for r in rows:
        table.add_row(r["variant"], r["precision"], f"{r['seconds_per_step'] * 1000:.0f}",
                      f"{r['tokens_per_second']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['params_m']:.1f}")
    console.print(table)


def run_train_speed(cfg: DictConfig) -> dict[str, Any]:
    """Measure every ``variants`` x ``precisions`` (each in a child process), print the table, write ``cfg.output``
    and return ``{"settings": ..., "rows": [...]}``. With ``cfg.variant`` set, measure that one variant in this
    process, print its row as one JSON line and return ``{"settings": ..., "rows": [row]}`` (nothing written).
    Raises :class:`CLIError` on bad input."""
    s = check_config(cfg)
    variant, precision = s.pop("variant"), s.pop("precision")
    if variant is not None:
        row = measure_step(s, variant, precision or "fp32")
        print(json.dumps(row), flush=True)
        return {"settings": s, "rows": [row]}
    import torch

    from bd3lm.evaluation.speed import environment

    rows = []
    for prec in s["precisions"]:
        for v in s["variants"]:
            r = _child(s, v, prec)
            rows.append(r)
            log(f"{r['variant']:>22} {r['precision']:>5}  {r['seconds_per_step'] * 1000:8.0f} ms/step  "
                f"{r['tokens_per_second']:8.0f} tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                f"({r['params_m']:.1f}M params)")
    torch.set_num_threads(s["threads"])
    _print_table(rows, f"training step: batch {s['batch']} x length {s['length']}, L'={s['block_size']}, "
                       f"{s['threads']} threads, torch {torch.__version__}, median of {s['steps']}")
    result = {"settings": {**s, "environment": environment()}, "rows": rows}
    if s["output"] is not None:
        write_json(s["output"], result)
        log(f"wrote {s['output']}")
    return result


main = hydra_main("train_speed", run_train_speed)

if __name__ == "__main__":
    main()

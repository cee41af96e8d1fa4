"""Benchmark (not a test): sampling throughput and NFE of :func:`bd3lm.sampling.generate`.

    python -m eval.speed [new_tokens=1024 'block_sizes=[1,4,16]' 'batches=[1,8]' 'cache=[true,false]' ar=true ...]
    python -m eval.speed checkpoint=DIR            # a trained model instead of the random-weight ones
    python -m eval.speed suite=perf [perf.repeats=5 ...]   # the performance targets, PASS/FAIL (eval/perf.py)

Default model (random weights): hidden 256, 4 layers, 4 heads, vocab 4096, model_length 1024, fp32 on CPU
(or ``device=cuda``). For every block size L', batch size and cache setting it generates ``new_tokens`` tokens
per sequence with the first-hitting sampler from a ``prompt_length``-token prompt (id 0, or the checkpoint's
``bos_token_id``; never counted) and reports generated tokens per second, wall time, network calls (NFE) and
tokens per forward. An autoregressive model of the same size (``causal=True``) is the baseline row (``ar=false``
skips it). It then reports the NFE of ``confidence`` at ``threshold`` (default 0.9) against first hitting, with
the cache, at batch 1; on a random-weight model predictions are near-uniform so nothing is ever confident and
the saving is meaningless — use ``checkpoint=DIR``.

Every timing is :func:`bd3lm.evaluation.speed.speed`: the median of ``repeats`` whole ``generate`` calls after
one untimed warm-up, generated tokens only. Cache off recomputes the whole window at every call (cost quadratic
in the length): those rows generate ``off_tokens`` (default 128) tokens and are paired with a cache-on row of the
same length. ``off_tokens=1024`` compares at full length (minutes per run on 2 CPU cores). Shrink a run with
``new_tokens``, ``block_sizes``, ``batches``, ``cache=[true]``, ``ar=false``, ``repeats=1``. Results print as a
table (stdout; progress on stderr) and go to JSON ``output`` (``{"settings": ..., "rows": [...]}``, written
atomically, with the environment record). Every key is documented in ``configs/eval/speed.yaml`` (quote lists
for the shell). Bad input is one ``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from eval.bench import build_model, prompt_token, resolve_device
from eval.common import (
    CLIError,
    boolean,
    checkpoint,
    device,
    integer,
    list_of,
    log,
    number,
    optional,
    output,
    write_json,
)
from eval.config_checks import hydra_main, validate
from eval.perf_settings import PERF_KEYS

SUITES = ("default", "perf")


def _suite(value: object, name: str) -> str:
    if value not in SUITES:
        raise CLIError(f"{name} {value!r} is not one of {', '.join(SUITES)}")
    return str(value)


#: Every key of configs/eval/speed.yaml and its check (the perf: group's in eval.perf_settings; cross-key checks below).
KEYS = {
    "suite": _suite,
    "checkpoint": optional(checkpoint(tokenizer=False)),
    "new_tokens": integer(),
    "off_tokens": integer(),
    "block_sizes": list_of(integer(), "block_sizes=[1,4,16]"),
    "batches": list_of(integer(), "batches=[1,8]"),
    "cache": list_of(boolean, "cache=[true,false]"),
    "ar": boolean,
    "threshold": number(0, 1, low_open=True),
    "length": integer(),
    "dim": integer(),
    "layers": integer(),
    "heads": integer(),
    "vocab": integer(2),
    "threads": optional(integer()),
    "device": device,
    "repeats": integer(),
    "prompt_length": integer(0),
    "output": optional(output()),
    "perf": PERF_KEYS,
}


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """The validated settings of a run (plain Python values, the perf: group left out); raises :class:`CLIError`
    on bad input."""
    s = validate(cfg, KEYS)
    s.pop("perf")
    s["cache"] = list(dict.fromkeys(s["cache"]))
    s["off_tokens"] = min(s["off_tokens"], s["new_tokens"])
    if s["checkpoint"] is None:
        if s["dim"] % s["heads"]:
            raise CLIError(f"heads {s['heads']} must divide dim {s['dim']}")
        for bs in s["block_sizes"]:
            if s["length"] % bs:
                raise CLIError(f"block size {bs} must divide length {s['length']}")
    return s


def _row(name: str, model, sampler: str, res) -> dict[str, Any]:
    """One JSON row from a :class:`~bd3lm.evaluation.speed.SpeedResult`."""
    return {
        "model": name,
        "block_size": 1 if model.config.causal else int(model.config.block_size),
        "sampler": sampler,
        "batch": res.batch_size,
        "cache": res.kv_cache,
        "new_tokens_per_seq": res.settings["new_tokens_per_row"],
        "prompt_tokens": res.prompt_tokens,
        "new_tokens": res.new_tokens,
        "seconds": res.seconds,
        "seconds_all": res.seconds_all,
        "tokens_per_second": res.tokens_per_s,
        "nfe": res.nfe,
        "tokens_per_forward": res.tokens_per_forward,
    }


def _print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=160)
    table = Table(title=title)
    for col in ("model", "sampler", "batch", "cache", "new tok/seq", "tok/s", "NFE", "tok/fwd", "s"):
        table.add_column(col, justify="left" if col in ("model", "sampler") else "right")
    for r in rows:
        saved = r.get("nfe_saved_vs_first_hitting")
        table.add_row(
            r["model"],
            r["sampler"],
            str(r["batch"]),
            "on" if r["cache"] else "off",
            str(r["new_tokens_per_seq"]),
            f"{r['tokens_per_second']:.1f}",
            f"{r['nfe']}" + (f" ({saved:+.1%} saved)" if saved is not None else ""),
            f"{r['tokens_per_forward']:.2f}",
            f"{r['seconds']:.2f}",
        )
    console.print(table)


def run_speed(cfg: DictConfig) -> dict[str, Any]:
    """Run the benchmark described by ``cfg`` (see ``configs/eval/speed.yaml``), print the table, write
    ``cfg.output`` and return ``{"settings": ..., "rows": [...]}``. Raises :class:`CLIError` / ``ValueError`` on
    bad input. ``suite=perf`` runs :func:`eval.perf.run_perf` instead (its own table and JSON)."""
    s = check_config(cfg)
    if s["suite"] == "perf":
        from eval.perf import run_perf

        return run_perf(cfg)
    import torch

    from bd3lm.evaluation.speed import environment, speed

    device = resolve_device(s["device"])
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    variants: list[tuple[str, int | None, bool]] = []
    if s["checkpoint"] is not None:
        variants.append(("checkpoint", None, False))
    else:
        variants += [(f"bd3lm L'={bs}", bs, False) for bs in s["block_sizes"]]
        if s["ar"]:
            variants.append(("ar", 1, True))

    rows: list[dict[str, Any]] = []
    env: dict[str, Any] = {}

    def measure(name: str, model, label: str, batch: int, cache: bool, n_new: int, **kw) -> dict[str, Any]:
        res = speed(model, batch_size=batch, new_tokens=n_new, prompt_length=s["prompt_length"],
                    repeats=s["repeats"], bos_token_id=prompt_token(model), kv_cache=cache, **kw)
        row = _row(name, model, label, res)
        log(f"{name:>14}  {label:<18} batch {batch:>2}  cache {'on ' if cache else 'off'}  {n_new:>5} tokens  "
            f"{row['tokens_per_second']:9.1f} tok/s  NFE {row['nfe']:>5}  {row['tokens_per_forward']:.2f} tok/fwd  "
            f"{row['seconds']:.2f} s")
        return row

    for name, bs, causal in variants:
        model = build_model(s, bs, causal, device)
        env = env or environment(model)
        sampler = "ar" if causal else "first_hitting"
        for batch in s["batches"]:
            runs = [(True, s["new_tokens"])] if True in s["cache"] else []
            if False in s["cache"]:  # cache off, and cache on at the same (shorter) length for comparison
                if True in s["cache"] and s["off_tokens"] != s["new_tokens"]:
                    runs.append((True, s["off_tokens"]))
                runs.append((False, s["off_tokens"]))
            for cache, n_new in runs:
                rows.append(measure(name, model, sampler, batch, cache, n_new))
        if not causal:  # NFE of the confidence rule against first hitting (batch 1, cache on, new_tokens)
            ref = next(
                (r for r in rows if r["model"] == name and r["sampler"] == "first_hitting" and r["batch"] == 1
                 and r["cache"] and r["new_tokens_per_seq"] == s["new_tokens"]),
                None,
            )
            if ref is None:
                ref = measure(name, model, "first_hitting", 1, True, s["new_tokens"])
                rows.append(ref)
            conf = measure(name, model, f"confidence tau={s['threshold']}", 1, True, s["new_tokens"],
                           sampler="confidence", threshold=s["threshold"])
            conf["threshold"] = s["threshold"]
            conf["nfe_first_hitting"] = ref["nfe"]
            conf["nfe_saved_vs_first_hitting"] = 1 - conf["nfe"] / ref["nfe"]
            rows.append(conf)
        del model

    _print_table(
        rows,
        f"generate(): {s['new_tokens']} new tokens per sequence, device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {s['repeats']}",
    )
    result = {"settings": {**s, "environment": env or environment()}, "rows": rows}
    if s["output"] is not None:
        write_json(s["output"], result)
        log(f"wrote {s['output']}")
    return result


main = hydra_main("speed", run_speed)

if __name__ == "__main__":
    main()

"""Performance suite of :func:`bd3lm.sampling.generate`: every target with its measured value and PASS/FAIL.

    python -m eval.speed suite=perf                     # the reference size (hidden 256, 8 layers, L = 1024)
    python -m eval.speed suite=perf perf.repeats=1 perf.length=32 perf.dim=32 perf.layers=1 perf.heads=4 \\
        perf.vocab=64 perf.long_factor=2 perf.checkpoint=null   # a smoke run: checks the wiring, measures nothing
    python -m eval.perf [perf.repeats=5 ...]            # the same as python -m eval.speed suite=perf [...]

Speed targets run on random-weight fp32 models built by :func:`eval.bench.build_model` at the ``perf.*`` size:
first hitting, batch 1, a 1-token prompt (the model's BOS id, else id 0), ``N = perf.length`` new tokens unless
stated. Every timing is :func:`bd3lm.evaluation.speed.speed` of one whole ``generate`` call; the suite runs
``perf.repeats`` interleaved rounds (each runs every configuration once, after one untimed warm-up each) and reports
medians, so drift of the machine moves all configurations alike (tokens/s counts the generated tokens of all
rows). Every verdict is a ratio of two
measurements of the same run, except NFE counts, which are exact.

- ``nfe_block1``, ``nfe_block4``: NFE of N new tokens at block size 1 and ``perf.block_size``; target <= N.
- ``cache_speedup``: tokens/s with the KV cache over ``kv_cache=False`` (N new tokens); target >= 5.
- ``batch8_speedup``, ``batch64_speedup``: tokens/s at batch 8 / 64 over batch 1; targets >= 4 / >= 12 (other
  ``perf.batches`` are info rows; a target batch left out of ``perf.batches`` is SKIP).
- ``long_default``: tokens/s for ``perf.long_factor * N`` new tokens with generate's default window settings over
  tokens/s for N - 1 (prompt and new tokens fill the first window, nothing slides); target >= 0.8. The same ratio
  with ``streaming=True`` and with ``window_stride=L'`` (the most-context exact mode, over
  ``perf.stride_long_factor * N`` tokens: it re-encodes W - L' positions per block) are info rows.
- ``vs_ar``: tokens/s of the block-size model over an AR model of the same size (``causal=True``); target >= 0.8.
- ``confidence``: on the trained ``perf.checkpoint`` with ``perf.judge``, first hitting and then
  ``sampler="confidence"`` at each threshold (same seed, same ``perf.num_samples``, ``model_length - 1`` new
  tokens): gen-PPL ± se, entropy and NFE per token = ``nfe_per_sample / length_mean`` (network calls a sample took
  part in over its generated tokens). Target: a threshold with >= 2x fewer NFE per token than first hitting at
  gen-PPL <= 1.10x first hitting's; the row names the best (fewest NFE per token) threshold meeting both, else FAIL
  with the closest. SKIP, with the reason, when the checkpoint or the judge cannot be loaded.

The table goes to stdout (progress on stderr), the JSON to ``perf.output`` and, for a ``.json`` output, the table as
Markdown next to it (``.md``). Fewer than 5 repeats is a smoke run:
the title and the JSON say so.
"""

from __future__ import annotations

import math
import os
from typing import Any

from omegaconf import DictConfig

from eval.common import log, one_line, write_json, write_text
from eval.perf_settings import MIN_REPEATS, REFERENCE_SIZE, check_perf, notes

BATCH_TARGETS = {8: 4.0, 64: 12.0}
CACHE_TARGET = 5.0
LONG_TARGET = 0.8
AR_TARGET = 0.8
NFE_REDUCTION_TARGET = 2.0
PPL_RATIO_TARGET = 1.10
OPS = ("<=", ">=")


def verdict(measured: float, target: float, op: str) -> str:
    """``"PASS"`` when ``measured op target`` holds (``op`` is ``"<="`` or ``">="``), else ``"FAIL"`` (also for
    NaN)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    ok = measured <= target if op == "<=" else measured >= target
    return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------------------------------------- targets


def _row(name: str, measured: float | None, shown: str, target: float | None, op: str | None, detail: str,
         uses: list[str], status: str | None = None) -> dict[str, Any]:
    """One target row; ``status`` (info/SKIP) replaces the verdict of rows without a target."""
    return {
        "name": name, "measured": measured, "shown": shown, "target": target, "op": op,
        "target_text": "" if target is None else f"{'≤' if op == '<=' else '≥'} {target:g}",
        "verdict": status or verdict(measured, target, op), "detail": detail, "measurements": uses,
    }


def _skip(name: str, reason: str, target: float | None = None, op: str | None = None) -> dict[str, Any]:
    row = _row(name, None, "—", target, op, reason, [], "SKIP")
    row["reason"] = reason
    return row


def _ratio(name: str, m: dict[str, dict], num: str, den: str, target: float | None, what: str) -> dict[str, Any]:
    """Row of ``tokens/s(num) / tokens/s(den)``; an info row when ``target`` is ``None``."""
    a, b = m[num]["tokens_per_second"], m[den]["tokens_per_second"]
    value = a / b
    detail = f"{what}: {a:.1f} / {b:.1f} tok/s"
    return _row(name, value, f"{value:.2f}x", target, None if target is None else ">=", detail, [num, den],
                "info" if target is None else None)


def speed_targets(m: dict[str, dict], p: dict[str, Any]) -> list[dict[str, Any]]:
    """The target rows of the speed measurements ``m`` (keys as :func:`measure_all` names them)."""
    n, bs = p["length"], p["block_size"]
    rows = []
    for key, size in (("block1", 1), ("base", bs)):
        nfe = m[key]["nfe"]
        rows.append(_row(f"nfe_block{size}", nfe, str(nfe), n, "<=", f"NFE of {n} new tokens at L'={size}", [key]))
    rows.append(_ratio("cache_speedup", m, "base", "cache_off", CACHE_TARGET, f"{n} tokens, cache on / off"))
    for b in sorted(set(BATCH_TARGETS) | set(p["batches"])):
        name, target = f"batch{b}_speedup", BATCH_TARGETS.get(b)
        if b in p["batches"]:
            rows.append(_ratio(name, m, f"batch{b}", "base", target, f"batch {b} / batch 1"))
        else:
            rows.append(_skip(name, f"batch {b} is not in perf.batches", target, ">="))
    for mode, target in (("default", LONG_TARGET), ("streaming", None), (f"stride{bs}", None)):
        key = f"long_{mode}"
        rows.append(_ratio(key, m, key, "window1", target,
                           f"{m[key]['new_tokens_per_row']} tokens ({m[key]['window']}) / {n - 1} tokens (first "
                           "window)"))
    rows.append(_ratio("vs_ar", m, "base", "ar", AR_TARGET, f"L'={bs} / AR, {n} tokens"))
    return rows


def confidence_targets(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curve rows (info) and the ``confidence`` verdict row of the points of :func:`run_confidence` (the first
    is first hitting, the rest the thresholds)."""
    base, curve = points[0], points[1:]
    rows = []
    for pt in points:
        label = "first_hitting" if pt["threshold"] is None else f"tau={pt['threshold']:g}"
        rows.append(_row(f"confidence_{label}", pt["nfe_per_token"], f"{pt['nfe_per_token']:.3f} NFE/tok", None,
                         None, f"gen-PPL {pt['gen_ppl']:.1f} ± {pt['gen_ppl_se']:.1f}, entropy {pt['entropy']:.3f}, "
                               f"{pt['tokens_per_forward']:.2f} tok/fwd", [], "info"))
    scored = []
    for pt in curve:
        reduction = base["nfe_per_token"] / pt["nfe_per_token"]
        ppl_ratio = pt["gen_ppl"] / base["gen_ppl"]
        ok = (verdict(reduction, NFE_REDUCTION_TARGET, ">=") == "PASS"
              and verdict(ppl_ratio, PPL_RATIO_TARGET, "<=") == "PASS")
        gap = max(NFE_REDUCTION_TARGET / reduction, ppl_ratio / PPL_RATIO_TARGET)
        scored.append((pt, reduction, ppl_ratio, ok, gap if math.isfinite(gap) else math.inf))
    passing = [s for s in scored if s[3]]
    if passing:
        pt, reduction, ppl_ratio, ok, _ = min(passing, key=lambda s: (s[0]["nfe_per_token"], s[0]["gen_ppl"]))
    else:
        pt, reduction, ppl_ratio, ok, _ = min(scored, key=lambda s: s[4])
    detail = (f"tau={pt['threshold']:g}{'' if ok else ' (closest; no threshold meets both)'}: {reduction:.2f}x fewer "
              f"NFE/token ({pt['nfe_per_token']:.3f} vs {base['nfe_per_token']:.3f}), gen-PPL {ppl_ratio:.2f}x "
              f"({pt['gen_ppl']:.1f} vs {base['gen_ppl']:.1f}); target gen-PPL ≤ {PPL_RATIO_TARGET:.2f}x")
    serial = next((c for c in curve if c["threshold"] == 1.0), None)
    if serial is not None and serial is not pt:  # same decoding order, one token per call: the order's own effect
        ratio = pt["gen_ppl"] / serial["gen_ppl"]
        detail += (f"; vs tau=1 (most confident first, one token per call): gen-PPL {ratio:.2f}x, entropy "
                   f"{pt['entropy']:.2f} vs {serial['entropy']:.2f} (first hitting {base['entropy']:.2f})")
    row = _row("confidence", reduction, f"{reduction:.2f}x @ tau={pt['threshold']:g}", NFE_REDUCTION_TARGET, ">=",
               detail, [], "PASS" if ok else "FAIL")
    row.update(threshold=pt["threshold"], ppl_ratio=ppl_ratio, ppl_ratio_target=PPL_RATIO_TARGET)
    return [*rows, row]


# ------------------------------------------------------------------------------------------------ measurements


def _common(env: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "environment": env}


def measure_all(p: dict[str, Any], device) -> dict[str, dict[str, Any]]:
    """Every speed measurement of the suite, by key (``base`` is L'=block_size, batch 1, N tokens, cache on).

    The runs are interleaved: each of ``repeats`` rounds runs every configuration once (the first round after one
    untimed warm-up each), so a drift of the machine's speed during the suite (seen here: ±30% over minutes)
    moves every configuration alike instead of biasing the ratios between configurations measured minutes apart.
    """
    import statistics

    from bd3lm.evaluation.speed import environment, speed
    from eval.bench import build_model, prompt_token

    n, bs = p["length"], p["block_size"]
    long = p["long_factor"] * n
    sizes = {"checkpoint": None, **{k: p[k] for k in ("vocab", "length", "dim", "layers", "heads")}}
    models = {name: build_model(sizes, block, causal, device)
              for name, block, causal in ((f"L'={bs}", bs, False), ("L'=1", 1, False), ("AR", 1, True))}
    envs = {name: environment(model) for name, model in models.items()}
    base = f"L'={bs}"
    specs: list[tuple[str, str, dict[str, Any]]] = [
        ("base", base, {}),
        ("cache_off", base, {"cache": False}),
        *[(f"batch{b}", base, {"batch": b}) for b in p["batches"]],
        ("window1", base, {"new": n - 1}),
        ("long_default", base, {"new": long}),
        ("long_streaming", base, {"new": long, "window": "streaming=True", "streaming": True}),
        (f"long_stride{bs}", base, {"new": p["stride_long_factor"] * n, "window": f"window_stride={bs}",
                                    "window_stride": bs}),
        ("block1", "L'=1", {}),
        ("ar", "AR", {}),
    ]
    runs: dict[str, list] = {key: [] for key, _, _ in specs}
    for r in range(p["repeats"]):
        for key, name, kw in specs:
            kw = dict(kw)
            batch, new, cache = kw.pop("batch", 1), kw.pop("new", n), kw.pop("cache", True)
            kw.pop("window", None)
            model = models[name]
            res = speed(model, batch_size=batch, new_tokens=new, prompt_length=1, repeats=1, warmup=int(r == 0),
                        bos_token_id=prompt_token(model), kv_cache=cache, **kw)
            runs[key].append(res)
            log(f"[perf] round {r + 1}/{p['repeats']}  {key:<14} {name:<7} batch {batch:>3}  {new:>6} tokens  "
                f"{res.tokens_per_s:9.1f} tok/s  NFE {res.nfe:>6}  {res.seconds:.2f} s")
    out: dict[str, dict[str, Any]] = {}
    for key, name, kw in specs:
        first = runs[key][0]
        seconds_all = [res.seconds for res in runs[key]]
        median = statistics.median(seconds_all)
        out[key] = {
            "model": name, "block_size": first.settings["block_size"], "causal": first.settings["causal"],
            "sampler": "ar" if first.settings["causal"] else "first_hitting", "batch": first.batch_size,
            "prompt_length": first.prompt_tokens, "prompt_token_id": first.settings["prompt_token_id"],
            "new_tokens_per_row": first.settings["new_tokens_per_row"], "new_tokens": first.new_tokens,
            "cache": "on" if first.kv_cache else "off", "window": kw.get("window", "default"),
            "generate_kwargs": first.settings["generate_kwargs"], "repeats": len(seconds_all),
            "interleaved": True, "warmup_runs_excluded": 1, "tokens_per_second": first.new_tokens / median,
            "seconds_median": median, "seconds_all": seconds_all, "nfe": first.nfe,
            "tokens_per_forward": first.tokens_per_forward, "device": first.settings["device"],
            "dtype": first.settings["dtype"], **_common(envs[name]),
        }
    return out


def run_confidence(p: dict[str, Any], device) -> tuple[list[dict[str, Any]], str | None]:
    """``(points, None)``: first hitting then each threshold on the checkpoint; ``([], reason)`` when the
    checkpoint or the judge cannot be loaded."""
    ckpt = p["checkpoint"]
    if ckpt is None:
        return [], "perf.checkpoint is null"
    if not os.path.isdir(ckpt):
        return [], f"checkpoint directory {ckpt!r} does not exist"
    from bd3lm.evaluation import load_checkpoint, load_judge, sample_quality
    from bd3lm.evaluation.speed import environment

    errors = (ValueError, FileNotFoundError, ImportError, OSError)
    try:
        model, tok = load_checkpoint(ckpt, device)
    except errors as exc:
        return [], f"checkpoint {ckpt!r} cannot be loaded: {one_line(exc)}"
    if model.config.causal:
        return [], f"checkpoint {ckpt!r} is autoregressive: it has no confidence sampler"
    try:
        judge = load_judge(p["judge"], device=str(device))
    except errors as exc:
        return [], f"judge {p['judge']!r} cannot be loaded: {one_line(exc)}"
    env = environment(model)
    n_new = int(model.config.model_length) - 1
    points = []
    for tau in [None, *p["thresholds"]]:
        kw = {} if tau is None else {"sampler": "confidence", "threshold": tau}
        q = sample_quality(model, tok, judge, num_samples=p["num_samples"], batch_size=p["sample_batch"],
                           max_new_tokens=n_new, seed=p["seed"], **kw)
        points.append({
            "sampler": "first_hitting" if tau is None else "confidence", "threshold": tau,
            "nfe_per_token": q.nfe_per_sample / q.length_mean, "nfe_per_sample": q.nfe_per_sample,
            "gen_ppl": q.gen_ppl, "gen_ppl_se": q.gen_ppl_se, "pooled_ppl": q.pooled_ppl, "entropy": q.entropy,
            "tokens_per_forward": q.tokens_per_forward, "tokens_per_s": q.tokens_per_s,
            "length_mean": q.length_mean, "num_samples": p["num_samples"], "batch": p["sample_batch"],
            "seed": p["seed"], "prompt_length": int(tok.bos_token_id is not None), "new_tokens_per_row": n_new,
            "cache": "on", "window": "default", "repeats": 1, "judge": q.judge,
            "dtype": env["dtype"], "device": env["device"], **_common(env),
        })
        log(f"[perf] confidence {points[-1]['sampler']:<13} tau {tau!s:<4}  NFE/token "
            f"{points[-1]['nfe_per_token']:.3f}  gen-PPL {q.gen_ppl:.1f} ± {q.gen_ppl_se:.1f}  entropy {q.entropy:.3f}")
    load_judge.cache_clear()
    return points, None


# ------------------------------------------------------------------------------------------------------ report


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=180)
    table = Table(title=title)
    for col in ("target", "measured", "goal", "verdict", "detail"):
        table.add_column(col, justify="right" if col in ("measured", "goal") else "left")
    style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow", "info": "dim"}
    for r in rows:
        v = r["verdict"]
        table.add_row(r["name"], r["shown"], r["target_text"], f"[{style[v]}]{v}[/]", r["detail"])
    console.print(table)


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    """The target rows as a Markdown table under ``title`` (what ``perf.output``'s ``.md`` twin holds)."""
    out = [title, "", "| target | measured | goal | verdict | detail |", "|---|---|---|---|---|"]
    out += [f"| {r['name']} | {r['shown']} | {r['target_text']} | {r['verdict']} | {r['detail']} |" for r in rows]
    return "\n".join(out) + "\n"


def run_perf(cfg: DictConfig) -> dict[str, Any]:
    """Run ``suite=perf`` (see the module docstring): print the table, write ``perf.output``, return the JSON
    dict ``{"title", "settings", "targets", "measurements", "confidence"}``."""
    from eval.bench import resolve_device

    p = check_perf(cfg)
    device = resolve_device(p["device"])
    import torch

    if p["threads"]:
        torch.set_num_threads(p["threads"])
    flags = notes(p)
    head = (f"perf suite: hidden {p['dim']}, layers {p['layers']}, heads {p['heads']}, vocab {p['vocab']}, "
            f"L={p['length']}, L'={p['block_size']}, fp32 random weights, {device}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, median of {p['repeats']} interleaved rounds after 1 warm-up")
    title = " — ".join([head, *flags])
    log(f"[perf] {title}")
    points, skipped = run_confidence(p, device)
    if skipped:
        log(f"[perf] confidence: SKIP ({skipped})")
    measurements = measure_all(p, device)
    rows = speed_targets(measurements, p)
    target = f"{NFE_REDUCTION_TARGET:g}x fewer NFE/token at gen-PPL ≤ {PPL_RATIO_TARGET:.2f}x"
    rows += [_skip("confidence", f"{skipped} (target: {target})", NFE_REDUCTION_TARGET, ">=")] if skipped \
        else confidence_targets(points)
    print_table(rows, "\n".join([head, *flags]))
    result = {
        "title": title,
        "settings": {**p, "notes": flags, "smoke_run": p["repeats"] < MIN_REPEATS, "reference_size": REFERENCE_SIZE,
                     "is_reference_size": all(p[k] == v for k, v in REFERENCE_SIZE.items())},
        "targets": rows,
        "measurements": measurements,
        "confidence": {"checkpoint": p["checkpoint"], "judge": p["judge"], "skipped": skipped,
                       "nfe_per_token": "nfe_per_sample / length_mean", "points": points},
    }
    if p["output"] is not None:
        write_json(p["output"], result)
        log(f"[perf] wrote {p['output']}")
        if p["output"].endswith(".json"):
            md = p["output"][: -len(".json")] + ".md"
            write_text(md, markdown_table(rows, title))
            log(f"[perf] wrote {md}")
    return result


if __name__ == "__main__":  # python -m eval.perf [...] = python -m eval.speed suite=perf [...] (run by name, so
    import runpy  # that eval.speed, which imports this module for suite=perf, is not imported back from here)
    import sys

    sys.argv = [sys.argv[0], "suite=perf", *sys.argv[1:]]
    runpy.run_module("eval.speed", run_name="__main__", alter_sys=True)

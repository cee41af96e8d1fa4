"""Benchmark (not a test): sampling throughput and NFE of :func:`bd3lm.sampling.generate`.

    python -m eval.speed [--new-tokens 1024 --block-sizes 1,4,16 --batches 1,8 --cache on,off]
    python -m eval.speed --checkpoint DIR          # a trained model instead of the random-weight one

Default model (random weights): hidden 256, 4 layers, 4 heads, vocab 4096, model_length 1024, fp32 on CPU
(or ``--device cuda``). For every block size L', batch size and cache setting it generates ``--new-tokens``
tokens per sequence with the first-hitting sampler from a one-token prompt (id 0, never counted) and reports
generated tokens per second, wall time, network calls (NFE) and tokens per forward. An autoregressive model of
the same size (``causal=True``) is the baseline row. It then reports the NFE of ``confidence`` at
``tau`` (default 0.9) against first hitting, with the cache, at batch 1; on a random-weight model predictions
are near-uniform so nothing is ever confident and the saving is meaningless — use ``--checkpoint``.

Cache off recomputes the whole window at every call (cost quadratic in the length): those rows generate
``--off-tokens`` (default 128) tokens and are paired with a cache-on row of the same length. ``--off-tokens
1024`` compares at full length (about 2 min per model at batch 1 and 15 min at batch 8 on 2 CPU cores).
Defaults take about 7 minutes with ``--threads 1`` on a busy 2-core CPU; shrink with ``--new-tokens``,
``--block-sizes``, ``--batches``, ``--cache on``, ``--no-ar``. Results print as a table and go to JSON
(``--output``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_model(args: argparse.Namespace, block_size: int | None, causal: bool = False):
    """The benchmark model: ``--checkpoint`` or a random-weight BD3-LM / AR model of the stated size."""
    import torch

    import bd3lm

    if args.checkpoint:
        model = bd3lm.BD3LM.from_pretrained(args.checkpoint)
    else:
        torch.manual_seed(0)
        kw = dict(
            vocab_size=args.vocab,
            model_length=args.length,
            hidden_dim=args.dim,
            cond_dim=128,
            n_blocks=args.layers,
            n_heads=args.heads,
            dropout=0.0,
        )
        if causal:
            cfg = bd3lm.BD3LMConfig(block_size=1, causal=True, cross_attn=False, adaln=False, **kw)
        else:
            cfg = bd3lm.BD3LMConfig(block_size=block_size, **kw)
        model = bd3lm.BD3LM(cfg)
        with torch.no_grad():  # the official init zeroes the head and adaLN: give every weight a value
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.normal_(0.0, 0.02)
    return model.to(args.device).eval()


def run_one(model, args: argparse.Namespace, batch: int, cache: bool, n_new: int, **kw) -> dict:
    """One timed generation (after a short warm-up) and its statistics."""
    import torch

    from bd3lm.sampling import generate

    kw.setdefault("bos_token_id", 0)  # AR models need a first token; every model gets the same one
    generate(
        model,
        None,
        max_new_tokens=min(n_new, 2 * model.config.block_size),
        num_samples=batch,
        kv_cache=cache,
        seed=0,
        **kw,
    )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = generate(model, None, max_new_tokens=n_new, num_samples=batch, kv_cache=cache, seed=0, **kw)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(res.num_new_tokens)
    return {
        "new_tokens_per_seq": n_new,
        "batch": batch,
        "cache": cache,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "nfe": res.nfe,
        "tokens_per_forward": res.tokens_per_forward,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a BD3LM directory (its block size is used)")
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--off-tokens", type=int, default=128, help="new tokens in cache-off rows")
    p.add_argument("--block-sizes", type=_ints, default=[1, 4, 16])
    p.add_argument("--batches", type=_ints, default=[1, 8])
    p.add_argument("--cache", default="on,off", help="on, off or on,off")
    p.add_argument("--no-ar", action="store_true", help="skip the autoregressive baseline")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence tau for the NFE comparison")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="speed.json")
    args = p.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console() if Console().is_terminal else Console(width=160)
    caches = [c.strip() == "on" for c in args.cache.split(",")]
    off_tokens = min(args.off_tokens, args.new_tokens)
    rows: list[dict] = []

    variants: list[tuple[str, int | None, bool]] = []
    if args.checkpoint:
        variants.append(("checkpoint", None, False))
    else:
        variants += [(f"bd3lm L'={bs}", bs, False) for bs in args.block_sizes]
        if not args.no_ar:
            variants.append(("ar", 1, True))
    for name, bs, causal in variants:
        model = build_model(args, bs, causal)
        for batch in args.batches:
            runs = [(True, args.new_tokens)] if True in caches else []
            if False in caches:  # cache off, and cache on at the same (shorter) length for comparison
                runs += [(True, off_tokens)] if off_tokens != args.new_tokens else []
                runs += [(False, off_tokens)]
            for cache, n_new in runs:
                row = {
                    "model": name,
                    "block_size": 1 if causal else model.config.block_size,
                    "sampler": "ar" if causal else "first_hitting",
                    **run_one(model, args, batch, cache, n_new),
                }
                rows.append(row)
                console.print(
                    f"{name:>14}  batch {batch:>2}  cache {'on ' if cache else 'off'}  {n_new:>5} tokens  "
                    f"{row['tokens_per_second']:9.1f} tok/s  NFE {row['nfe']:>5}  "
                    f"{row['tokens_per_forward']:.2f} tok/fwd  {row['seconds']:.1f} s"
                )
        if not causal:
            conf = run_one(
                model, args, 1, True, args.new_tokens, sampler="confidence", threshold=args.threshold
            )
            fh = next(r for r in rows if r["model"] == name and r["batch"] == 1 and r["cache"])
            rows.append(
                {
                    "model": name,
                    "block_size": model.config.block_size,
                    "sampler": f"confidence tau={args.threshold}",
                    **conf,
                    "nfe_saved_vs_first_hitting": 1 - conf["nfe"] / fh["nfe"],
                }
            )

    table = Table(
        title=f"generate(): {args.new_tokens} new tokens per sequence, device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
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
            f"{r['seconds']:.1f}",
        )
    console.print(table)
    settings = {k: v for k, v in vars(args).items()}
    settings.update(
        platform=platform.platform(),
        processor=platform.processor(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    with open(args.output, "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=2)
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

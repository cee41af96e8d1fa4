"""The report of the block-size sweep (:mod:`eval.sweep`): the Markdown table (``sweep.md``) and the Pareto plot
(``sweep.png``) of its rows, one per model.
"""

from __future__ import annotations

import math
from pathlib import Path


def markdown_table(rows: list[dict], reference: dict | None = None) -> str:
    lines = [
        "| model | block size | init | PPL (≤) | gen-PPL | entropy | NFE / sample | tokens/s | train tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["ppl_ci95"]
        ppl = f"{r['ppl']:.1f}" + (" (exact)" if r["ppl_exact"] else f" [{lo:.1f}, {hi:.1f}]")
        lines.append(
            f"| {r['model']} | {r['block_size']} | {r['init']} | {ppl} | {r['gen_ppl']:.1f} | {r['entropy']:.2f} "
            f"| {r['nfe']:.0f} | {r['tokens_per_s']:.0f} | {r['train_tokens']:,} |"
        )
    if reference:
        lines += ["", f"Judge reference on {reference['texts']} validation texts of the same length: real text "
                  f"gen-PPL {reference['data_gen_ppl']:.1f} (entropy {reference['data_entropy']:.2f}), the same "
                  f"text with its words shuffled {reference['shuffled_gen_ppl']:.1f}."]
    return "\n".join(lines) + "\n"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def pareto_plot(rows: list[dict], path: Path) -> Path:
    """Two panels (gen-PPL and the PPL bound against tokens/s), one labelled point per model, the front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "gen_ppl", "gen-PPL (judge)"), (axes[1], "ppl", "perplexity bound")):
        finite = [r for r in rows if _finite(r.get(key)) and _finite(r.get("tokens_per_s"))]
        pts = sorted(((r["tokens_per_s"], r[key], r["name"]) for r in finite), key=lambda p: -p[0])
        if not pts:
            ax.set_title(f"{title}: no finite values")
            continue
        for x, y, name in pts:
            ax.scatter(x, y, s=30)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front, best = [], float("inf")
        for x, y, _ in pts:  # fastest first: a point is on the front if nothing faster is also better
            if y < best:
                front.append((x, y))
                best = y
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1, label="Pareto front")
        ax.set_xlabel("sampling tokens/s (batch 1, higher is better)")
        ax.set_ylabel(f"{title} (lower is better)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Block size: quality against speed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

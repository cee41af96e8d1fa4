"""`make demo`: train the quickstart BD3-LM on the embedded Shakespeare corpus, then stream a long sample.

1. ``python train.py experiment=quickstart`` (in-process): a 5.7M-parameter BD3-LM (L = 128 tokens, blocks of
   L' = 4, a 4096-token BPE trained on the corpus) for a few minutes into ``runs/quickstart`` (resumed or
   skipped when a previous demo already trained it);
2. generation with the exported EMA weights: the first-hitting sampler, KV cache, and a sliding window, so the
   text (4 x model_length tokens) is several times longer than the training context; each block is printed as
   soon as it is committed.

    python demo.py [train.py overrides, e.g. trainer.max_steps=50 run_dir=/tmp/demo]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent
PROMPT = "ROMEO:\n"
LENGTH_FACTOR = 4  # generated tokens = LENGTH_FACTOR x model_length
SEED = 0


def train_quickstart(overrides: list[str]) -> dict:
    """Run the quickstart training; returns train.py's summary (export path, validation perplexity, ...)."""
    sys.path.insert(0, str(REPO))
    import train

    cfg = train.compose_config(["experiment=quickstart", *overrides])
    print(
        f"== 1/2 training the quickstart model into {cfg.run_dir} "
        f"(about 5 minutes on 2 CPU cores; rerunning resumes or skips it)",
        flush=True,
    )
    return train.run(cfg)


def stream_sample(hf_dir: Path, out_file: Path) -> dict:
    """Generate LENGTH_FACTOR x model_length tokens after PROMPT, printing every committed block."""
    import torch
    from transformers import AutoTokenizer

    import bd3lm
    from bd3lm.sampling import generate

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model = bd3lm.BD3LM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    cfg = model.config
    n_new = LENGTH_FACTOR * cfg.model_length
    prompt_ids = [tok.bos_token_id, *tok(PROMPT, add_special_tokens=False)["input_ids"]]
    print(
        f"\n== 2/2 generating {n_new} tokens ({LENGTH_FACTOR} x the {cfg.model_length}-token training "
        f"context) in blocks of {cfg.block_size}, first-hitting sampler, sliding window\n",
        flush=True,
    )
    ids: list[int] = []
    shown = 0
    sys.stdout.write(PROMPT)

    def on_block(seq: int, new: torch.Tensor) -> None:
        nonlocal shown
        ids.extend(int(i) for i in new.tolist())
        text = tok.decode(ids, skip_special_tokens=True)
        safe = len(text) - (1 if text.endswith("\ufffd") else 0)  # hold back half a multi-byte character
        if safe > shown:
            sys.stdout.write(text[shown:safe])
            sys.stdout.flush()
            shown = safe

    res = generate(
        model,
        input_ids=torch.tensor(prompt_ids),
        max_new_tokens=n_new,
        sampler="first_hitting",
        top_p=0.9,
        seed=SEED,
        on_block=on_block,
    )
    text = PROMPT + tok.decode(ids, skip_special_tokens=True)
    sys.stdout.write(text[len(PROMPT) + shown :] + "\n")
    out_file.write_text(text + "\n", encoding="utf-8")
    return {"tokens": len(ids), "nfe": res.nfe, "seconds": res.seconds, "stop": res.stop_reasons[0]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    try:
        summary = train_quickstart(argv)
        run_dir = Path(summary["run_dir"])
        hf = Path(summary.get("export") or run_dir / "hf")
        sample = run_dir / "sample.txt"
        gen = stream_sample(hf, sample)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, traceback with BD3LM_DEBUG=1
        if os.environ.get("BD3LM_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1
    ppl = summary.get("val_ppl")
    print(
        f"\n== done in {time.perf_counter() - t0:.0f}s. Generated {gen['tokens']} tokens with {gen['nfe']} "
        f"network calls in {gen['seconds']:.1f}s (stopped: {gen['stop']})."
    )
    if ppl is not None:
        print(f"   validation perplexity <= {ppl:.1f} (NELBO {summary['val_nll']:.3f} nats/token)")
    print(f"   model:   {hf}  (python generate.py checkpoint={hf} 'prompt=\"ROMEO:\"')")
    if summary.get("plot"):
        print(f"   plot:    {summary['plot']}")
    print(f"   sample:  {sample}")
    print(f"   metrics: {summary.get('metrics', run_dir / 'csv' / 'metrics.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

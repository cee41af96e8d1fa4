"""`make demo`: train the quickstart BD3-LM on the embedded Shakespeare corpus, sample a long text, watch it denoise.

1. ``python train.py experiment=quickstart`` (in-process): a small BD3-LM (blocks of L' = 4 tokens, a byte-level
   BPE trained on the corpus) for a few minutes on the CPU into ``runs/quickstart`` (resumed or skipped when a
   previous demo already trained it);
2. a long sample with the exported EMA weights: the first-hitting sampler, KV cache, and a sliding window, so the
   text (4 x model_length tokens) is several times longer than the training context; each block is printed as
   soon as it is committed;
3. a look inside: a few blocks generated step by step: each block's masked positions (``░``) are filled in
   over its denoising steps, then the block is committed to the KV cache and the next one starts;
4. the summary, with the share of the sample's words that occur in the corpus (real Shakespeare: 100%).

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
WATCH_BLOCKS = 6  # blocks shown step by step
SEED = 0
SAMPLING = {"sampler": "first_hitting", "temperature": 0.7, "top_p": 0.8}


def train_quickstart(overrides: list[str]) -> dict:
    """Run the quickstart training; returns train.py's summary (export path, validation perplexity, ...) and the
    corpus it trained on (``corpus``: ``data.path``, None for the embedded one)."""
    sys.path.insert(0, str(REPO))
    import train

    cfg = train.compose_config(["experiment=quickstart", *overrides])
    print(
        f"== 1/3 training the quickstart model into {cfg.run_dir} "
        f"(a few minutes on 2 CPU cores; rerunning resumes or skips it)",
        flush=True,
    )
    return {**train.run(cfg), "corpus": cfg.data.path}


def watch_denoising(model, tok, prompt_ids: list[int]) -> None:
    """Generate WATCH_BLOCKS blocks, drawing every denoising step (slowed down on a terminal)."""
    import torch

    from bd3lm.sampling import generate
    from bd3lm.sampling.display import DenoisingDisplay

    bs = model.config.block_size
    print(
        f"\n\n== 3/3 inside the sampler: {WATCH_BLOCKS} blocks of {bs} tokens; in each block the masked positions "
        f"(░) are filled in over {bs} steps, then the block joins the KV cache\n",
        flush=True,
    )
    with DenoisingDisplay(tok, PROMPT, delay=0.25 if sys.stdout.isatty() else 0.0) as view:
        generate(model, input_ids=torch.tensor(prompt_ids), max_new_tokens=WATCH_BLOCKS * bs, seed=SEED,
                 on_step=view, **SAMPLING)


def stream_sample(model, tok, out_file: Path) -> tuple[str, dict]:
    """Generate LENGTH_FACTOR x model_length tokens after PROMPT, printing every committed block."""
    import torch

    from bd3lm.sampling import generate

    cfg = model.config
    n_new = LENGTH_FACTOR * cfg.model_length
    prompt_ids = [tok.bos_token_id, *tok(PROMPT, add_special_tokens=False)["input_ids"]]
    print(
        f"\n== 2/3 generating {n_new} tokens ({LENGTH_FACTOR} x the {cfg.model_length}-token training "
        f"context) in blocks of {cfg.block_size}: first-hitting sampler (temperature {SAMPLING['temperature']}, "
        f"top-p {SAMPLING['top_p']}), KV cache, sliding window\n",
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

    res = generate(model, input_ids=torch.tensor(prompt_ids), max_new_tokens=n_new, seed=SEED, on_block=on_block,
                   **SAMPLING)
    generated = tok.decode(ids, skip_special_tokens=True)
    sys.stdout.write(generated[shown:] + "\n")
    out_file.write_text(PROMPT + generated + "\n", encoding="utf-8")
    return generated, {"tokens": len(ids), "nfe": res.nfe, "seconds": res.seconds, "stop": res.stop_reasons[0]}


def real_words(text: str, corpus: str | None) -> tuple[float, int]:
    """The share of the words of ``text`` that occur in the training corpus, and the word count."""
    from bd3lm.data import DEFAULT_CORPUS, read_documents
    from bd3lm.evaluation.real_words import real_word_rate, vocabulary

    r = real_word_rate(text, vocabulary(read_documents(str(corpus or DEFAULT_CORPUS))))
    return r.rate, r.total


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    try:
        summary = train_quickstart(argv)
        run_dir = Path(summary["run_dir"])
        hf = Path(summary.get("export") or run_dir / "hf")
        import torch
        from transformers import AutoTokenizer

        import bd3lm

        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        model = bd3lm.BD3LM.from_pretrained(hf).eval()
        tok = AutoTokenizer.from_pretrained(str(hf))
        sample = run_dir / "sample.txt"
        text, gen = stream_sample(model, tok, sample)
        rate, n_words = real_words(text, summary.get("corpus"))
        watch_denoising(model, tok, [tok.bos_token_id, *tok(PROMPT, add_special_tokens=False)["input_ids"]])
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, traceback with BD3LM_DEBUG=1
        if os.environ.get("BD3LM_DEBUG"):
            raise
        from bd3lm.faults import Refused

        hint = ""
        if isinstance(e, Refused) and not any(a.startswith("run_dir=") for a in argv):
            hint = " (runs/quickstart holds an earlier demo's run: mv runs/quickstart runs/quickstart.old)"
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}{hint}", file=sys.stderr)
        return int(getattr(e, "exit_code", 1))
    ppl = summary.get("val_ppl")
    print(
        f"\n== done in {time.perf_counter() - t0:.0f}s. Generated {gen['tokens']} tokens with {gen['nfe']} "
        f"network calls in {gen['seconds']:.1f}s (stopped: {gen['stop']})."
    )
    print(f"   real words: {rate:.1%} of the {n_words} generated words occur in the corpus (Shakespeare: 100%)")
    if ppl is not None:
        print(f"   validation perplexity <= {ppl:.1f} (NELBO {summary['val_nll']:.3f} nats/token)")
    print(f"   model:   {hf}  (python generate.py checkpoint={hf} prompt=\"ROMEO:\" show_steps=true)")
    if summary.get("plot"):
        print(f"   plot:    {summary['plot']}")
    print(f"   sample:  {sample}  (python -m eval.words sample={sample}: judge perplexity vs shuffled words)")
    print(f"   metrics: {summary.get('metrics', run_dir / 'csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

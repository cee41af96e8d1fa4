"""Benchmark: time and peak memory of one training step on CPU for BD3-LM, MDLM and AR of the same size.

    python -m eval.train_speed [--length 256 --block-size 4 --layers 4 --dim 256 --vocab 4096 --batch 16]

Each configuration runs in its own process (peak RSS is per process). ``bd3lm-official-like`` runs the output head
and a full-vocabulary fp32 log-softmax on all 2L positions before gathering the masked ones (what the official
code does); ``bd3lm`` runs the head on the masked x_t rows only. Results print as a table and go to JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ["bd3lm", "bd3lm-official-like", "mdlm", "ar"]


def one(args: argparse.Namespace) -> dict:
    import torch

    import bd3lm
    from bd3lm.objectives import diffusion_loss, loss

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    v = args.variant
    kw = dict(vocab_size=args.vocab, model_length=args.length, hidden_dim=args.dim, cond_dim=128,
              n_blocks=args.layers, n_heads=args.dim // 64, dropout=0.0)
    if v == "ar":
        cfg = bd3lm.BD3LMConfig(block_size=1, causal=True, cross_attn=False, adaln=False, **kw)
    elif v == "mdlm":
        cfg = bd3lm.BD3LMConfig(block_size=args.length, cross_attn=False, **kw)
    else:
        cfg = bd3lm.BD3LMConfig(block_size=args.block_size, **kw)
    model = bd3lm.BD3LM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randint(0, args.vocab - 1, (args.batch, args.length))
    g = torch.Generator().manual_seed(0)

    def official_like():
        from bd3lm.noise import get_schedule, sample_mask
        from bd3lm.objectives import stratified_t

        n_blocks = args.length // args.block_size
        t = stratified_t(args.batch, n_blocks, (1e-3, 1.0), g)
        masked = sample_mask(args.batch, args.length, args.block_size, t, get_schedule("loglinear"), generator=g)
        xt = torch.where(masked, cfg.mask_index, x0)
        logits = model(input_ids=torch.cat([xt, x0], 1), output_all=True).logits
        logp = logits.float()
        logp[..., cfg.mask_index] = -1e6
        logp = logp.log_softmax(-1)[:, : args.length]
        nll = -logp.gather(-1, x0[..., None]).squeeze(-1)
        w = (1 / t).repeat_interleave(args.block_size, 1)
        return (nll * masked * w).sum() / x0.numel()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = official_like() if v == "bd3lm-official-like" else loss(model, x0, generator=g).loss
        out.backward()
        opt.step()

    del diffusion_loss
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"variant": v, "precision": args.precision, "seconds_per_step": times[len(times) // 2],
            "tokens_per_second": args.batch * args.length / times[len(times) // 2],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--output", default="train_speed.json")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(one(args)))
        return
    rows = []
    for prec in args.precisions.split(","):
        for v in args.variants.split(","):
            cmd = [sys.executable, "-m", "eval.train_speed", *sys.argv[1:], "--variant", v, "--precision", prec]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            r = rows[-1]
            print(f"{r['variant']:>22} {r['precision']:>5}  {r['seconds_per_step'] * 1000:8.0f} ms/step  "
                  f"{r['tokens_per_second']:8.0f} tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                  f"({r['params_m']:.1f}M params)",
                  flush=True)
    with open(args.output, "w") as f:
        json.dump({"settings": {k: v for k, v in vars(args).items() if k not in ("variant", "precision")},
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

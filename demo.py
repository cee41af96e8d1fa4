"""`make demo`: the main job (replaced by the full train-then-generate run once the pipeline lands)."""

import torch

import bd3lm


def main() -> None:
    cfg = bd3lm.BD3LMConfig(vocab_size=64, model_length=32, block_size=4, hidden_dim=64, cond_dim=32, n_blocks=2,
                            n_heads=4, dropout=0.0)
    model = bd3lm.BD3LM(cfg).eval()
    x0 = torch.randint(0, 63, (2, 32))
    xt = torch.where(torch.rand(x0.shape) < 0.5, cfg.mask_index, x0)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([xt, x0], 1)).logits
    print(f"two-stream forward: input {tuple(torch.cat([xt, x0], 1).shape)} -> logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()

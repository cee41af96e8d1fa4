"""Infilling with a whole-sequence model: a span between a fixed prefix and a fixed suffix (SEDD §5.3).

The sequence ``prefix + span + suffix`` is one block; the given positions are clamped at every step and only the
span is denoised, with any rule of :mod:`bd3lm.sampling`. On the absorbing graph this is exact conditioning of
the learned reverse process (the given tokens are clean from the start and stay clean); on the uniform and
roulette graphs the re-clamping is the usual inpainting heuristic. A block-causal model (block size below the
sequence length) reads only the past, so a suffix cannot condition it: infilling is refused there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bd3lm.sampling.processing import TokenSampler
from bd3lm.sampling.rules import BlockRule

__all__ = ["check_infill", "infill"]


def check_infill(model, prefix_len: int, span: int, suffix_len: int) -> None:
    """One-line errors for a model that cannot infill or a sequence that does not fit."""
    cfg = model.config
    if cfg.causal or cfg.block_size < cfg.model_length:
        kind = "an autoregressive" if cfg.causal else f"a block-causal (block_size {cfg.block_size})"
        raise ValueError(
            f"infilling (a suffix) needs a whole-sequence model (block_size = model_length = {cfg.model_length}); "
            f"{kind} model never sees tokens after its block"
        )
    total = prefix_len + span + suffix_len
    if total > cfg.model_length:
        raise ValueError(
            f"prefix ({prefix_len}) + span ({span}) + suffix ({suffix_len}) = {total} tokens exceed the model's "
            f"length {cfg.model_length}"
        )


def infill(
    model, prefix: Tensor, suffix: Tensor, span: int, rule: BlockRule, sampler: TokenSampler
) -> tuple[Tensor, int]:
    """Fill ``span`` positions between ``prefix`` (B, P) and ``suffix`` (B, S); returns ``(sequences (B, P+span+S),
    number of network calls)``. The given positions are never changed."""
    cfg = model.config
    b, p_len = prefix.shape
    dev = prefix.device
    check_infill(model, p_len, span, suffix.shape[1])
    x = torch.cat([prefix, torch.full((b, span), cfg.mask_index, dtype=torch.long, device=dev), suffix], 1)
    free = torch.zeros_like(x, dtype=torch.bool)
    free[:, p_len : p_len + span] = True
    nfe = 0

    def call(x: Tensor, sigma: float | None = None) -> Tensor:
        nonlocal nfe
        nfe += 1
        ts = None
        if sigma is not None and cfg.time_conditioning:
            ts = torch.full((b,), sigma, dtype=torch.float32, device=dev)
        return model(input_ids=x, timesteps=ts, validate_ids=False).logits

    if getattr(rule, "rewrites", False):
        x = rule.init_block(x, free, sampler)
        for k in range(rule.n_calls):
            x = rule.update(call(x, rule.timestep(k)), x, free, k, sampler)
        return x, nfe
    todo = free.clone()
    rule.start_block(todo)
    logits, positions, stale = None, None, True
    for _ in range(span * max(getattr(rule, "steps", 1), 1) + span + 1):  # every rule finishes within this bound
        if not bool(todo.any()):
            return x, nfe
        if stale:  # as the block engine: a step that revealed nothing leaves x, hence the logits, unchanged
            positions = rule.reads(todo, sampler)
            logits, stale = call(x), False
        if positions is None:
            tokens, reveal = rule.step(logits, todo, sampler)
        else:
            picked = logits.gather(1, positions[:, :, None].expand(-1, -1, logits.shape[-1]))
            tokens, reveal = rule.step(picked, todo, sampler, positions=positions)
        reveal = reveal & todo
        if rule.always_reveals or bool(reveal.any()):
            x = torch.where(reveal, tokens, x)
            todo, stale = todo & ~reveal, True
        elif positions is not None:  # positions were drawn for this step only
            stale = True
    if bool(todo.any()):
        raise RuntimeError(f"rule {rule!r} did not fill the span within its step bound")
    return x, nfe

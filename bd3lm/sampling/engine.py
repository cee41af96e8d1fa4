"""The block loop of :func:`~bd3lm.sampling.generate`: semi-autoregressive sampling of BD3-LM (Arriola et al.
2025, Alg. 2) over a batch of sequences sharing one column grid.

The distribution sampled is ``p(x) = prod_b p_theta(x^b | x^{<b})``: blocks are generated left to right and each
block is denoised from all-mask by a pluggable update rule (:mod:`bd3lm.sampling.rules`) reading
``p_theta(x0^b | x_t^b, x^{<b})``. The loop delegates each policy to one unit:

- where each row's window starts and when the exact mode re-encodes: :class:`~bd3lm.sampling.layout.WindowPolicy`;
- what the KV cache holds and which clean columns the next call must feed:
  :class:`~bd3lm.sampling.cache_policy.CachePolicy`;
- which rows are done and what they generated: :class:`~bd3lm.sampling.stopping.Stopping`;
- which positions of a block to reveal at each step: the :class:`~bd3lm.sampling.rules.BlockRule`.

**One network call** (:meth:`BlockEngine._cached_forward`) feeds the clean columns not yet cached (the prompt,
a re-encoded window, or the block finished last) followed by the noisy block, attended block-causally (causally
for AR) with each row's window and padding mask; the clean columns are committed, the noisy block's keys/values
are left pending and rewritten by the next call. So NFE = one call per denoising step: a finished block costs
no extra call. Logits equal a from-scratch recomputation of the window (``kv_cache=False``,
:meth:`BlockEngine._plain_forward`) in the exact mode; ``streaming=True`` keeps stale keys/values instead of
re-encoding (approximate past the window, absolute positions). Memory is bounded by the window in the exact mode
and by 1.5 windows in streaming (which drops its oldest columns half a window at a time).

**AR models** (``config.causal``): the "block" is one token predicted from the logits of the previous position
(logits at i predict token i + 1); the call that predicts a token also commits the token before it.

**Limits.** The window W is at most ``model_length`` and a multiple of L', so an MDLM-like model (L' = L) sees
only its current block past the first window. The absorbing rules run time-conditioned checkpoints with sigma = 0
(the official sampler also zeroes sigma); the rewriting rules of the score family
(:mod:`bd3lm.sampling.score_rules`) pass their step's sigma on the noisy block and 0 on the clean columns, so the
cached prefix's keys/values never depend on a block's time.

**Rewriting rules** (``rule.rewrites``: SEDD's analytic and Euler predictors, any graph) start the block's free
positions at the graph's limit and update all of them at each of ``rule.n_calls`` calls, instead of revealing
masked positions one by one.

**NFE** = number of network calls over the active batch. Finished rows leave the batch at once, so a call costs
what the active rows cost.

**Step hook** (``on_step``): after every denoising step (a rule step of an absorbing rule, a call of a rewriting
rule, a token of an AR model) the engine hands one :class:`DenoisingStep` per sequence that took part in it to
the callback: the block's generated span as it stands (mask ids where still masked) and the positions that
changed. Without a hook the loop keeps no previous state, copies nothing to the host and makes no extra sync.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bd3lm.sampling.cache_policy import CachePolicy
from bd3lm.sampling.ddpm import DDPMRule
from bd3lm.sampling.layout import WindowPolicy, column_layout
from bd3lm.sampling.processing import TokenSampler
from bd3lm.sampling.rules import BlockRule
from bd3lm.sampling.steps import DenoisingStep, report_step
from bd3lm.sampling.stopping import Stopping

__all__ = ["PAD_ID", "BlockEngine"]

#: Token id written in pad columns. It is never attended, never the mask token's role, never returned.
PAD_ID = 0


class BlockEngine:
    """State of one :func:`~bd3lm.sampling.generate` run: active rows, the column buffer and the current block.

    Invariant: ``buf`` holds each active row's clean columns ``[cur - buf.shape[1], cur)`` (at least the ones the
    window or the cache policy may still read); ``cur`` is the first column of the block being generated (AR:
    the column of the token being predicted).
    """

    def __init__(
        self,
        model,
        prompts: list[Tensor],
        *,
        rule: BlockRule | None,
        sampler: TokenSampler,
        window: int,
        stride: int,
        streaming: bool,
        use_cache: bool,
        stopping: Stopping,
        on_logits: Callable[[list[int], Tensor], None] | None,
        on_step: Callable[[DenoisingStep], None] | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.ar = bool(cfg.causal)
        self.bs = 1 if self.ar else int(cfg.block_size)
        self.mask = int(cfg.mask_index)
        self.time_cond = bool(getattr(cfg, "time_conditioning", False))
        self.rule, self.sampler, self.stopping = rule, sampler, stopping
        self.on_logits = on_logits
        self.on_step = on_step
        self.dev = next(model.parameters()).device
        self.nfe = 0
        n, bs = len(prompts), self.bs
        self.ids = list(range(n))

        lengths = [len(p) for p in prompts]
        self.prompt_len = lengths  # by sequence index (the block index of an on_step report)
        if self.ar:
            nb, pads, rems = max(lengths), [max(lengths) - p for p in lengths], [0] * n
            self.cur = nb  # column of the token to predict
            self.keep_cols = window  # the inputs [cur - W, cur)
        else:
            nb, pads, rems = column_layout(lengths, bs)
            self.cur = nb * bs  # first column of the current block
            self.keep_cols = window - bs  # the committed prefix of the widest window
        buf = torch.full((n, self.cur), PAD_ID, dtype=torch.long)
        first = torch.full((n, bs), self.mask, dtype=torch.long)
        for i, (p, pad, rem) in enumerate(zip(prompts, pads, rems, strict=True)):
            full = len(p) - rem
            buf[i, pad : pad + full] = p[:full]
            first[i, :rem] = p[full:]
        self.buf = self._trim(buf).to(self.dev)
        self.first_x: Tensor | None = first.to(self.dev)
        self.rem = rems
        self.window = WindowPolicy(pads, window, stride, exact=not streaming)
        # Streaming encodes a finished block with the window it was generated in (see _clean_starts), which
        # reaches back one block further than the next block's window; and it keeps up to half a window of
        # masked columns, so that dropping the oldest (a copy of the whole cache) happens once per W/2
        # positions instead of once per block.
        capacity = window + (bs + window // 2 if streaming else 0)
        self.cache = CachePolicy(model, n, capacity, self.window) if use_cache else None
        self.block_done = False  # the columns [cur - L', cur) are a finished block not yet cached

    # -- network calls --------------------------------------------------------------------------------------

    def _trim(self, buf: Tensor) -> Tensor:
        return buf[:, buf.shape[1] - min(self.keep_cols, buf.shape[1]) :]

    def _prefix(self, start: int) -> Tensor:
        """Buffer columns ``[start, cur)``."""
        n_pre = self.cur - start
        return self.buf[:, self.buf.shape[1] - n_pre :] if n_pre > 0 else self.buf[:, :0]

    def _call(self, **kw) -> Tensor:
        self.nfe += 1
        return self.model(validate_ids=False, **kw).logits

    def _clean_starts(self, ws: Tensor) -> Tensor:
        """Window starts of the queries of the clean columns fed with the next call.

        Exact mode: ``ws`` (the cache was encoded with ``ws``, or is being re-encoded with it). Streaming: a
        finished block is encoded with the window it was generated in, as a separate commit call right after it
        would see it; only a prefill uses ``ws``.
        """
        if self.window.exact or not self.block_done:
            return ws
        return self.window.starts(self.cur)

    def _prepare(self, ws: Tensor, in_end: int) -> Tensor:
        """Let the cache policy make room for a call with window starts ``ws``; return the clean queries' starts."""
        ws_clean = self._clean_starts(ws)
        if self.cache is not None:
            self.cache.prepare(ws, in_end, int(torch.minimum(ws, ws_clean).min()))
        return ws_clean

    def _timesteps(self, inp: Tensor, n_noisy: int, sigma: float | None) -> Tensor | None:
        """Per-token σ for a time-conditioned model (a rewriting rule's σ on the last ``n_noisy`` inputs, 0 on the
        clean columns before them); ``None`` otherwise (the network then runs with σ = 0, folded)."""
        if sigma is None or not self.time_cond:
            return None
        ts = torch.zeros(inp.shape, dtype=torch.float32, device=inp.device)
        ts[:, inp.shape[1] - n_noisy :] = sigma
        return ts

    def _cached_forward(
        self,
        x: Tensor | None,
        ws: Tensor,
        n_out: int,
        ws_clean: Tensor,
        positions: Tensor | None,
        sigma: float | None = None,
    ) -> Tensor:
        """One cached call on the clean columns ``[end, cur)`` not cached yet, followed by ``x`` (a noisy block;
        ``None`` for AR); commits the clean columns and returns the last ``n_out`` logits (B, n_out, V).

        Query ``q`` attends key ``k`` iff ``k`` is in ``q``'s window (``ws_clean`` for clean queries, ``ws`` for
        the noisy block) and block(k) <= block(q) (block-causal; causal for AR), or ``k == q``."""
        cp, bs = self.cache, self.bs
        start, c0 = cp.end, cp.c0
        pre = self._prefix(start)
        inp = pre if x is None else (x if pre.shape[1] == 0 else torch.cat([pre, x], dim=1))
        n = inp.shape[1]
        q_cols = torch.arange(start, start + n, device=self.dev)
        pos = (q_cols[None, :] - self.window.rotary_base(ws).to(self.dev)[:, None]).clamp(min=0)
        mask = None
        if not cp.full_attention(torch.maximum(ws, ws_clean), c0, start // bs == (start + n - 1) // bs):
            k_cols = torch.arange(c0, start + n, device=self.dev)
            q_start = torch.where(q_cols[None, :] < self.cur, ws_clean.to(self.dev)[:, None], ws.to(self.dev)[:, None])
            causal = (k_cols[None, :] // bs) <= (q_cols[:, None] // bs)
            mask = (k_cols[None, None, :] >= q_start[:, :, None]) & causal[None]
            idx = torch.arange(n, device=self.dev)
            mask[:, idx, start - c0 + idx] = True  # a query in a pad column attends itself only
        out = dict(logits_to_keep=n_out) if positions is None else dict(logits_index=positions + n - n_out)
        ts = self._timesteps(inp, 0 if x is None else x.shape[1], sigma)
        logits = self._call(input_ids=inp, kv_cache=cp.cache, positions=pos, attention_mask=mask, timesteps=ts, **out)
        cp.commit(self.cur - start)  # the clean columns; x's slots are rewritten by the next call
        return logits

    def _plain_forward(
        self, x: Tensor | None, ws: Tensor, n_out: int, positions: Tensor | None, sigma: float | None = None
    ) -> Tensor:
        """Reference without cache: the whole window (buffer columns + ``x``) recomputed from scratch."""
        c0 = int(ws.min())
        pre = self._prefix(c0)
        inp = pre if x is None else torch.cat([pre, x], dim=1)
        n = inp.shape[1]
        ws_d = ws.to(self.dev)
        cols = torch.arange(c0, c0 + n, device=self.dev)
        pos = (cols[None, :] - ws_d[:, None]).clamp(min=0)
        keys = cols[None, :] >= ws_d[:, None]
        ts = self._timesteps(inp, 0 if x is None else x.shape[1], sigma)
        if positions is not None:
            return self._call(input_ids=inp, positions=pos, attention_mask=keys, logits_index=positions + n - n_out,
                              timesteps=ts)
        rows = torch.zeros(inp.shape, dtype=torch.bool, device=self.dev)
        rows[:, n - n_out :] = True
        logits = self._call(input_ids=inp, positions=pos, attention_mask=keys, logits_mask=rows, timesteps=ts)
        return logits.view(inp.shape[0], n_out, -1)

    def _forward(
        self,
        x: Tensor | None,
        ws: Tensor,
        n_out: int,
        ws_clean: Tensor,
        positions: Tensor | None = None,
        sigma: float | None = None,
    ) -> Tensor:
        """Logits (B, n_out, V) of the last ``n_out`` inputs, or (B, k, V) at ``positions`` (B, k) among them;
        ``sigma``: the noisy block's σ for a time-conditioned model (rewriting rules)."""
        if self.cache is None:
            logits = self._plain_forward(x, ws, n_out, positions, sigma)
        else:
            logits = self._cached_forward(x, ws, n_out, ws_clean, positions, sigma)
        if self.on_logits is not None:
            self.on_logits(list(self.ids), logits)
        return logits

    # -- steps ----------------------------------------------------------------------------------------------

    def _select(self, keep: list[bool]) -> None:
        """Drop finished rows from every per-row structure (the cache included)."""
        if all(keep):
            return
        rows_cpu = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)
        self.ids = [self.ids[i] for i in rows_cpu.tolist()]
        self.rem = [self.rem[i] for i in rows_cpu.tolist()]
        if not self.ids:
            return
        rows = rows_cpu.to(self.dev)
        self.buf = self.buf[rows]
        if self.first_x is not None:
            self.first_x = self.first_x[rows]
        self.window.select(rows_cpu)
        if self.cache is not None:
            self.cache.select(rows_cpu)

    def block_step(self) -> None:
        """Denoise the current block of every active row, record it, drop finished rows, move to the next
        block (whose first call commits this one)."""
        bs, dev = self.bs, self.dev
        ws = self.window.starts(self.cur + bs)
        ws_clean = self._prepare(ws, self.cur + bs)
        b = len(self.ids)
        lo = self.rem if self.first_x is not None else [0] * b
        hi = [min(lo_r + budget, bs) for lo_r, budget in zip(lo, self.stopping.budget(self.ids), strict=True)]
        if self.first_x is not None:
            x, self.first_x = self.first_x, None
        else:
            x = torch.full((b, bs), self.mask, dtype=torch.long, device=dev)
        ar = torch.arange(bs, device=dev)
        lo_d, hi_d = (torch.tensor(v, dtype=torch.long, device=dev) for v in (lo, hi))
        todo = (ar[None, :] >= lo_d[:, None]) & (ar[None, :] < hi_d[:, None])
        rule, sampler, on_step = self.rule, self.sampler, self.on_step
        if getattr(rule, "rewrites", False):  # score-family rules rewrite every free position at each call
            free = ar[None, :] >= lo_d[:, None]
            x = rule.init_block(x, free, sampler)
            n_calls = rule.n_calls
            for k in range(n_calls):
                prev = x
                x = rule.update(self._forward(x, ws, bs, ws_clean, sigma=rule.timestep(k)), x, free, k, sampler)
                if on_step is not None:
                    report_step(self, prev, x, lo, hi, k, [n_calls] * b, final=k == n_calls - 1)
            self._finish_block(x, lo, hi)
            return
        rule.start_block(todo)

        def denoise(x: Tensor, todo: Tensor) -> tuple[Tensor, Tensor | None]:
            positions = rule.reads(todo, sampler)  # drawn before the call: the network skips the rest
            return self._forward(x, ws, bs, ws_clean, positions), positions

        def step(logits: Tensor, todo: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor]:
            if positions is None:
                return rule.step(logits, todo, sampler)
            return rule.step(logits, todo, sampler, positions=positions)

        if rule.reveals_one_per_step:  # the step count is known: no host sync per step
            n_steps = [h - lo_r for lo_r, h in zip(lo, hi, strict=True)]
            for k in range(max(n_steps)):
                logits, positions = denoise(x, todo)
                tokens, reveal = step(logits, todo, positions)
                prev, x = x, torch.where(reveal, tokens, x)
                todo = todo & ~reveal
                if on_step is not None:
                    report_step(self, prev, x, lo, hi, k, n_steps)
        else:
            logits, positions, stale, k = None, None, True, 0
            total = [rule.steps] * b if isinstance(rule, DDPMRule) else [None] * b
            while bool(todo.any()):
                if stale:
                    (logits, positions), stale = denoise(x, todo), False
                tokens, reveal = step(logits, todo, positions)
                reveal = reveal & todo
                prev = x
                if rule.always_reveals or bool(reveal.any()):
                    x = torch.where(reveal, tokens, x)
                    todo, stale = todo & ~reveal, True
                elif positions is not None:  # positions were drawn for this step only
                    stale = True
                if on_step is not None:
                    report_step(self, prev, x, lo, hi, k, total)
                    k += 1
        self._finish_block(x, lo, hi)

    def _finish_block(self, x: Tensor, lo: list[int], hi: list[int]) -> None:
        """Record the finished block, drop finished rows, move to the next block (whose first call commits it)."""
        dev, bs = self.dev, self.bs
        keep = self.stopping.record(self.ids, x, lo, hi, self.nfe)
        if not all(keep):
            x = x[torch.tensor(keep, device=dev)]
        self._select(keep)
        if self.ids:
            self.buf = self._trim(torch.cat([self.buf, x], dim=1))
            self.cur += bs
            self.block_done = True

    def ar_step(self) -> None:
        """Predict every active row's token at column ``cur`` from the logits at ``cur - 1`` (AR shift)."""
        ws = self.window.starts(self.cur)
        logits = self._forward(None, ws, 1, self._prepare(ws, self.cur))
        tok = self.sampler.sample(logits[:, -1])[:, None]
        b = len(self.ids)
        if self.on_step is not None:
            report_step(self, torch.full_like(tok, self.mask), tok, [0] * b, [1] * b, 0, [1] * b, final=True)
        keep = self.stopping.record(self.ids, tok, [0] * b, [1] * b, self.nfe)
        if not all(keep):
            tok = tok[torch.tensor(keep, device=self.dev)]
        self._select(keep)
        if self.ids:
            self.buf = self._trim(torch.cat([self.buf, tok], dim=1))
            self.cur += 1

    def run(self) -> None:
        """Generate until every row has stopped (each step either finishes a row or adds tokens to all rows,
        and every row stops at ``max_new_tokens``, so the loop is bounded)."""
        while self.ids:
            if self.ar:
                self.ar_step()
            else:
                self.block_step()

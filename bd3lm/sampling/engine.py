"""Semi-autoregressive block sampling of BD3-LM (Arriola et al. 2025, Alg. 2) with an exact incremental KV
cache, batched variable-length prompts, sliding windows past the training context and per-sequence stopping.

The distribution sampled is ``p(x) = prod_b p_theta(x^b | x^{<b})``: blocks are generated left to right and
each block is denoised from all-mask by a pluggable update rule (:mod:`bd3lm.sampling.rules`) reading
``p_theta(x0^b | x_t^b, x^{<b})``.

**KV cache (exact).** The cache holds the keys/values of the *clean* committed prefix, computed block-causally
as the x_0 stream of training computes them (§3.2). Each denoising call runs the network on the current block
only (queries = L' tokens, keys = cached prefix + block). When a block is finished, one forward of the clean
block writes its keys/values and :meth:`~bd3lm.cache.KVCache.commit` appends them (one network call, counted
in NFE). The prompt prefill (and every window re-encode) is merged with the block's first denoising call: the
prefix and the noisy block go through one forward and only the prefix is committed.

**Windows.** See :mod:`bd3lm.sampling.layout`. In the default *exact* mode, whenever a sequence's window start
moves, the cache is reset and the surviving window is re-encoded once, with rotary positions relative to each
sequence's window start; logits then equal a from-scratch recomputation of the window (``kv_cache=False``).
The commit forward of a block is skipped when the next block re-encodes anyway. With ``streaming=True`` the
oldest positions are dropped from the cache (:meth:`~bd3lm.cache.KVCache.drop_oldest`) and the surviving keys
and values — computed while the dropped tokens were still visible — are kept; positions keep increasing
(absolute). This is approximate past the window and never re-encodes. Memory is bounded by the window in both
modes.

**AR models** (``config.causal``): the "block" is one token predicted from the logits of the previous position
(logits at i predict token i + 1); the forward of the newest token is both the prediction step and its commit,
so NFE = 1 per generated token.

**Limits.** The window W is at most ``model_length`` and a multiple of L', so an MDLM-like model (L' = L) sees
only its current block past the first window. Time-conditioned checkpoints are run with sigma = 0 (the
official sampler also zeroes sigma), since the clean prefix's keys/values cannot depend on a block's time.

**NFE** = number of network calls over the active batch: prefill/re-encode (merged with a denoising call when
the cache is on), denoising calls, and commit calls (one per finished block that has a successor; the last
block of a sequence is never committed since nothing reads it).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bd3lm.sampling.layout import column_layout, window_start
from bd3lm.sampling.processing import TokenSampler, check_sampling_args
from bd3lm.sampling.rules import BlockRule, make_rule

__all__ = ["ENTROPY_WINDOW", "GenerationResult", "generate", "unigram_entropy"]

#: The entropy stop looks at the unigram entropy of this many most recent generated tokens (official value).
ENTROPY_WINDOW = 256

#: Token id written in pad columns. It is never attended, never the mask token's role, never returned.
PAD_ID = 0


@dataclass
class GenerationResult:
    """Output of :func:`generate`.

    Attributes:
        sequences: per sequence, a 1-D CPU LongTensor ``prompt + generated`` (truncated after EOS, inclusive).
        stop_reasons: per sequence, ``"eos"``, ``"max_new_tokens"`` or ``"entropy"``.
        nfe: total number of network calls (each call runs over the whole active batch).
        tokens_per_forward: generated tokens (all sequences) / ``nfe``.
        seconds: wall-clock time of the generation loop.
        nfe_per_sequence: network calls each sequence took part in.
        num_new_tokens: generated tokens per sequence.
    """

    sequences: list[Tensor]
    stop_reasons: list[str]
    nfe: int
    tokens_per_forward: float
    seconds: float
    nfe_per_sequence: list[int] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def _prompts(
    input_ids: Tensor | Sequence[Tensor] | Sequence[Sequence[int]] | None,
    num_samples: int,
    bos_token_id: int | None,
) -> list[Tensor]:
    """Normalise ``input_ids`` into a list of 1-D CPU long tensors, each repeated ``num_samples`` times."""
    if input_ids is None:
        base = [torch.tensor([] if bos_token_id is None else [bos_token_id], dtype=torch.long)]
    elif isinstance(input_ids, Tensor):
        if input_ids.dim() == 1:
            base = [input_ids]
        elif input_ids.dim() == 2:
            if input_ids.shape[0] == 0:
                raise ValueError(
                    "input_ids has batch size 0; pass at least one prompt or None (unconditional)"
                )
            base = list(input_ids)
        else:
            raise ValueError(f"input_ids must be 1-D or (batch, length); got shape {tuple(input_ids.shape)}")
    else:
        base = list(input_ids)
        if not base:
            raise ValueError("input_ids is an empty list; pass at least one prompt or None (unconditional)")
    out = []
    for i, p in enumerate(base):
        t = torch.as_tensor(p).detach()
        if t.dim() != 1:
            raise ValueError(f"prompt {i} must be a 1-D sequence of token ids; got shape {tuple(t.shape)}")
        if t.numel() and (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"prompt {i} must hold integer token ids; got dtype {t.dtype}")
        out.extend([t.to("cpu", torch.long)] * num_samples)
    return out


class _Engine:
    """State of one :func:`generate` run (active rows, column buffer, cache, stop bookkeeping)."""

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
        max_new_tokens: int,
        stop_ids: list[int],
        stop_entropy: float | None,
        on_block: Callable[[int, Tensor], None] | None,
        on_logits: Callable[[list[int], Tensor], None] | None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.ar = bool(cfg.causal)
        self.bs = 1 if self.ar else int(cfg.block_size)
        self.mask = int(cfg.mask_index)
        self.rule, self.sampler = rule, sampler
        self.W, self.S = window, stride
        self.exact, self.use_cache = not streaming, use_cache
        self.max_new = max_new_tokens
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        self.stop_entropy = stop_entropy
        self.on_block, self.on_logits = on_block, on_logits
        self.dev = next(model.parameters()).device

        n = len(prompts)
        self.prompts = prompts
        self.ids = list(range(n))
        self.out: list[list[Tensor]] = [[] for _ in range(n)]
        self.count = [0] * n
        self.tails: list[deque[int]] = [deque(maxlen=ENTROPY_WINDOW) for _ in range(n)]
        self.reasons: list[str] = [""] * n
        self.nfe_seq = [0] * n
        self.nfe = 0

        lengths = [len(p) for p in prompts]
        bs = self.bs
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
        self.first_x = first.to(self.dev)
        self.rem = torch.tensor(rems, dtype=torch.long, device=self.dev)
        self.pad = torch.tensor(pads, dtype=torch.long, device=self.dev)
        self.cache = None
        self.c0 = 0  # column stored in cache slot 0
        self.enc_ws: Tensor | None = None  # window starts the cache was encoded with (exact mode)
        self.encode_pending = False
        self.is_first_block = True

    # -- helpers ----------------------------------------------------------------------------------------

    def _trim(self, buf: Tensor) -> Tensor:
        return buf[:, buf.shape[1] - min(self.keep_cols, buf.shape[1]) :]

    def _base(self, ws: Tensor) -> Tensor:
        """Column of rotary position 0 per row: window start (exact) or left pad (streaming: absolute)."""
        return ws if self.exact else self.pad

    def _prefix(self, c0: int) -> Tensor:
        """Buffer columns [c0, cur)."""
        n_pre = self.cur - c0
        return self.buf[:, self.buf.shape[1] - n_pre :] if n_pre > 0 else self.buf[:, :0]

    def _call(self, **kw) -> Tensor:
        self.nfe += 1
        return self.model(**kw).logits

    def _hook(self, logits: Tensor) -> None:
        if self.on_logits is not None:
            self.on_logits(list(self.ids), logits)

    def _prepare_cache(self, ws: Tensor, in_end: int) -> None:
        """Before a model call whose inputs end at column ``in_end``: (re)encode or make room in the cache."""
        if not self.use_cache:
            return
        if self.cache is None:
            self.cache = self.model.new_cache(len(self.ids), capacity=self.W)
            reencode = True
        else:
            reencode = self.exact and bool((ws != self.enc_ws).any())
        if reencode:
            self.cache.reset()
            self.c0, self.enc_ws, self.encode_pending = int(ws.min()), ws.clone(), True
        elif in_end - self.c0 > self.W:
            # Columns before every row's window start: masked for all rows, so dropping them is exact in the
            # exact mode; in streaming mode this is where the stale keys/values start being used.
            new_c0 = int(ws.min())
            self.cache.drop_oldest(new_c0 - self.c0)
            self.c0 = new_c0

    def _inputs(self, c0: int, x: Tensor | None) -> Tensor:
        """Buffer columns [c0, cur) followed by ``x`` (if any)."""
        pre = self._prefix(c0)
        return pre if x is None else torch.cat([pre, x], dim=1)

    def _window_forward(self, x: Tensor | None, ws: Tensor, n_out: int) -> Tensor:
        """Cached forward of buffer columns [c0, cur) followed by ``x``; returns the last ``n_out`` logits.

        The inputs are attended block-causally (causally for AR) with each row's window/padding mask; a
        query in a masked column attends to itself only. The buffer columns' keys/values are committed;
        ``x``'s are left pending (a noisy block, rewritten by the next call).
        """
        c0, bs = self.c0, self.bs
        inp = self._inputs(c0, x)
        n = inp.shape[1]
        cols = torch.arange(c0, c0 + n, device=self.dev)
        pos = (cols[None, :] - self._base(ws)[:, None]).clamp(min=0)
        key_ok = cols[None, :] >= ws[:, None]
        causal = (cols[None, :] // bs) <= (cols[:, None] // bs)
        eye = torch.eye(n, dtype=torch.bool, device=self.dev)
        mask = (key_ok[:, None, :] & causal[None]) | eye[None]
        logits = self._call(input_ids=inp, kv_cache=self.cache, positions=pos, attention_mask=mask)
        self.cache.commit(self.cur - c0)  # keep the clean columns only; x's slots are rewritten next call
        self.encode_pending = False
        return logits[:, n - n_out :]

    def _cached_forward(self, x: Tensor, ws: Tensor, start: int) -> Tensor:
        """Cached forward of ``x`` (B, m) at columns [start, start + m) after the cached [c0, start)."""
        m = x.shape[1]
        cols = torch.arange(self.c0, start + m, device=self.dev)
        mask = (cols[None, :] >= ws[:, None])[:, None, :].expand(-1, m, -1)
        pos = (torch.arange(start, start + m, device=self.dev)[None, :] - self._base(ws)[:, None]).clamp(
            min=0
        )
        return self._call(input_ids=x, kv_cache=self.cache, positions=pos, attention_mask=mask)

    def _plain_forward(self, x: Tensor | None, ws: Tensor, n_out: int) -> Tensor:
        """Reference without cache: the whole window (buffer columns + ``x``) recomputed from scratch."""
        c0 = int(ws.min())
        inp = self._inputs(c0, x)
        n = inp.shape[1]
        cols = torch.arange(c0, c0 + n, device=self.dev)
        pos = (cols[None, :] - ws[:, None]).clamp(min=0)
        keys = cols[None, :] >= ws[:, None]
        rows = torch.zeros(inp.shape, dtype=torch.bool, device=self.dev)
        rows[:, n - n_out :] = True
        logits = self._call(input_ids=inp, positions=pos, attention_mask=keys, logits_mask=rows)
        return logits.view(inp.shape[0], n_out, -1)

    # -- stopping ---------------------------------------------------------------------------------------

    def _finish(self, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Record the new tokens ``x[r, lo:hi]`` of every row, apply the stop rules; return who continues."""
        xc, lo_c, hi_c = x.cpu(), lo.tolist(), hi.tolist()
        keep = []
        for r, sid in enumerate(self.ids):
            new = xc[r, lo_c[r] : hi_c[r]]
            reason = ""
            if self.stop_ids.numel():
                hits = torch.isin(new, self.stop_ids).nonzero()
                if hits.numel():
                    new = new[: int(hits[0]) + 1]
                    reason = "eos"
            self.out[sid].append(new)
            self.count[sid] += new.numel()
            if not reason and self.count[sid] >= self.max_new:
                reason = "max_new_tokens"
            if self.stop_entropy is not None and not reason:
                tail = self.tails[sid]
                tail.extend(new.tolist())
                if len(tail) == ENTROPY_WINDOW and unigram_entropy(tail) < self.stop_entropy:
                    reason = "entropy"
            if self.on_block is not None and new.numel():
                self.on_block(sid, new)
            if reason:
                self.reasons[sid] = reason
                self.nfe_seq[sid] = self.nfe
            keep.append(not reason)
        return torch.tensor(keep, dtype=torch.bool)

    def _select(self, keep: Tensor) -> None:
        """Drop finished rows from every per-row structure (and the cache)."""
        if bool(keep.all()):
            return
        rows_cpu = keep.nonzero().squeeze(1)
        rows = rows_cpu.to(self.dev)
        self.ids = [self.ids[i] for i in rows_cpu.tolist()]
        self.buf, self.pad, self.rem, self.first_x = (
            t[rows] for t in (self.buf, self.pad, self.rem, self.first_x)
        )
        if self.enc_ws is not None:
            self.enc_ws = self.enc_ws[rows]
        if self.cache is not None and self.ids:
            self.cache.select(rows)

    # -- steps ------------------------------------------------------------------------------------------

    def block_step(self) -> None:
        """Denoise the current block of every active row, stop finished rows, commit the block of the rest."""
        bs, dev = self.bs, self.dev
        ws = window_start(self.cur + bs, self.pad, self.W, self.S)
        self._prepare_cache(ws, self.cur + bs)
        b = len(self.ids)
        lo = self.rem if self.is_first_block else torch.zeros(b, dtype=torch.long, device=dev)
        budget = torch.tensor([self.max_new - self.count[i] for i in self.ids], dtype=torch.long, device=dev)
        hi = torch.minimum(lo + budget, torch.full_like(lo, bs))
        x = (
            self.first_x.clone()
            if self.is_first_block
            else torch.full((b, bs), self.mask, dtype=torch.long, device=dev)
        )
        ar = torch.arange(bs, device=dev)
        todo = (ar[None, :] >= lo[:, None]) & (ar[None, :] < hi[:, None])
        self.rule.start_block(todo)
        logits, stale = None, True
        while bool(todo.any()):
            if stale:
                logits = self._denoise(x, ws)
                stale = False
            tokens, reveal = self.rule.step(logits, todo, self.sampler)
            reveal = reveal & todo
            if bool(reveal.any()):
                x = torch.where(reveal, tokens, x)
                todo = todo & ~reveal
                stale = True
        keep = self._finish(x, lo, hi)
        self._select(keep)
        if not self.ids:
            return
        rows = keep.nonzero().squeeze(1).to(dev)
        x, ws = x[rows], ws[rows]
        if self.use_cache:
            next_ws = window_start(self.cur + 2 * bs, self.pad, self.W, self.S)
            if not (self.exact and bool((next_ws != self.enc_ws).any())):
                self._cached_forward(x, ws, self.cur)  # the clean block's keys/values
                self.cache.commit()
        self.buf = self._trim(torch.cat([self.buf, x], dim=1))
        self.cur += bs
        self.is_first_block = False

    def _denoise(self, x: Tensor, ws: Tensor) -> Tensor:
        if not self.use_cache:
            logits = self._plain_forward(x, ws, self.bs)
        elif self.encode_pending:
            logits = self._window_forward(x, ws, self.bs)
        else:
            logits = self._cached_forward(x, ws, self.cur)
        self._hook(logits)
        return logits

    def ar_step(self) -> None:
        """Predict every active row's token at column ``cur`` from the logits at ``cur - 1`` (AR shift)."""
        ws = window_start(self.cur, self.pad, self.W, self.S)
        self._prepare_cache(ws, self.cur)
        if not self.use_cache:
            logits = self._plain_forward(None, ws, 1)
        elif self.encode_pending:
            logits = self._window_forward(None, ws, 1)
        else:
            logits = self._cached_forward(self.buf[:, -1:], ws, self.cur - 1)
            self.cache.commit()
        self._hook(logits)
        tok = self.sampler.sample(logits[:, -1])[:, None]
        zeros = torch.zeros(len(self.ids), dtype=torch.long, device=self.dev)
        keep = self._finish(tok, zeros, zeros + 1)
        self._select(keep)
        if self.ids:
            tok = tok[keep.nonzero().squeeze(1).to(self.dev)]
            self.buf = self._trim(torch.cat([self.buf, tok], dim=1))
            self.cur += 1

    def run(self) -> None:
        while self.ids:
            if self.ar:
                self.ar_step()
            else:
                self.block_step()


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy in nats of the empirical unigram distribution of ``tokens`` (0 for none); the entropy stop's
    statistic, and the entropy that sample-quality evaluation reports."""
    n = len(tokens)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log(c / n) for c in Counter(tokens).values())


def generate(
    model,
    input_ids: Tensor | Sequence[Tensor] | Sequence[Sequence[int]] | None = None,
    max_new_tokens: int | None = None,
    *,
    sampler: str | BlockRule = "first_hitting",
    steps: int | None = None,
    threshold: float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    top_p_rule: str = "hf",
    kv_cache: bool = True,
    stop: int | Sequence[int] | None = None,
    stop_entropy: float | None = None,
    seed: int | None = None,
    window: int | None = None,
    window_stride: int | None = None,
    streaming: bool = False,
    num_samples: int = 1,
    on_block: Callable[[int, Tensor], None] | None = None,
    bos_token_id: int | None = None,
    on_logits: Callable[[list[int], Tensor], None] | None = None,
) -> GenerationResult:
    """Generate continuations with a BD3-LM (or its AR / MDLM limits) — see the module docstring.

    Args:
        model: a :class:`~bd3lm.model.BD3LM` (``config.causal`` models are sampled autoregressively).
        input_ids: ``None`` (unconditional: an empty prompt, or ``[bos_token_id]``), a (B, P) tensor, a 1-D
            tensor, or a list of 1-D tensors / lists of ids of different lengths.
        max_new_tokens: generated tokens per sequence (default ``model_length``).
        sampler: ``"first_hitting"``, ``"ddpm"``, ``"confidence"`` or a :class:`BlockRule`; ignored by AR
        models.
        steps: DDPM steps per block (default L'). threshold: confidence threshold tau in (0, 1] (default 0.9).
        temperature: 0 = greedy. top_k: 0 = off. top_p: nucleus mass in (0, 1] (1 = off).
        top_p_rule: ``"hf"`` (default, Hugging Face convention: the token that crosses ``top_p`` is kept) or
            ``"official"`` (the BD3-LM code's rule: the token that crosses ``top_p`` is dropped); see
            :mod:`bd3lm.sampling.processing`.
        kv_cache: ``False`` recomputes the whole window at every call (the exactness reference).
        stop: EOS id(s); a sequence stops after producing one (kept in the output).
        stop_entropy: stop a sequence when the unigram entropy (nats) of its last 256 generated tokens falls
            below this value (the official rule uses 4.0); ``None`` = off.
        seed: seed of the run's ``torch.Generator`` (``None`` draws one from torch's global RNG).
        window: attention window W (default ``model_length``), a multiple of L' and at most ``model_length``.
        window_stride: positions dropped when the window slides (default L'), a multiple of L', at most W.
        streaming: keep stale keys/values when the window slides instead of re-encoding (approximate, faster).
        num_samples: samples per prompt (prompt i's samples are consecutive in the output).
        on_block: ``callback(seq_index, new_token_ids)`` called when a block (AR: a token) is finished.
        bos_token_id: prompt of unconditional generation.
        on_logits: debug hook ``(seq_indices, logits (B, n, V))`` called with the raw logits of every
            denoising / next-token network call.

    Returns:
        :class:`GenerationResult`. Raises a one-line ``ValueError`` for invalid arguments.
    """
    cfg = model.config
    ar = bool(cfg.causal)
    bs = 1 if ar else int(cfg.block_size)
    vocab, mask, length = int(cfg.vocab_size), int(cfg.mask_index), int(cfg.model_length)
    max_new_tokens = length if max_new_tokens is None else max_new_tokens
    _check_int(max_new_tokens, "max_new_tokens", 1)
    _check_int(num_samples, "num_samples", 1)
    check_sampling_args(temperature, top_k, top_p, top_p_rule)
    rule = make_rule(sampler, bs, steps, threshold)
    window = length if window is None else window
    _check_int(window, "window", 1)
    if window % bs:
        raise ValueError(f"window {window} is not a multiple of the block size {bs}")
    if window > length:
        raise ValueError(f"window {window} exceeds the model's training length model_length={length}")
    stride = bs if window_stride is None else window_stride
    _check_int(stride, "window_stride", 1)
    if stride % bs or stride > window:
        raise ValueError(
            f"window_stride {stride} must be a multiple of the block size {bs} and at most the window "
            f"{window}"
        )
    if streaming and not kv_cache:
        raise ValueError("streaming=True keeps stale cache entries; it needs kv_cache=True")
    if stop_entropy is not None and (
        isinstance(stop_entropy, bool) or not isinstance(stop_entropy, (int, float))
    ):
        raise ValueError(f"stop_entropy must be a number of nats or None; got {stop_entropy!r}")
    stop_ids = [] if stop is None else [stop] if isinstance(stop, int) else list(stop)
    for s in stop_ids + ([] if bos_token_id is None else [bos_token_id]):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < vocab or s == mask:
            raise ValueError(
                f"token id {s!r} (stop / bos) must be an int in [0, {vocab}) other than the mask {mask}"
            )
    prompts = _prompts(input_ids, num_samples, bos_token_id)
    for i, p in enumerate(prompts):
        if len(p) > window:
            raise ValueError(
                f"prompt {i // num_samples} has {len(p)} tokens, longer than the window {window}"
            )
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= vocab):
            raise ValueError(f"prompt {i // num_samples} has a token id outside the vocabulary [0, {vocab})")
        if bool((p == mask).any()):
            raise ValueError(f"prompt {i // num_samples} contains the mask token id {mask}")
        if ar and len(p) == 0:
            raise ValueError(
                "an autoregressive model needs a non-empty prompt (or bos_token_id for input_ids=None)"
            )

    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed))
    token_sampler = TokenSampler(mask, temperature, top_k, top_p, gen, top_p_rule=top_p_rule)
    engine = _Engine(
        model,
        prompts,
        rule=rule,
        sampler=token_sampler,
        window=window,
        stride=stride,
        streaming=streaming,
        use_cache=kv_cache,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        stop_entropy=None if stop_entropy is None else float(stop_entropy),
        on_block=on_block,
        on_logits=on_logits,
    )
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            engine.run()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    sequences = [torch.cat([p, *engine.out[i]]) for i, p in enumerate(prompts)]
    total = sum(engine.count)
    return GenerationResult(
        sequences=sequences,
        stop_reasons=engine.reasons,
        nfe=engine.nfe,
        tokens_per_forward=total / max(engine.nfe, 1),
        seconds=seconds,
        nfe_per_sequence=engine.nfe_seq,
        num_new_tokens=list(engine.count),
    )

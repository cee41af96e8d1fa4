"""Public entry point of sampling: :func:`generate` (arguments, prompts, the run) and its result.

The block loop itself is :class:`~bd3lm.sampling.engine.BlockEngine`; every argument is checked here, once per
call, so the loop's network calls skip input validation.
"""

from __future__ import annotations

import numbers
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bd3lm.sampling.engine import BlockEngine
from bd3lm.sampling.infill import check_infill, infill
from bd3lm.sampling.layout import default_stride
from bd3lm.sampling.processing import TokenSampler, check_sampling_args
from bd3lm.sampling.registry import resolve_rule
from bd3lm.sampling.rules import BlockRule
from bd3lm.sampling.steps import DenoisingStep
from bd3lm.sampling.stopping import Stopping

__all__ = ["GenerationResult", "generate"]


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


def _check_call_args(input_ids: object, suffix: object, seed: object) -> None:
    """Text instead of token ids, float ids and a bad seed: one-line errors before any work."""
    for name, value in (("input_ids", input_ids), ("suffix", suffix)):
        if isinstance(value, (str, bytes)) or (
            isinstance(value, (list, tuple)) and any(isinstance(v, (str, bytes)) for v in value)
        ):
            raise TypeError(f"{name} must be token ids, not text; tokenize first, e.g. tokenizer(text).input_ids")
        if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
            raise ValueError(f"{name} must hold integer token ids; got dtype {value.dtype}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63) or None; got {seed!r}")


_SIGMA_ZERO_WARNED: weakref.WeakSet = weakref.WeakSet()


def _warn_sigma_zero(model, rule: BlockRule) -> None:
    """Warn once per model when a time-conditioned diffusion model is sampled by a rule that feeds it σ = 0."""
    cfg = model.config
    if cfg.causal or not cfg.time_conditioning or getattr(rule, "rewrites", False) or model in _SIGMA_ZERO_WARNED:
        return
    _SIGMA_ZERO_WARNED.add(model)
    name = rule.name or type(rule).__name__
    warnings.warn(
        f"the model is time-conditioned (config.time_conditioning=True) but sampler {name!r} conditions it on "
        "sigma = 0 at every step; sampler='analytic' or 'euler' feeds each step's sigma",
        UserWarning, stacklevel=3,
    )


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


def generate(
    model,
    input_ids: Tensor | Sequence[Tensor] | Sequence[Sequence[int]] | None = None,
    max_new_tokens: int | None = None,
    *,
    sampler: str | BlockRule | None = None,
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
    suffix: Tensor | Sequence[int] | None = None,
    on_step: Callable[[DenoisingStep], None] | None = None,
) -> GenerationResult:
    """Generate continuations with a BD3-LM (or its AR / MDLM limits) — see the module docstring.

    Args:
        model: a :class:`~bd3lm.model.BD3LM` (``config.causal`` models are sampled autoregressively).
        input_ids: ``None`` (unconditional: an empty prompt, or ``[bos_token_id]``), a (B, P) tensor, a 1-D
            tensor, or a list of 1-D tensors / lists of ids of different lengths.
        max_new_tokens: generated tokens per sequence (default ``model_length``).
        sampler: ``"first_hitting"``, ``"ddpm"``, ``"confidence"`` (absorbing graph), ``"analytic"``,
            ``"euler"`` (SEDD's predictors, any graph; :mod:`bd3lm.sampling.score_rules`) or a
            :class:`BlockRule`; ignored by AR models. ``None``: first_hitting on the absorbing graph, else
            analytic.
        steps: steps per block of ddpm / analytic / euler (default L', with ``suffix`` the span; the score rules add
            one denoiser call).
            threshold: confidence threshold tau in (0, 1] (default 0.9).
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
        window_stride: positions dropped when the window slides, a multiple of L', at most W. Default: half the
            window in whole blocks (exact mode: one re-encode of W/2 positions per W/2 generated, so generation
            past the context keeps the first window's speed; every block sees at least W/2 positions), L' with
            ``streaming`` (nothing is re-encoded). ``window_stride=L'`` gives the most context in the exact mode
            (W - L' positions) at the cost of re-encoding W - L' positions per block. See
            :mod:`bd3lm.sampling.layout`.
        streaming: keep stale keys/values when the window slides instead of re-encoding (approximate, never
            re-encodes).
        num_samples: samples per prompt (prompt i's samples are consecutive in the output).
        on_block: ``callback(seq_index, new_token_ids)`` called when a block (AR: a token) is finished.
        bos_token_id: prompt of unconditional generation.
        on_logits: debug hook ``(seq_indices, logits (B, n, V))`` called with the raw logits of every
            denoising / next-token network call.
        suffix: token ids that must follow the generated span (infilling, :mod:`bd3lm.sampling.infill`):
            whole-sequence models only; every prompt is a prefix of the same length, ``max_new_tokens`` is the
            span (default: what fills ``model_length``) and ``sequences`` are ``prefix + span + suffix``.
        on_step: ``callback(step)`` called after every denoising step (AR: every token) with one
            :class:`~bd3lm.sampling.steps.DenoisingStep` per sequence taking part in it: the current block's
            generated positions (mask ids where still masked), the block and step indices and the positions that
            changed; a block's last step comes before its ``on_block``. ``None`` (default) costs nothing.
            :class:`~bd3lm.sampling.display.DenoisingDisplay` renders it.

    Returns:
        :class:`GenerationResult`. Raises a one-line ``ValueError`` for invalid arguments.
    """
    _check_call_args(input_ids, suffix, seed)
    cfg = model.config
    ar = bool(cfg.causal)
    bs = 1 if ar else int(cfg.block_size)
    vocab, mask, length = int(cfg.vocab_size), int(cfg.mask_index), int(cfg.model_length)
    if suffix is not None:
        ignored = {"stop": stop is not None, "stop_entropy": stop_entropy is not None, "window": window is not None,
                   "window_stride": window_stride is not None, "streaming": streaming, "on_block": on_block is not None,
                   "on_logits": on_logits is not None, "on_step": on_step is not None}
        if any(ignored.values()):
            raise ValueError(
                f"{', '.join(k for k, v in ignored.items() if v)} do not apply to infilling (suffix=): the span is "
                "one block of fixed length"
            )
        return _generate_infill(model, input_ids, suffix, max_new_tokens, sampler=sampler, steps=steps,
                                threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p,
                                top_p_rule=top_p_rule, seed=seed, num_samples=num_samples,
                                bos_token_id=bos_token_id)
    max_new_tokens = length if max_new_tokens is None else max_new_tokens
    _check_int(max_new_tokens, "max_new_tokens", 1)
    _check_int(num_samples, "num_samples", 1)
    check_sampling_args(temperature, top_k, top_p, top_p_rule)
    rule = resolve_rule(model, sampler, bs, steps, threshold, temperature, top_k, top_p)
    _warn_sigma_zero(model, rule)
    window = length if window is None else window
    _check_int(window, "window", 1)
    if window % bs:
        raise ValueError(f"window {window} is not a multiple of the block size {bs}")
    if window > length:
        raise ValueError(f"window {window} exceeds the model's training length model_length={length}")
    stride = default_stride(window, bs, streaming) if window_stride is None else window_stride
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
    stopping = Stopping(
        len(prompts), max_new_tokens, stop_ids, None if stop_entropy is None else float(stop_entropy), on_block
    )
    engine = BlockEngine(
        model,
        prompts,
        rule=rule,
        sampler=token_sampler,
        window=window,
        stride=stride,
        streaming=streaming,
        use_cache=kv_cache,
        stopping=stopping,
        on_logits=on_logits,
        on_step=on_step,
    )
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            engine.run()
    finally:
        model.train(was_training)
    outputs = stopping.outputs()  # the device-to-host copy ends the timed generation
    seconds = time.perf_counter() - start
    sequences = [torch.cat([p, outputs[i]]) for i, p in enumerate(prompts)]
    total = sum(stopping.count)
    return GenerationResult(
        sequences=sequences,
        stop_reasons=stopping.reasons,
        nfe=engine.nfe,
        tokens_per_forward=total / max(engine.nfe, 1),
        seconds=seconds,
        nfe_per_sequence=stopping.nfe_seq,
        num_new_tokens=list(stopping.count),
    )


def _generate_infill(
    model, input_ids, suffix, max_new_tokens, *, sampler, steps, threshold, temperature, top_k, top_p, top_p_rule,
    seed, num_samples, bos_token_id,
) -> GenerationResult:
    """:func:`generate` with a ``suffix``: fill the span between each prompt and the suffix (one block)."""
    cfg = model.config
    vocab, mask, length = int(cfg.vocab_size), int(cfg.mask_index), int(cfg.model_length)
    _check_int(num_samples, "num_samples", 1)
    check_sampling_args(temperature, top_k, top_p, top_p_rule)
    suf = torch.as_tensor(suffix).detach()
    if suf.dim() != 1 or suf.is_floating_point() or suf.is_complex():
        raise ValueError(f"suffix must be a 1-D sequence of integer token ids; got {tuple(suf.shape)} {suf.dtype}")
    prompts = _prompts(input_ids, num_samples, bos_token_id)
    if len({len(p) for p in prompts}) > 1:
        raise ValueError(f"infilling needs prefixes of one length; got lengths {sorted({len(p) for p in prompts})}")
    for name, ids in (("prefix", torch.cat(prompts)), ("suffix", suf)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab or bool((ids == mask).any())):
            raise ValueError(f"the {name} has a token id outside [0, {vocab}) or the mask id {mask}")
    p_len = len(prompts[0])
    span = length - p_len - len(suf) if max_new_tokens is None else max_new_tokens
    _check_int(span, "max_new_tokens (the span to fill)", 1)
    check_infill(model, p_len, span, len(suf))
    rule = resolve_rule(model, sampler, span, steps, threshold, temperature, top_k, top_p)  # default steps: span
    _warn_sigma_zero(model, rule)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed))
    token_sampler = TokenSampler(mask, temperature, top_k, top_p, gen, top_p_rule=top_p_rule)
    prefix = torch.stack(prompts).to(device) if p_len else torch.zeros(len(prompts), 0, dtype=torch.long, device=device)
    suffix_b = suf.to(device, torch.long)[None].expand(len(prompts), -1)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            x, nfe = infill(model, prefix, suffix_b, span, rule, token_sampler)
    finally:
        model.train(was_training)
    x = x.cpu()
    seconds = time.perf_counter() - start
    n = len(prompts)
    return GenerationResult(
        sequences=list(x), stop_reasons=["max_new_tokens"] * n, nfe=nfe, tokens_per_forward=n * span / max(nfe, 1),
        seconds=seconds, nfe_per_sequence=[nfe] * n, num_new_tokens=[span] * n,
    )

"""Sampling speed of :func:`bd3lm.sampling.generate`: generated tokens per second, NFE, and the machine record.

What :func:`speed` measures: the wall-clock time of complete ``generate`` calls (prompt prefill, every
denoising call, token sampling and bookkeeping — the whole call as a user sees it), the median
over ``repeats`` timed runs after ``warmup`` untimed ones, with ``torch.cuda.synchronize()`` before and after
each timed run on CUDA. Throughput counts **generated tokens only** (``sum(result.num_new_tokens)`` over all
rows of the batch); the prompt is never counted. Model construction and loading are not timed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bd3lm.evaluation.checks import check_int

__all__ = ["BF16_CPU_FLAGS", "SpeedResult", "environment", "speed"]

#: ``/proc/cpuinfo`` flags that matter for bfloat16 speed on CPU (AVX-512 BF16 and the AMX tile unit).
BF16_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


@dataclass
class SpeedResult:
    """Output of :func:`speed`.

    Attributes:
        tokens_per_s: generated tokens of one run (all rows) / ``seconds``.
        seconds: median wall-clock seconds of one timed ``generate`` call.
        seconds_all: every timed run, in order.
        new_tokens: generated tokens of one run, summed over all rows (prompt tokens excluded).
        prompt_tokens: prompt tokens of each row (not counted in ``new_tokens``).
        nfe: network calls of one run (each call runs over the whole active batch).
        tokens_per_forward: ``new_tokens / nfe``.
        batch_size: rows generated together.
        repeats: number of timed runs.
        kv_cache: whether the KV cache was on.
        settings: everything else that defines the measurement (requested tokens per row, warm-up, seed, sampler
            arguments, device and dtype of the model).
    """

    tokens_per_s: float
    seconds: float
    seconds_all: list[float]
    new_tokens: int
    prompt_tokens: int
    nfe: int
    tokens_per_forward: float
    batch_size: int
    repeats: int
    kv_cache: bool
    settings: dict[str, Any] = field(default_factory=dict)


def _jsonable(value: object) -> object:
    """``value`` if it is a plain JSON value, else its ``repr`` (callables, rule objects, tensors)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(
    model: torch.nn.Module,
    *,
    batch_size: int = 1,
    new_tokens: int | None = None,
    prompt_length: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    bos_token_id: int | None = None,
    seed: int = 0,
    **generate_kwargs: Any,
) -> SpeedResult:
    """Sampling throughput of ``model``: generated tokens per second of :func:`bd3lm.sampling.generate`.

    Every run generates ``new_tokens`` tokens for each of ``batch_size`` rows that share one prompt of
    ``prompt_length`` copies of ``bos_token_id`` (id 0 when ``None``; never the mask id). ``warmup`` untimed runs
    (with at most two blocks of new tokens) precede ``repeats`` timed runs; ``seconds`` is the median of the timed
    runs and ``tokens_per_s = new_tokens / seconds`` counts generated tokens only (all rows), never the prompt.
    Each timed run is the whole ``generate`` call (prefill, denoising calls, sampling), bracketed
    by ``torch.cuda.synchronize()`` when the model is on CUDA.

    Args:
        model: a :class:`~bd3lm.model.BD3LM` (AR models included), on its device and dtype already.
        batch_size: rows generated together (``num_samples`` of ``generate``).
        new_tokens: generated tokens per row (default ``model.config.model_length``).
        prompt_length: prompt tokens per row; 0 is an empty prompt (not allowed for AR models).
        repeats: timed runs. warmup: untimed runs before them.
        bos_token_id: the prompt's token id (default 0, or 1 when 0 is the mask id).
        seed: seed of every run (so every run samples the same tokens).
        **generate_kwargs: passed to ``generate`` (``sampler``, ``threshold``, ``kv_cache``, ``window``, ...).

    Returns:
        :class:`SpeedResult`. Raises a one-line ``ValueError`` for invalid arguments.
    """
    from bd3lm.sampling import generate

    cfg = model.config
    new_tokens = int(cfg.model_length) if new_tokens is None else new_tokens
    check_int(batch_size, "batch_size", 1)
    check_int(new_tokens, "new_tokens", 1)
    check_int(prompt_length, "prompt_length", 0)
    check_int(repeats, "repeats", 1)
    check_int(warmup, "warmup", 0)
    check_int(seed, "seed", 0)
    for key in ("input_ids", "max_new_tokens", "num_samples", "bos_token_id"):
        if key in generate_kwargs:
            raise ValueError(f"{key} is set by speed() itself; pass batch_size/new_tokens/prompt_length instead")
    mask = int(cfg.mask_index)
    if bos_token_id is None:
        token = 0 if mask != 0 else 1
    else:
        token = check_int(bos_token_id, "bos_token_id", 0)
        if token == mask or token >= int(cfg.vocab_size):
            raise ValueError(
                f"bos_token_id must be a token id in [0, {cfg.vocab_size}) other than the mask {mask}; got {token}"
            )
    if prompt_length == 0 and cfg.causal:
        raise ValueError("prompt_length=0 is an empty prompt, which an autoregressive model cannot start from")
    prompts = torch.full((1, prompt_length), token, dtype=torch.long)
    param = next(model.parameters())
    device = param.device
    block = 1 if cfg.causal else int(cfg.block_size)

    def run(n_new: int):
        return generate(model, prompts, max_new_tokens=n_new, num_samples=batch_size, seed=seed, **generate_kwargs)

    for _ in range(warmup):
        run(min(new_tokens, 2 * block))
    seconds_all: list[float] = []
    results = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        res = run(new_tokens)
        _sync(device)
        seconds_all.append(time.perf_counter() - t0)
        results.append(res)
    seconds = statistics.median(seconds_all)
    # Every run uses the same seed, so the counts agree; with stop rules they could in principle differ, and the
    # run closest to the median time is the one reported.
    res = min(zip(seconds_all, results, strict=True), key=lambda sr: abs(sr[0] - seconds))[1]
    generated = int(sum(res.num_new_tokens))
    return SpeedResult(
        tokens_per_s=generated / seconds,
        seconds=seconds,
        seconds_all=seconds_all,
        new_tokens=generated,
        prompt_tokens=prompt_length,
        nfe=int(res.nfe),
        tokens_per_forward=generated / max(int(res.nfe), 1),
        batch_size=batch_size,
        repeats=repeats,
        kv_cache=bool(generate_kwargs.get("kv_cache", True)),
        settings={
            "new_tokens_per_row": new_tokens,
            "prompt_length": prompt_length,
            "prompt_token_id": token,
            "warmup": warmup,
            "seed": seed,
            "block_size": block,
            "causal": bool(cfg.causal),
            "device": str(device),
            "dtype": str(param.dtype).removeprefix("torch."),
            "generate_kwargs": {k: _jsonable(v) for k, v in generate_kwargs.items()},
        },
    )


def _cpuinfo() -> tuple[str | None, set[str]]:
    """CPU model name and feature flags from ``/proc/cpuinfo`` (``(None, set())`` where it does not exist)."""
    path = "/proc/cpuinfo"
    if not os.path.exists(path):
        return None, set()
    name, flags = None, set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if name is not None and flags:
                    break
    except OSError:
        return None, set()
    return name, flags


def environment(model: torch.nn.Module | None = None) -> dict[str, Any]:
    """The machine a measurement ran on: platform, processor, torch version, threads, device and dtype, and the
    CPU flags relevant to bfloat16 (``avx512_bf16`` and AMX, from ``/proc/cpuinfo`` when it exists).

    ``device``/``dtype`` are the model's when ``model`` is given, else CUDA if available (else CPU) and torch's
    default dtype.
    """
    cpu_name, flags = _cpuinfo()
    if model is not None:
        p = next(model.parameters())
        device, dtype = p.device, p.dtype
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.get_default_dtype()
    env: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_name,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name,
        "dtype": str(dtype).removeprefix("torch."),
        "cpu_flags": {f: f in flags for f in BF16_CPU_FLAGS} if flags else None,
        "cpu_bf16_native": bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        env["cpu_capability"] = None
    return env

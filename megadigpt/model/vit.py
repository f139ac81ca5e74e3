"""A plain pre-norm ViT encoder with timm's parameter names, so the encoder loads into
``timm.models.vision_transformer.VisionTransformer`` with no key surgery."""

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

from .attention import Attention, AttentionMask
from .pos_embed import sincos_2d


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float


# timm's widths/depths/heads; ViT-e is PaLI's (width 1792, depth 56, MLP 15360).
VIT_SIZES = {
    "vit_tiny": ViTSize(192, 12, 3, 4.0),
    "vit_small": ViTSize(384, 12, 6, 4.0),
    "vit_base": ViTSize(768, 12, 12, 4.0),
    "vit_large": ViTSize(1024, 24, 16, 4.0),
    "vit_huge": ViTSize(1280, 32, 16, 4.0),
    "vit_giant": ViTSize(1408, 40, 16, 48 / 11),
    "vit_gigantic": ViTSize(1664, 48, 16, 64 / 13),
    "vit_e": ViTSize(1792, 56, 16, 15360 / 1792),
}


def default_taps(depth: int, num_taps: int = 4) -> List[int]:
    """1-indexed blocks evenly spread over the upper half of the depth: 12 -> 6,8,10,12; 24 -> 12,16,20,24."""
    if num_taps == 1:
        return [depth]
    return [max(1, math.floor(depth / 2 + i * (depth / 2) / (num_taps - 1) + 0.5)) for i in range(num_taps)]


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0, attention="sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, backend=attention)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, mask: Optional[AttentionMask] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), mask))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTEncoder(nn.Module):
    """ViT trunk. ``pos_embed`` is a fixed sin-cos buffer in timm's (1, 1 + N, C) layout with a zero CLS slot."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, attention: str = "sdpa"):
        super().__init__()
        self.embed_dim, self.depth = embed_dim, depth
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_2d(embed_dim, self.patch_embed.grid)[None])
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth rises linearly
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rates[i], attention) for i in range(depth))

    @property
    def grid(self) -> int:
        return self.patch_embed.grid

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, C) patch tokens with their position embedding, row-major over the patch grid."""
        return self.patch_embed(images) + self.pos_embed[:, 1:].to(images.dtype)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Full (unmasked) attention, CLS first: what the timm export computes. (B, 1 + N, C)."""
        x = self.embed_patches(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x

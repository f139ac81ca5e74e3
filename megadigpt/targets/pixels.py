import torch

from .base import Target


class PixelTarget(Target):
    """iGPT-style raw-pixel target: each patch's pixels, normalised per patch (zero mean, unit variance)."""

    def __init__(self, spec, patch_size: int):
        super().__init__()
        self.spec, self.patch_size = spec, patch_size

    @torch.no_grad()
    def forward(self, images):
        B, C, H, W = images.shape
        p = self.patch_size
        x = images.float().reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
        mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
        return (x - mean) / (var + 1e-6).sqrt(), None

import torch

from .base import Target


class PixelTarget(Target):
    """Pixel targets. ``normalise`` (layer ``norm``, MAE/iGPT-style raw pixels): each patch's pixels, normalised
    per patch (zero mean, unit variance). Otherwise (layer ``rgb``, the space of iGPT's colour palette): the input
    values as they are (the target's mean/std normalisation), C*p*p per patch; patch 1 makes every pixel a token."""

    def __init__(self, spec, patch_size: int, normalise: bool = True):
        super().__init__()
        self.spec, self.patch_size, self.normalise = spec, patch_size, normalise

    @torch.no_grad()
    def forward(self, images):
        B, C, H, W = images.shape
        p = self.patch_size
        x = images.float().reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
        if not self.normalise:
            return x, None
        mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
        return (x - mean) / (var + 1e-6).sqrt(), None

"""Discrete targets (iGPT's colour palette, DiGIT's k-means tokens): a feature target whose every token is replaced
by the index of its nearest codebook centroid (``target.tokenizer``; fit with ``megadigpt tokenizer fit``)."""

from dataclasses import replace

import torch

from ..tokenizer.kmeans import assign
from .base import Target


class TokenizedTarget(Target):
    """``inner`` -> (B, N) int64 centroid indices, no CLS target. The centroids stay fp32 on the inner target's
    device whatever dtype the module is cast to, so assignments do not change with the teacher's precision."""

    def __init__(self, inner: Target, centroids: torch.Tensor):
        super().__init__()
        if centroids.ndim != 2 or centroids.shape[1] != inner.spec.dim:
            raise ValueError(f"centroids {tuple(centroids.shape)} do not fit {inner.spec.dim}-d tokens")
        self.inner = inner
        self.spec = replace(inner.spec, classes=centroids.shape[0], has_cls=False)
        self.centroids = centroids.detach().float().contiguous()  # not a buffer: see _apply

    def _apply(self, fn, recurse=True):
        self.inner._apply(fn, recurse)
        where = fn(torch.empty(0, device=self.centroids.device))  # .to()/.cuda()/.cpu(): follow the device only
        self.centroids = self.centroids.to(where.device)
        return self

    @torch.no_grad()
    def forward(self, images):
        tokens, _ = self.inner(images)
        B, N, D = tokens.shape
        return assign(tokens.reshape(B * N, D), self.centroids).reshape(B, N), None

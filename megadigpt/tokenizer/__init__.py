"""Discrete targets' codebooks: k-means (``kmeans``), the codebook file with its provenance (``codebook``) and
``megadigpt tokenizer fit`` (``fit``: sample the training data, run the frozen target, cluster, save).

iGPT: 512 colours, k-means over RGB values (``target.kind=pixels, layer=rgb, patch_size=1``).
DiGIT: 8192 / 16k clusters of a self-supervised teacher's patch tokens (DINOv2, third-from-last block + final
norm: ``target.kind=timm, layer=-3``). Pretraining with ``target.tokenizer=<file>`` trains against the indices with
cross-entropy.
"""

from .codebook import Codebook, load_codebook
from .kmeans import assign, kmeans

__all__ = ["Codebook", "assign", "kmeans", "load_codebook"]

"""Segments, their order, and the block-causal segment mask (spec §1-2).

The patch grid (G x G patches) is cut into a g x g grid of segments ("clusters" in the paper); each segment is a
(G/g) x (G/g) block of patches. Segments are numbered row-major over the segment grid, and the patches inside a
segment row-major too. Per sample the S = g*g segments are put in a random order; the first S-1 are encoded, the
last is only a target. The encoder sequence is [seg_0 | seg_1 | ... | seg_{S-2} | CLS] in permuted order.
"""

from dataclasses import dataclass
from typing import Optional

import torch


def segment_patch_index(grid: int, segment_grid: int) -> torch.Tensor:
    """(S, T) long tensor: the row-major patch indices of each segment of a grid x grid patch grid."""
    if grid % segment_grid:
        raise ValueError(f"a {grid}x{grid} token grid cannot be cut into {segment_grid}x{segment_grid} segments")
    side = grid // segment_grid
    idx = torch.arange(grid * grid).reshape(segment_grid, side, segment_grid, side)
    return idx.permute(0, 2, 1, 3).reshape(segment_grid * segment_grid, side * side)


def segment_causal_mask(num_visible: int, tokens_per_segment: int, device=None) -> torch.Tensor:
    """Boolean (L, L) mask, True where a query (row) may attend to a key (column); L = num_visible*T + 1.

    Segment k sees segments 0..k; the last visible segment also sees CLS; CLS (last token) sees everything.
    """
    seg = torch.arange(num_visible, device=device).repeat_interleave(tokens_per_segment)
    seg = torch.cat([seg, torch.tensor([num_visible - 1], device=device)])  # CLS sits in the last visible block...
    mask = seg[:, None] >= seg[None, :]
    mask[-1, :] = True  # ...and sees everything; segments before the last cannot see it (column rule above)
    return mask


def random_segment_order(batch: int, num_segments: int, generator: Optional[torch.Generator] = None,
                         device=None) -> torch.Tensor:
    """(B, S) long tensor: an independent random permutation of the segments for each sample."""
    keys = torch.rand(batch, num_segments, generator=generator, device=device)
    return keys.argsort(dim=1)


@dataclass(frozen=True)
class SegmentLayout:
    """Every size the segment bookkeeping needs, derived from the patch grid and the segment grid."""

    grid: int  # patches per side
    segment_grid: int  # segments per side

    def __post_init__(self):
        if self.segment_grid < 2:
            raise ValueError("D-iGPT needs segment_grid >= 2 (at least one visible segment and one to predict)")
        if self.grid % self.segment_grid:
            raise ValueError(f"patch grid {self.grid} is not divisible by segment grid {self.segment_grid}")

    @property
    def num_segments(self) -> int:
        return self.segment_grid ** 2

    @property
    def segment_side(self) -> int:
        return self.grid // self.segment_grid

    @property
    def tokens_per_segment(self) -> int:
        return self.segment_side ** 2

    @property
    def num_visible(self) -> int:
        return self.num_segments - 1

    @property
    def seq_len(self) -> int:
        return self.num_visible * self.tokens_per_segment + 1

    def patch_index(self) -> torch.Tensor:
        return segment_patch_index(self.grid, self.segment_grid)

    def mask(self, device=None) -> torch.Tensor:
        return segment_causal_mask(self.num_visible, self.tokens_per_segment, device)

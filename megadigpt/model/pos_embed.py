"""Fixed 2-D sin-cos position embeddings, numerically identical to MAE's / the D-iGPT reference's numpy code."""

import torch


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """(1 + grid*grid, dim) float32 table, row-major over the patch grid; row 0 is a zero CLS slot if asked."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float32)
    # MAE stacks meshgrid(w, h): the first half of the channels encodes the column, the second the row.
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")
    emb = torch.cat([_sincos_1d(dim // 2, gw), _sincos_1d(dim // 2, gh)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()

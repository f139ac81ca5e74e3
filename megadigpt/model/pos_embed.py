"""Fixed 2-D sin-cos position embeddings, numerically identical to MAE's / the D-iGPT reference's numpy code.

Computed in numpy, as the reference does, and handed to torch with ``torch.as_tensor``, which DeepSpeed leaves
alone. Under ``deepspeed.zero.Init`` with bf16 (the partitioned ZeRO-3 build), DeepSpeed replaces torch's
factories (``arange``, ``zeros``, ``tensor`` ...) with wrappers that cast every floating tensor they make to the
engine dtype, so a table built from them was computed from bf16 positions and frequencies (4.8e-4 off the plain
build's table at width 64; ``tests/test_partitioned.py``). numpy is out of their reach."""

import numpy as np
import torch


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1, 1).astype(np.float64) * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """(1 + grid*grid, dim) float32 table, row-major over the patch grid; row 0 is a zero CLS slot if asked."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = np.arange(grid, dtype=np.float32)
    # MAE stacks meshgrid(w, h): the first half of the channels encodes the column, the second the row.
    gw, gh = np.meshgrid(coords, coords, indexing="xy")
    emb = np.concatenate([_sincos_1d(dim // 2, gw), _sincos_1d(dim // 2, gh)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim), dtype=emb.dtype), emb], axis=0)
    return torch.as_tensor(emb.astype(np.float32))  # follows a default-device context (the planner's meta build)

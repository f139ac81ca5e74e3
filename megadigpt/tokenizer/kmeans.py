"""Exact nearest-centroid assignment and Lloyd's k-means with k-means++ seeding, in torch (GPU when given one).

Both work in fp32 on row chunks, so memory stays bounded by ``chunk x k`` scores whatever the number of points.
"""

import math
from typing import Optional

import torch

CHUNK_ELEMENTS = 1 << 25  # scores per chunk (128 MiB in fp32)


def _chunk_rows(k: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(k, 1))


def _best(x: torch.Tensor, centroids: torch.Tensor, half_sq: torch.Tensor):
    """Nearest centroid of each row of ``x`` and its squared distance.

    ``argmin |x - c|^2 = argmax (x.c - |c|^2 / 2)``: one matrix product per chunk."""
    scores = torch.addmm(-half_sq[None], x, centroids.t())  # x.c - |c|^2/2
    best, idx = scores.max(dim=1)
    d2 = ((x * x).sum(dim=1) - 2 * best).clamp_min_(0)
    return idx, d2


@torch.no_grad()
def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: Optional[int] = None, return_distances: bool = False):
    """(N, D) points -> (N,) int64 index of the nearest centroid (squared Euclidean), computed in fp32."""
    c = centroids.float()
    half_sq = 0.5 * (c * c).sum(dim=1)
    rows = chunk or _chunk_rows(c.shape[0])
    idx, d2 = [], []
    for i in range(0, x.shape[0], rows):
        a, b = _best(x[i:i + rows].float(), c, half_sq)
        idx.append(a)
        d2.append(b)
    if not idx:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return (empty, empty.float()) if return_distances else empty
    idx = torch.cat(idx)
    return (idx, torch.cat(d2)) if return_distances else idx


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator, progress=None) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) over the rows of x."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = torch.empty(k, x.shape[1], device=x.device)
    centroids[0] = x[first]
    d2 = ((x - x[first]) ** 2).sum(dim=1)
    for j in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: the rest are duplicates (Lloyd re-seeds empty clusters)
            pick = int(torch.randint(n, (1,), generator=gen))
        else:
            u = float(torch.rand((), generator=gen)) * total
            pick = min(int(torch.searchsorted(torch.cumsum(d2.double(), 0), torch.tensor(u, dtype=torch.float64,
                                                                                       device=x.device))), n - 1)
        centroids[j] = x[pick]
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(dim=1))
        if progress is not None:
            progress(j + 1, k)
    return centroids


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, tol: float = 1e-4,
           init_points: Optional[int] = None, progress: bool = False, desc: str = "k-means"):
    """Lloyd's k-means over the rows of ``x`` (on x's device, fp32).

    Seeding: k-means++ on a random subsample of ``init_points`` rows (default ``min(n, max(20 k, 10000))``).
    Empty clusters are re-seeded at the points farthest from their centroids. Stops after ``iters`` iterations or
    when the mean squared distance improves by less than ``tol`` (relative).

    Returns ``(centroids (k, D) fp32, info)`` with info: ``inertia`` (mean squared distance to the nearest
    centroid, after the last update), ``history`` (per iteration), ``iterations``, ``sizes`` (points per cluster),
    ``reseeded`` (empty clusters re-seeded in total)."""
    if x.ndim != 2:
        raise ValueError(f"k-means needs (N, D) points, got {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means with k={k} needs at least k points, got {n}")
    x = x.float().contiguous()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    m = min(n, init_points or max(20 * k, 10000))
    sub = x[torch.randperm(n, generator=gen)[:m].to(x.device)] if m < n else x

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=k - 1 + iters, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)
        bar.set_postfix_str("k-means++ seeding", refresh=False)

    def seeded(j, total):
        bar.update(1)

    c = _kmeans_pp(sub, k, gen, seeded if bar is not None else None)  # the generator is on the CPU, always
    history, reseeded, prev = [], 0, math.inf
    sizes = torch.zeros(k, dtype=torch.long, device=x.device)
    for it in range(iters):
        idx, d2 = assign(x, c, return_distances=True)
        inertia = float(d2.mean())
        history.append(inertia)
        sizes = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        new = sums / sizes.clamp_min(1)[:, None].float()
        empty = (sizes == 0).nonzero().flatten()
        if len(empty):  # the farthest points become the empty clusters' centroids
            far = d2.topk(len(empty)).indices
            new[empty] = x[far]
            reseeded += len(empty)
        c = new
        if bar is not None:
            bar.set_postfix_str(f"iter {it + 1}: mean sq. distance {inertia:.4g}, empty {len(empty)}", refresh=False)
            bar.update(1)
        if len(empty) == 0 and prev < math.inf and (prev - inertia) <= tol * prev:
            break
        prev = inertia
    idx, d2 = assign(x, c, return_distances=True)
    sizes = torch.bincount(idx, minlength=k)
    if bar is not None:
        bar.close()
    return c, {"inertia": float(d2.mean()), "history": history, "iterations": len(history),
               "sizes": sizes.cpu(), "reseeded": reseeded}

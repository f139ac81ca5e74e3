"""``megadigpt tokenizer fit``: k-means codebook of a frozen target's tokens over a sample of the training data.

The sample is what pretraining feeds the teacher: the config's data source, its pretraining augmentation, the
teacher's resolution, normalisation and dtype. From each image ``tokens_per_image`` tokens are drawn at random
(all with 0); bad images (masked out in pretraining) are skipped. Then k-means (``kmeans.kmeans``) on the GPU when
there is one, and the centroids are saved with their provenance (``codebook``).
"""

import dataclasses
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from ..config import Config, ConfigError

DEFAULT_K = {"pixels": 512}  # iGPT's palette; every other target: DiGIT-B's 8192
DEFAULT_K_FEATURES = 8192


def plan_fit(cfg: Config, k: Optional[int], images: int, tokens_per_image: int, out: Optional[str], force: bool):
    """Every cheap check, before any model or data is touched. Returns (spec, k, out path, tokens per image)."""
    from ..data import check_source
    from ..targets.factory import describe_features

    spec = describe_features(cfg.target, cfg.model)  # the features, not a previous codebook's indices
    k = k or DEFAULT_K.get(cfg.target.kind, DEFAULT_K_FEATURES)
    out = out or cfg.target.tokenizer
    if not out:
        raise ConfigError("where should the tokenizer go? pass --out, or set target.tokenizer in the config")
    if Path(out).exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to replace it (or choose another --out)")
    if images < 1 or tokens_per_image < 0 or k < 1:
        raise ConfigError("--images and --k must be >= 1 and --tokens-per-image >= 0")
    per_image = spec.grid ** 2 if tokens_per_image == 0 else min(tokens_per_image, spec.grid ** 2)
    if images * per_image < k:
        raise ConfigError(f"{images} images x {per_image} tokens = {images * per_image} vectors: fewer than "
                          f"k={k}; sample more")
    from ..data import remote

    remote.configure_from(cfg.data)
    check_source(cfg.data.source)
    return spec, k, Path(out), per_image


def fit_tokenizer(cfg: Config, k: Optional[int] = None, images: int = 10000, tokens_per_image: int = 32,
                  iters: int = 30, seed: int = 0, out: Optional[str] = None, device: str = "auto",
                  batch: int = 64, force: bool = False, progress: bool = True, tol: float = 1e-4) -> dict:
    """Fit and save the codebook; returns a summary. ``progress``: progress bars on stderr."""
    spec, k, out_path, per_image = plan_fit(cfg, k, images, tokens_per_image, out, force)

    import torch

    from .. import __version__
    from ..data import PretrainStream, build_pretrain_loader, find_samples
    from ..distributed.engine import resolve_device
    from ..targets import build_target
    from ..train.common import auto_precision, normalizer, resolve_loader, torch_dtype
    from .codebook import Codebook, target_identity
    from .kmeans import kmeans

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here")
    # with its index: the DALI pipeline takes its device_id from it (an index-less "cuda" built it on the CPU)
    dev = resolve_device(device)
    tdtype = cfg.target.dtype if cfg.target.dtype != "auto" else auto_precision(dev.type)
    tcfg = dataclasses.replace(cfg.target, tokenizer=None)
    samples = find_samples(cfg.data.source)
    images = min(images, len(samples))
    print(f"tokenizer fit: {tcfg.kind} {tcfg.model or ''} layer {target_identity(tcfg, spec)['layer']} at "
          f"{spec.image_size} px -> {spec.grid}x{spec.grid} tokens of {spec.dim}-d; {images} images x {per_image} "
          f"tokens = {images * per_image} vectors ({images * per_image * spec.dim * 4 / 2**20:.0f} MiB); k={k}; "
          f"{device}", file=sys.stderr, flush=True)

    t0 = time.time()
    teacher = build_target(tcfg, cfg.model, device=dev, dtype=torch_dtype(tdtype))
    norm = normalizer(spec.mean, spec.std, torch_dtype(tdtype), dev)
    stream = PretrainStream(samples, [spec.image_size], cfg.model.segment_grid ** 2, seed, cfg.data.crop_scale,
                            cfg.data.crop_ratio, cfg.data.interpolation, cfg.data.hflip)
    steps = math.ceil(images / batch)
    loader = build_pretrain_loader(stream, batch, batch, 0, 1, 0, steps, cfg.data.num_workers,
                                   resolve_loader(cfg.data.loader), dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    chunks, seen, bad = [], 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=images, desc="teacher tokens", unit="img", dynamic_ncols=True, mininterval=1.0)
    for b in loader:
        valid = b["valid"].bool()
        x = norm(b["views"][0].to(dev, non_blocking=True))
        with torch.no_grad():
            tokens, _ = teacher(x)
        tokens = tokens.float()[valid.to(dev)]
        bad += int((~valid).sum())
        take = min(len(tokens), images - seen)
        tokens = tokens[:take]
        if per_image < spec.grid ** 2:
            pick = torch.rand(len(tokens), spec.grid ** 2, generator=gen).argsort(dim=1)[:, :per_image]
            tokens = tokens[torch.arange(len(tokens))[:, None].to(dev), pick.to(dev)]
        chunks.append(tokens.reshape(-1, spec.dim))
        seen += take
        if bar is not None:
            bar.update(take)
        if seen >= images:
            break
    if bar is not None:
        bar.close()
    vectors = torch.cat(chunks)
    del chunks
    if len(vectors) < k:
        raise ConfigError(f"only {len(vectors)} token vectors from {seen} good images ({bad} bad): fewer than k={k}")
    t_feat = time.time() - t0
    centroids, info = kmeans(vectors, k, iters=iters, seed=seed, tol=tol, progress=progress)
    t_km = time.time() - t0 - t_feat
    prov = {
        "target": target_identity(tcfg, spec),
        "data": {"source": cfg.data.source, "images": seen, "bad_images_skipped": bad, "vectors": len(vectors),
                 "tokens_per_image": per_image, "seed": seed, "augmentation": {
                     "crop_scale": list(cfg.data.crop_scale), "crop_ratio": list(cfg.data.crop_ratio),
                     "interpolation": cfg.data.interpolation, "hflip": cfg.data.hflip}},
        "kmeans": {"k": k, "iterations": info["iterations"], "inertia": info["inertia"],
                   "history": info["history"], "reseeded": info["reseeded"], "tol": tol, "max_iters": iters,
                   "device": str(dev), "teacher_dtype": tdtype},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "megadigpt": __version__,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "seconds": {"features": round(t_feat, 1), "kmeans": round(t_km, 1)},
    }
    book = Codebook(centroids.cpu(), info["sizes"], prov)
    book.save(out_path, overwrite=force)
    sizes = info["sizes"].float()
    summary = {"out": str(out_path), "k": k, "dim": spec.dim, "vectors": len(vectors), "images": seen,
               "bad_images": bad, "iterations": info["iterations"], "inertia": info["inertia"],
               "empty_clusters": int((sizes == 0).sum()), "largest_cluster_share": float(sizes.max() / sizes.sum()),
               "features_s": round(t_feat, 1), "kmeans_s": round(t_km, 1), "fingerprint": book.fingerprint()}
    return summary

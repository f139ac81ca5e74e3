"""The tokenizer file: k-means centroids and their provenance, and the check that a run uses it with the target it
was fit on.

One ``torch.save`` dict (read back with ``weights_only=True``)::

    format      "megadigpt-tokenizer", version 1
    centroids   (k, D) float32
    sizes       (k,) int64: training vectors per cluster
    provenance  target  : kind, model, layer, image_size, patch_size (pixels), dim, mean, std, weights
                data    : source, images, vectors, tokens_per_image, seed
                kmeans  : k, iterations, inertia, history, reseeded, init_points, tol, device
                created, megadigpt version, command

Training refuses a file whose ``provenance.target`` differs from the configured target in any field: token
indices are only meaningful for the features they were clustered from.
"""

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError

FORMAT, VERSION = "megadigpt-tokenizer", 1
IDENTITY = ("kind", "model", "layer", "image_size", "patch_size", "dim", "mean", "std", "weights")


def _weights_identity(weights: Optional[str]):
    """A weights file by name and size (it may live elsewhere on another cluster), a pretrained tag as itself."""
    if not weights:
        return None
    p = Path(weights)
    if p.is_file():
        return f"{p.name} ({p.stat().st_size} bytes)"
    return weights


def target_identity(tcfg, spec) -> dict:
    """What a token index depends on: the teacher, its weights, the layer, the resolution and normalisation."""
    from ..targets.base import resolved_layer

    pixels = tcfg.kind == "pixels"
    return {"kind": tcfg.kind, "model": None if pixels else tcfg.model, "layer": resolved_layer(tcfg),
            "image_size": spec.image_size, "patch_size": (spec.image_size // spec.grid) if pixels else None,
            "dim": spec.dim, "mean": [float(v) for v in spec.mean], "std": [float(v) for v in spec.std],
            "weights": None if pixels else _weights_identity(tcfg.weights)}


@dataclass
class Codebook:
    centroids: torch.Tensor  # (k, D) float32, CPU
    sizes: torch.Tensor  # (k,) training vectors per cluster
    provenance: dict = field(default_factory=dict)
    path: Optional[str] = None

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def fingerprint(self) -> str:
        """sha256 of the centroids (what a checkpoint records: resuming with other centroids is refused)."""
        return hashlib.sha256(self.centroids.float().contiguous().numpy().tobytes()).hexdigest()[:16]

    def check_matches(self, tcfg, spec):
        want = target_identity(tcfg, spec)
        have = self.provenance.get("target", {})
        diff = [f"{key} {have.get(key)!r} (config: {want[key]!r})" for key in IDENTITY if have.get(key) != want[key]]
        if diff:
            raise ConfigError(f"target.tokenizer {self.path} was fit on other features: " + "; ".join(diff) +
                              ". Fit one for this target: megadigpt tokenizer fit --config <this config>")
        if self.dim != spec.dim:
            raise ConfigError(f"target.tokenizer {self.path}: {self.dim}-d centroids for {spec.dim}-d tokens")

    def save(self, path, overwrite: bool = False) -> Path:
        """Write atomically (a temporary file renamed over the destination); never replaces a file unless asked."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} exists; choose another --out or pass --force to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        if os.path.lexists(tmp):  # our own pid's leftover (a killed earlier process): removed, never followed
            os.unlink(tmp)
        try:  # a fresh file (never an existing one, never through a planted link), renamed into place
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
            with os.fdopen(fd, "wb") as f:
                torch.save({"format": FORMAT, "version": VERSION, "centroids": self.centroids.float().cpu(),
                            "sizes": self.sizes.long().cpu(), "provenance": self.provenance}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self.path = str(path)
        return path


_LOADED: dict = {}


def load_codebook(path) -> Codebook:
    """Read and validate a tokenizer file; every problem is a one-line ConfigError. Read once per process (the
    early checks, the target and the resume check all ask), again if the file changes."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"target.tokenizer not found: {path} (create it with `megadigpt tokenizer fit`)")
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _read(p, path)
    return _LOADED[key]


def _read(p: Path, path) -> Codebook:
    try:
        d = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise ConfigError(f"target.tokenizer {path} is not a readable tokenizer file: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ConfigError(f"target.tokenizer {path} is not a megadigpt tokenizer file")
    if d.get("version") != VERSION:
        raise ConfigError(f"target.tokenizer {path} has format version {d.get('version')}; this megadigpt reads "
                          f"{VERSION}")
    c = d.get("centroids")
    if not isinstance(c, torch.Tensor) or c.ndim != 2 or c.shape[0] < 1 or not torch.isfinite(c).all():
        raise ConfigError(f"target.tokenizer {path}: centroids must be a finite (k, D) tensor")
    sizes = d.get("sizes")
    if not isinstance(sizes, torch.Tensor) or sizes.shape != (c.shape[0],):
        sizes = torch.zeros(c.shape[0], dtype=torch.long)
    return Codebook(c.float(), sizes, d.get("provenance") or {}, str(path))

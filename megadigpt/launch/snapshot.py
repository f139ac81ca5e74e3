"""Code snapshots for submitted jobs: a job that waits two days in the queue, or is requeued a week later, runs the
code it was submitted with, not whatever the checkout holds by then.

``<root>/code/<hash>/megadigpt/`` is a copy of the importable package (with ``ds_configs/``), named by the hash of
its content; ``SNAPSHOT.json`` beside it records where it came from (git commit and dirty state when the source is
a git checkout, the hash, the versions of the main packages), ``git.diff`` any uncommitted changes. A job's script
names its snapshot and puts it first on ``PYTHONPATH`` (with ``PYTHONSAFEPATH=1``: a job started in a checkout
still imports the snapshot), then runs ``srun python -m megadigpt ...``. Snapshots are never changed or removed: a
running or requeued job keeps its code when the run is submitted again with other code (which gets a snapshot of its
own)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache")
PACKAGES = ("torch", "deepspeed", "timm", "open_clip_torch", "nvidia-dali-cuda130", "mpi4py", "numpy")


def package_dir() -> Path:
    import megadigpt

    return Path(megadigpt.__file__).resolve().parent


def _files(root: Path):
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix not in (".pyc", ".pyo"))


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in _files(root):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _git(src: Path, *args) -> Optional[str]:
    try:
        p = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def _versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _copy_package(dest: Path) -> None:
    src = package_dir()
    shutil.copytree(src, dest / "megadigpt", ignore=_IGNORE)
    # a source checkout keeps ds_configs/ beside the package; an installed one inside it
    if not (dest / "megadigpt" / "ds_configs").is_dir():
        shutil.copytree(src.parent / "ds_configs", dest / "megadigpt" / "ds_configs", ignore=_IGNORE)


def snapshot(root, dry_run: bool = False) -> dict:
    """Copy the running megadigpt into ``<root>/code/<hash>`` (an identical snapshot already there is reused).
    Returns the record, with ``path`` (the folder to put on ``PYTHONPATH``)."""
    root = Path(root)
    src = package_dir()
    if dry_run:
        return {"path": str(root / "code" / "<hash>"), "source": str(src), "dry_run": True}
    (root / "code").mkdir(parents=True, exist_ok=True)
    staging = root / "code" / f".tmp{os.getpid()}-{int(time.time() * 1000)}"
    _copy_package(staging)
    digest = tree_hash(staging / "megadigpt")
    final = root / "code" / digest[:12]
    if (final / "SNAPSHOT.json").is_file():
        shutil.rmtree(staging)
        record = json.loads((final / "SNAPSHOT.json").read_text())
        return dict(record, path=str(final), reused=True)
    record = {"source": str(src), "sha256": digest, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "versions": _versions()}
    commit = _git(src, "rev-parse", "HEAD")
    if commit:
        status = _git(src, "status", "--porcelain", "--", ".") or ""
        record["git"] = {"commit": commit.strip(), "dirty": bool(status.strip())}
        if status.strip():
            (staging / "git.diff").write_text(_git(src, "diff", "HEAD", "--", ".") or "")
    (staging / "SNAPSHOT.json").write_text(json.dumps(record, indent=1) + "\n")
    if final.exists():  # a copy interrupted before its record was written
        shutil.rmtree(final)
    staging.rename(final)
    return dict(record, path=str(final))

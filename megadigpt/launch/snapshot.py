"""Code snapshots for submitted jobs: a job that waits two days in the queue, or is requeued a week later, runs the
code it was submitted with, not whatever the checkout holds by then.

``<root>/code/megadigpt/`` is a copy of the importable package (with ``ds_configs/``), ``<root>/code/SNAPSHOT.json``
records where it came from (git commit and dirty state when the source is a git checkout, a content hash, the
versions of the main packages), ``<root>/code/git.diff`` any uncommitted changes. Jobs put ``<root>/code`` first
on ``PYTHONPATH``."""

import hashlib
import json
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
    """Copy the running megadigpt into ``<root>/code``. An identical snapshot already there is reused; a different
    one is moved to ``code.<time>`` (kept, never deleted) and replaced, so every job of this run that starts from
    now on (pending, requeued) runs the new code. Returns the record."""
    root = Path(root)
    src = package_dir()
    staging = Path(root) / f".code.tmp{int(time.time() * 1000)}"
    if dry_run:
        return {"path": str(root / "code"), "source": str(src), "dry_run": True}
    root.mkdir(parents=True, exist_ok=True)
    _copy_package(staging)
    digest = tree_hash(staging / "megadigpt")
    record = {"source": str(src), "sha256": digest, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "versions": _versions()}
    commit = _git(src, "rev-parse", "HEAD")
    if commit:
        status = _git(src, "status", "--porcelain", "--", ".") or ""
        record["git"] = {"commit": commit.strip(), "dirty": bool(status.strip())}
        if status.strip():
            (staging / "git.diff").write_text(_git(src, "diff", "HEAD", "--", ".") or "")
    (staging / "SNAPSHOT.json").write_text(json.dumps(record, indent=1) + "\n")
    code = root / "code"
    if code.is_dir():
        try:
            old = json.loads((code / "SNAPSHOT.json").read_text()).get("sha256")
        except (OSError, ValueError):
            old = None
        if old == digest:
            shutil.rmtree(staging)
            record = json.loads((code / "SNAPSHOT.json").read_text())
            record["reused"] = True
            record["path"] = str(code)
            return record
        keep = root / time.strftime("code.%Y%m%d-%H%M%S")
        code.rename(keep)
        record["previous"] = str(keep)
    staging.rename(code)
    record["path"] = str(code)
    return record

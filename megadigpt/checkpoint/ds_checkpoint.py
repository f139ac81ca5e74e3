"""Checkpoints in ``<run_dir>/checkpoints/``: DeepSpeed's sharded layout per tag (``step_XXXXXXXX/``), plus

- ``step_XXXXXXXX/megadigpt.json``: written by rank 0 after every rank has finished saving. A tag without it is
  incomplete (a crash during the save) and is never resumed from.
- ``latest``: the newest complete tag, replaced atomically (temporary file, fsync, rename). If it is missing or
  unreadable, the newest complete tag is found by listing.

So a ``kill -9`` at any moment, during a save too, leaves a run directory that resumes from a complete
checkpoint. Older complete tags beyond ``keep`` are deleted after a new one is complete; incomplete ones are
deleted at the next successful save.
"""

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import List, Optional

MARKER = "megadigpt.json"
TAG_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_marker(run_dir, tag: str) -> Optional[dict]:
    try:
        return json.loads((checkpoint_dir(run_dir) / tag / MARKER).read_text())
    except (OSError, ValueError):
        return None


def complete_tags(run_dir) -> List[str]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    tags = [p.name for p in d.iterdir() if p.is_dir() and TAG_RE.match(p.name) and read_marker(run_dir, p.name)]
    return sorted(tags)


def latest_tag(run_dir) -> Optional[str]:
    """The tag to resume from: ``latest`` if it names a complete checkpoint, else the newest complete one."""
    f = checkpoint_dir(run_dir) / "latest"
    try:
        tag = f.read_text().strip()
    except OSError:
        tag = ""
    if tag and read_marker(run_dir, tag):
        return tag
    tags = complete_tags(run_dir)
    return tags[-1] if tags else None


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def set_latest(run_dir, tag: str):
    _atomic_write(checkpoint_dir(run_dir) / "latest", tag + "\n")


def save(engine, run_dir, step: int, client_state: dict, keep: int = 0, is_rank0: bool = True) -> str:
    """Save on every rank; rank 0 then marks the tag complete, points ``latest`` at it and prunes."""
    import torch.distributed as dist

    from ..testing import fault

    tag = tag_for(step)
    ckdir = checkpoint_dir(run_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckdir), tag=tag, client_state=client_state, save_latest=False)
    fault("kill_in_save", step)  # tests: die after the shards are written, before the tag is complete
    if dist.is_initialized():
        dist.barrier()  # every rank's shards are on disk
    if is_rank0:
        marker = {"step": step, "time": time.time(), **{k: v for k, v in client_state.items()
                                                         if v is None or isinstance(v, (int, float, str, dict, list))}}
        _atomic_write(ckdir / tag / MARKER, json.dumps(marker))
        set_latest(run_dir, tag)
        prune(run_dir, keep, protect=tag)
    if dist.is_initialized():
        dist.barrier()
    return tag


def prune(run_dir, keep: int, protect: str):
    d = checkpoint_dir(run_dir)
    complete = complete_tags(run_dir)
    for p in d.iterdir():
        if p.is_dir() and TAG_RE.match(p.name) and p.name not in complete and p.name != protect:
            shutil.rmtree(p, ignore_errors=True)  # a save that never completed
    if keep > 0:
        for tag in complete[:-keep]:
            if tag != protect:
                shutil.rmtree(d / tag, ignore_errors=True)
                shutil.rmtree(d / f"{tag}_universal", ignore_errors=True)


def universal_tag(tag: str) -> str:
    return f"{tag}_universal"


def make_universal(run_dir, tag: str) -> str:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format (loadable on any world size); idempotent."""
    import subprocess
    import sys

    d = checkpoint_dir(run_dir)
    out = d / universal_tag(tag)
    if (out / MARKER).is_file():
        return out.name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(d / tag),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {tag} to a universal checkpoint failed:\n{proc.stderr[-2000:]}")
    (out / MARKER).write_text((d / tag / MARKER).read_text())
    return out.name


def load(engine, run_dir, tag: str, universal: bool = False) -> dict:
    path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)),
                                                tag=universal_tag(tag) if universal else tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {checkpoint_dir(run_dir)}")
    return client_state or {}


def check_resumable(run_dir, train_cfg, tokenizer: Optional[str] = None):
    """Refuse (ConfigError) a run directory whose latest checkpoint was trained with another global batch or seed
    (the data order would change) or another tokenizer (``tokenizer``: the codebook's fingerprint; the token
    indices would mean other things). Cheap: reads the marker only."""
    from ..config import ConfigError

    tag = latest_tag(run_dir)
    marker = read_marker(run_dir, tag) if tag else None
    if not marker:
        return
    for key in ("global_batch", "seed"):
        if key in marker and marker[key] != getattr(train_cfg, key):
            raise ConfigError(f"{run_dir} was trained with train.{key}={marker[key]}, now "
                              f"{getattr(train_cfg, key)}: resuming would change the data order; use a new "
                              f"train.run_dir")
    if "tokenizer" in marker and marker["tokenizer"] != tokenizer:
        raise ConfigError(f"{run_dir} was trained with tokenizer {marker['tokenizer'] or 'none (features)'}, now "
                          f"{tokenizer or 'none (features)'}: resuming would change what the heads predict; use "
                          f"the same target.tokenizer or a new train.run_dir")


def resume_point(run_dir, train_cfg, world_size: int, rank0: bool, tokenizer: Optional[str] = None):
    """What a (re)started run resumes from, decided before the engine exists: ``(tag, marker, universal)``.
    Refuses what :func:`check_resumable` refuses. When the world size changed (ZeRO > 0), the checkpoint is
    converted to DeepSpeed's universal format (rank 0, once) and ``universal`` is True: the engine must be built
    with ``{"checkpoint": {"load_universal": True}}``."""
    import torch.distributed as dist

    check_resumable(run_dir, train_cfg, tokenizer)
    tag = latest_tag(run_dir)
    marker = read_marker(run_dir, tag) if tag else None
    if not tag:
        return None, None, False
    universal = bool(marker.get("world_size", world_size) != world_size and train_cfg.zero_stage > 0)
    if universal:
        if rank0:
            make_universal(run_dir, tag)
        if dist.is_initialized():
            dist.barrier()
    return tag, marker, universal

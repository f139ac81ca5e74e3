"""Checkpoints live in ``<run_dir>/checkpoints/step_XXXXXXXX/`` (DeepSpeed's sharded layout: one file of
partitioned optimizer state per rank plus model states); ``latest`` names the newest complete one. A run directory
that holds one resumes from it automatically."""

from pathlib import Path
from typing import Optional, Tuple


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir) -> Optional[str]:
    f = checkpoint_dir(run_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (checkpoint_dir(run_dir) / tag).is_dir() else None


def save(engine, run_dir, step: int, client_state: dict) -> str:
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(checkpoint_dir(run_dir)), tag=tag, client_state=client_state)
    return tag


def load_latest(engine, run_dir) -> Tuple[Optional[str], dict]:
    tag = latest_tag(run_dir)
    if tag is None:
        return None, {}
    path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {checkpoint_dir(run_dir)}")
    return tag, client_state or {}

"""DeepSpeed checkpoints in a run directory and automatic resume."""

from .ds_checkpoint import checkpoint_dir, latest_tag, load_latest, save

__all__ = ["checkpoint_dir", "latest_tag", "load_latest", "save"]

"""Checkpoints in a run directory: atomic, complete-or-ignored, pruned, resumable on any world size."""

from .ds_checkpoint import (check_resumable, check_schedule, finished_step, checkpoint_dir, complete_tags, latest_tag, load, make_universal, read_marker, resume_point,
                            save, set_latest)

__all__ = ["check_resumable", "check_schedule", "finished_step", "checkpoint_dir", "complete_tags", "latest_tag", "load", "make_universal", "read_marker", "resume_point", "save",
           "set_latest"]

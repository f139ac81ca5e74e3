"""Checkpoints in a run directory: atomic, complete-or-ignored, pruned, resumable on any world size."""

from .ds_checkpoint import (check_resumable, check_schedule, checkpoint_dir, complete_tags, finished_step, latest_tag,
                            load, make_universal, marker_status, read_marker, repair_universal_load, resumable_tag,
                            resume_point, ResumeState, save, set_latest, start_engine)

__all__ = ["check_resumable", "check_schedule", "checkpoint_dir", "complete_tags", "finished_step", "latest_tag",
           "load", "make_universal", "marker_status", "read_marker", "repair_universal_load", "resumable_tag",
           "resume_point", "ResumeState", "save", "set_latest", "start_engine"]

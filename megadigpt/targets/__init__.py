"""Frozen target models: image (in the teacher's own resolution and normalisation) -> target tokens.

Every target returns ``(tokens, cls)``: tokens (B, G*G, D) row-major over its G x G grid, cls (B, D) or None.
With ``target.tokenizer`` (discrete targets, ``discrete.TokenizedTarget``) tokens are (B, G*G) int64 indices of
the nearest codebook centroid and cls is None.
``describe_target`` answers the sizes from the config alone, without building anything, so that a bad pairing of
teacher and student is reported before any heavy initialisation.
"""

from .base import TargetSpec, example_targets, resolved_layer, student_targets
from .factory import build_target, describe_target

__all__ = ["TargetSpec", "build_target", "describe_target", "example_targets", "resolved_layer", "student_targets"]

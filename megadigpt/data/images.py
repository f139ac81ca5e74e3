"""The cheap header check of an image's bytes, before any decode: what both input paths (torch and DALI) and the
data tools refuse. Below ``pretrain_loader`` and ``dali_loader``."""

import io
from typing import Optional, Tuple

from PIL import Image

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit, applied to both paths


def examine_image(data: bytes) -> Tuple[Optional[str], int, int, Optional[str]]:
    """Cheap pre-decode check from the header: (problem or None, width, height, Pillow's format name)."""
    if not data:
        return "empty", 0, 0, None
    if len(data) < 8:
        return f"too short to be an image ({len(data)} bytes)", 0, 0, None
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            fmt = img.format
    except Exception as e:  # noqa: BLE001
        return f"not a recognisable image ({type(e).__name__})", 0, 0, None
    if w < 1 or h < 1:
        return f"image of size {w}x{h}", w, h, fmt
    if w * h > MAX_PIXELS:
        return f"too large ({w}x{h} pixels, over the {MAX_PIXELS}-pixel limit)", w, h, fmt
    if fmt in ("JPEG", "MPO") and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)", w, h, fmt
    return None, w, h, fmt

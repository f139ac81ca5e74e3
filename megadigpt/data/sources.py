"""Where images come from: webdataset shards (the layout img2dataset writes), image folders, the demo photos.

A source is resolved into a flat, ordered list of :class:`Sample` records; decoding happens in the loader.
"""

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

from ..config import ConfigError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jpe")
# Real photos that ship inside the scikit-image wheel: the embedded default data of the demo.
DEMO_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
               "ihc.png", "motorcycle_left.png", "motorcycle_right.png", "camera.png", "coins.png", "moon.png",
               "brick.png", "grass.png", "gravel.png", "color.png")


@dataclass(frozen=True)
class Sample:
    path: str  # an image file, or a tar shard
    offset: int = -1  # byte offset of the image member inside the tar (-1 for plain files)
    size: int = -1
    key: str = ""
    label: int = -1  # -1 where unknown

    def read(self, handles=None) -> bytes:
        if self.offset < 0:
            with open(self.path, "rb") as f:
                return f.read()
        f = handles.get(self.path) if handles is not None else None
        if f is None:
            f = open(self.path, "rb")
            if handles is not None:
                handles[self.path] = f
        f.seek(self.offset)
        return f.read(self.size)


def demo_dir() -> Path:
    try:
        import skimage
    except ImportError as e:  # pragma: no cover - installed with megadigpt
        raise ConfigError("the demo data needs scikit-image (pip install scikit-image)") from e
    return Path(skimage.__file__).parent / "data"


def _expand_braces(pattern: str) -> List[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, b = m.group(1), m.group(2)
    width = len(a)
    out = []
    for i in range(int(a), int(b) + 1):
        out += _expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])
    return out


def _resolve_paths(source: Union[str, Sequence[str]]):
    """-> ('demo', [files]) | ('tar', [shards]) | ('folder', root)"""
    items = [source] if isinstance(source, str) else list(source)
    if items == ["demo"]:
        d = demo_dir()
        files = [str(d / n) for n in DEMO_PHOTOS if (d / n).is_file()]
        if not files:
            raise ConfigError(f"no demo photos found in {d}")
        return "demo", files
    shards, folders = [], []
    for item in items:
        item = os.path.expanduser(str(item))
        expanded = _expand_braces(item)
        for e in expanded:
            if any(ch in e for ch in "*?["):
                matches = sorted(glob.glob(e))
                if not matches:
                    raise ConfigError(f"data source pattern matches no file: {e}")
                shards += [m for m in matches if m.endswith(".tar")]
                continue
            p = Path(e)
            if not p.exists():
                raise ConfigError(f"data source not found: {e}")
            if p.is_dir():
                tars = sorted(str(q) for q in p.glob("*.tar"))
                if tars:
                    shards += tars
                else:
                    folders.append(str(p))
            elif p.suffix == ".tar":
                shards.append(str(p))
            elif p.suffix == ".jsonl":
                if len(items) != 1:
                    raise ConfigError("a sample list (.jsonl) must be the only data source")
                return "list", str(p)
            else:
                raise ConfigError(f"data source {e} is neither a folder nor a .tar shard")
    if shards and folders:
        raise ConfigError("mixing image folders and tar shards in one source is not supported")
    if folders:
        if len(folders) > 1:
            raise ConfigError("give one image folder (or shards)")
        return "folder", folders[0]
    if not shards:
        raise ConfigError(f"data source {source!r} contains no .tar shards or images")
    return "tar", shards


def check_source(source) -> str:
    """Cheap existence check for early validation; returns the source kind."""
    kind, _ = _resolve_paths(source)
    return kind


def read_sample_list(path) -> List[Sample]:
    """A sample list (what ``data validate`` and ``data merge`` write): one JSON object per line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append(Sample(rec["path"], rec.get("offset", -1), rec.get("size", -1), rec.get("key", ""),
                                  rec.get("label", -1)))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{n}: not a sample record ({e})")
    return out


def write_sample_list(path, samples, extra=None) -> None:
    """Write samples (plus optional per-sample dicts, e.g. the source name) as a .jsonl sample list, atomically."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        for i, s in enumerate(samples):
            rec = {"path": s.path, "offset": s.offset, "size": s.size, "key": s.key, "label": s.label}
            if extra is not None:
                rec.update(extra[i])
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def _read_dali_index(shard: str):
    """Offsets from a DALI webdataset index (``<shard>.idx``, as wds2idx or ``data build`` write it)."""
    idx = Path(shard).with_suffix(".idx")
    if not idx.is_file():
        return None
    lines = idx.read_text().splitlines()
    if not lines or not lines[0].startswith("v1."):
        return None
    recs = []
    for line in lines[1:]:
        parts = line.split()
        comps = {}
        for j in range(0, len(parts) - 3, 4):
            ext, off, size, name = parts[j:j + 4]
            comps["." + ext.lower()] = (int(off), int(size), name)
        recs.append(comps)
    return recs


def _tar_samples(shard: str) -> List[Sample]:
    indexed = _read_dali_index(shard)
    if indexed is not None:
        out = []
        with open(shard, "rb") as f:
            for comps in indexed:
                img = next((comps[e] for e in IMAGE_EXTS if e in comps), None)
                if img is None:
                    continue
                label = -1
                if ".cls" in comps:
                    f.seek(comps[".cls"][0])
                    try:
                        label = int(f.read(comps[".cls"][1]).decode("ascii").strip())
                    except (UnicodeDecodeError, ValueError):
                        label = -1
                out.append(Sample(shard, img[0], img[1], img[2].split(".", 1)[0], label))
        return out
    members = {}
    try:
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                if "." not in base:
                    continue
                key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                ext = "." + base.split(".", 1)[1].lower()
                members.setdefault(key, {})[ext] = m
            labels = {}
            for key, parts in members.items():
                if ".cls" in parts:
                    raw = tf.extractfile(parts[".cls"]).read()
                    try:
                        labels[key] = int(raw.decode("ascii").strip())
                    except (UnicodeDecodeError, ValueError):
                        labels[key] = -1  # unparsable label: the sample still serves pretraining
    except (tarfile.TarError, OSError) as e:
        raise ConfigError(f"cannot read shard {shard}: {e}")
    out = []
    for key, parts in members.items():
        img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if img is None:
            continue  # a sample with no image component is skipped
        out.append(Sample(shard, img.offset_data, img.size, key, labels.get(key, -1)))
    return out


def find_samples(source) -> List[Sample]:
    kind, where = _resolve_paths(source)
    if kind == "demo":
        return [Sample(f, key=Path(f).stem) for f in where]
    if kind == "list":
        return read_sample_list(where)
    if kind == "tar":
        out = []
        for shard in where:
            out += _tar_samples(shard)
    else:
        root = Path(where)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        cidx = {c: i for i, c in enumerate(classes)}
        out = [Sample(str(p), key=str(p.relative_to(root)),
                      label=cidx.get(p.relative_to(root).parts[0], -1) if len(p.relative_to(root).parts) > 1 else -1)
               for p in files]
    if not out:
        raise ConfigError(f"data source {source!r} holds no images")
    return out


def label_names(source) -> Optional[List[str]]:
    """Class names in label order, where the source says: class folders (sorted, e.g. ImageNet synsets), or a
    ``classes.txt`` (one name per line) beside tar shards or a sample list. None where unknown."""
    kind, where = _resolve_paths(source)
    if kind == "folder":
        root = Path(where)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) or None
    first = where[0] if isinstance(where, list) and where else where
    if kind in ("tar", "list") and first:
        f = Path(first).parent / "classes.txt"
        if f.is_file():
            return [line.strip() for line in f.read_text().splitlines() if line.strip()]
    return None

"""Offline dataset tooling behind ``megadigpt data ...``: validate, build shards, merge sources, ImageNet-21K labels.

Shards are webdataset tars (``<key>.jpg`` + ``<key>.cls``) with a DALI index (``.idx``, the wds2idx format) beside
each and a ``manifest.json`` (counts, classes, sources, sha256 per shard). Sample lists (``.jsonl``, one sample
per line, pointing into shards or files) are what ``validate`` and ``merge`` write; they are a data source too.
"""

import hashlib
import io
import json
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..config import ConfigError
from .sources import Sample, find_samples, scan_source, write_sample_list


def _progress(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


# ============================================================================ validate

def check_sample(sample: Sample) -> Optional[str]:
    """None if the sample decodes (by the same rules as the training loaders), else why not. Images DALI does not
    decode but Pillow does (GIF bytes named .jpg, 1-bit TIFF) are fine: both loaders decode them with Pillow."""
    from .dali_loader import examine_image
    from .pretrain_loader import decode_problem, decode_rgb

    try:
        data = sample.read()
    except OSError as e:
        return f"unreadable: {e.strerror}"
    problem = examine_image(data)[0]
    if problem:
        return problem
    try:
        decode_rgb(data)
    except Exception as e:  # noqa: BLE001
        return decode_problem(data, e)
    return None


def _check_chunk(samples: List[Sample]):
    return [check_sample(s) for s in samples]


def validate(source, out_dir, workers: int = 2, progress: bool = True) -> Dict[str, int]:
    """List and decode every sample; write ``clean.jsonl`` (a sample list to train from) and ``bad.jsonl`` (the
    bad samples with reasons: ``kind`` "index" for what listing the source found (a damaged shard has an empty
    ``key``; samples without an image member; unparsable labels; members cut off), "decode" for the rest)."""
    samples, problems = scan_source(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunks = [samples[i:i + 256] for i in range(0, len(samples), 256)]
    reasons: List[Optional[str]] = []
    bar = _progress(len(samples), "validate", progress)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for res in pool.map(_check_chunk, chunks):
            reasons += res
            bar.update(len(res))
    bar.close()
    clean = [s for s, r in zip(samples, reasons) if r is None]
    bad = [(Sample(p.path, key=p.key), p.reason, "index") for p in problems]
    bad += [(s, r, "decode") for s, r in zip(samples, reasons) if r is not None]
    write_sample_list(out / "clean.jsonl", clean)
    write_sample_list(out / "bad.jsonl", [s for s, _, _ in bad], [{"reason": r, "kind": k} for _, r, k in bad])
    keyed = sum(1 for p in problems if p.key)
    return {"total": len(samples) + keyed, "clean": len(clean), "bad": len(bad) - (len(problems) - keyed),
            "damaged_shards": len({p.path for p in problems if not p.key})}


# ============================================================================ build shards

def _file_list(path: str) -> List[Sample]:
    """A text file list: ``<image path> [<label>]`` per line (relative paths are relative to the list)."""
    base = Path(path).parent
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        p = Path(parts[0]) if Path(parts[0]).is_absolute() else base / parts[0]
        try:
            label = int(parts[1]) if len(parts) > 1 else -1
        except ValueError:
            raise ConfigError(f"{path}:{n}: label {parts[1]!r} is not an integer")
        out.append(Sample(str(p), key=p.stem, label=label))
    return out


def resolve_build_input(source) -> List[Sample]:
    if isinstance(source, str) and source.endswith(".txt") and Path(source).is_file():
        return _file_list(source)
    return find_samples(source)


def _write_shard(path: Path, samples: Sequence[Sample], first_index: int):
    """Write one shard atomically (temp file + rename) and its DALI index; returns (sha256, count, classes)."""
    tmp = path.with_suffix(".tar.tmp")
    idx_lines = []
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for j, s in enumerate(samples):
            key = f"{first_index + j:09d}"
            data = s.read()
            ext = Path(s.key or s.path).suffix.lower().lstrip(".") if s.offset < 0 else "jpg"
            ext = ext if ext in ("jpg", "jpeg", "png", "webp") else "jpg"
            comps = [(ext, data), ("cls", str(s.label).encode())] if s.label >= 0 else [(ext, data)]
            line = []
            for e, payload in comps:
                info = tarfile.TarInfo(f"{key}.{e}")
                info.size, info.mtime = len(payload), 0
                offset = tf.fileobj.tell() + tarfile.BLOCKSIZE  # data follows the 512-byte header
                tf.addfile(info, io.BytesIO(payload))
                line.append(f"{e} {offset} {len(payload)} {key}.{e}")
            idx_lines.append(" ".join(line))
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path.with_suffix(".idx").write_text(f"v1.2 {len(samples)}\n" + "\n".join(idx_lines) + "\n")
    os.replace(tmp, path)
    return sha, len(samples), sorted({s.label for s in samples if s.label >= 0})


def build(source, out_dir, shard_size: int = 10000, prefix: str = "shard", progress: bool = True) -> dict:
    """Write shards of ``shard_size`` samples. Restartable: shards already recorded as done are kept."""
    if shard_size < 1:
        raise ConfigError("--shard-size must be >= 1")
    samples = resolve_build_input(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / ".build_progress.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    if done.get("count") not in (None, len(samples)) or done.get("shard_size") not in (None, shard_size):
        raise ConfigError(f"{out} holds a build of a different input or shard size; use an empty output folder")
    shards = done.get("shards", {})
    n_shards = (len(samples) + shard_size - 1) // shard_size
    bar = _progress(len(samples), "build", progress)
    for k in range(n_shards):
        name = f"{prefix}-{k:06d}.tar"
        chunk = samples[k * shard_size:(k + 1) * shard_size]
        rec = shards.get(name)
        if rec and (out / name).is_file() and (out / name).with_suffix(".idx").is_file():
            bar.update(len(chunk))
            continue
        sha, count, classes = _write_shard(out / name, chunk, k * shard_size)
        shards[name] = {"sha256": sha, "count": count, "classes": len(classes)}
        tmp = done_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"count": len(samples), "shard_size": shard_size, "shards": shards}))
        os.replace(tmp, done_file)
        bar.update(len(chunk))
    bar.close()
    labels = sorted({s.label for s in samples if s.label >= 0})
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "source": str(source), "count": len(samples),
                "classes": len(labels), "labelled": sum(s.label >= 0 for s in samples), "shard_size": shard_size,
                "shards": [{"name": n, **shards[n]} for n in sorted(shards)]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ============================================================================ merge

MERGE_KEYS = {"name", "source", "weight", "expected_count"}


def _sha256(sample: Sample) -> str:
    return hashlib.sha256(sample.read()).hexdigest()


def merge(spec_path, out_path, seed: int = 0, progress: bool = True) -> dict:
    """The merged public dataset from a YAML of sources (see README): per-source weights are the fraction of the
    merged epoch drawn from that source; sources are checked for completeness; exact duplicates (by content hash)
    of an evaluation set are dropped. Writes a sample list and ``<out>.manifest.json``."""
    from ..config import read_yaml

    spec = read_yaml(spec_path, "merge spec")  # binary, empty, duplicate keys, a folder: one line
    if not isinstance(spec, dict):
        raise ConfigError(f"{spec_path}: a merge spec is a mapping (sources, total, exclude_duplicates_of)")
    unknown = set(spec) - {"sources", "total", "exclude_duplicates_of"}
    if unknown:
        raise ConfigError(f"{spec_path}: unknown keys {sorted(unknown)}")
    sources = spec.get("sources") or []
    if not sources:
        raise ConfigError(f"{spec_path}: no sources")
    per_source, names = [], []
    for i, src in enumerate(sources):
        bad = set(src) - MERGE_KEYS
        if bad or "source" not in src or "name" not in src:
            raise ConfigError(f"{spec_path}: source {i} needs name and source (allowed keys {sorted(MERGE_KEYS)})")
        samples = find_samples(src["source"])
        exp = src.get("expected_count")
        if exp is not None and len(samples) != int(exp):
            raise ConfigError(f"source {src['name']} is incomplete: {len(samples)} images, expected {exp}")
        if float(src.get("weight", 1.0)) <= 0:
            raise ConfigError(f"source {src['name']}: weight must be > 0")
        per_source.append(samples)
        names.append(src["name"])
    dropped = [0] * len(sources)
    if spec.get("exclude_duplicates_of"):
        eval_samples = find_samples(spec["exclude_duplicates_of"])
        eval_hashes = {_sha256(s) for s in eval_samples}
        bar = _progress(sum(map(len, per_source)), "dedup", progress)
        for i, samples in enumerate(per_source):
            keep = []
            for s in samples:
                if _sha256(s) in eval_hashes:
                    dropped[i] += 1
                else:
                    keep.append(s)
                bar.update(1)
            per_source[i] = keep
        bar.close()
    weights = np.array([float(s.get("weight", 1.0)) for s in sources])
    total = int(spec.get("total") or sum(map(len, per_source)))
    counts = np.floor(total * weights / weights.sum()).astype(int)
    counts[: total - counts.sum()] += 1  # distribute the remainder
    rng = np.random.default_rng(seed)
    merged, extra = [], []
    for i, (samples, c) in enumerate(zip(per_source, counts)):
        if not samples:
            raise ConfigError(f"source {names[i]} has no images left")
        reps, rest = divmod(int(c), len(samples))  # up-sample by whole repeats, then a random subset
        idx = np.concatenate([np.tile(np.arange(len(samples)), reps), rng.permutation(len(samples))[:rest]])
        merged += [samples[j] for j in idx]
        extra += [{"source": names[i]}] * len(idx)
    order = rng.permutation(len(merged))
    write_sample_list(out_path, [merged[j] for j in order], [extra[j] for j in order])
    manifest = {"spec": str(spec_path), "total": len(merged), "seed": seed,
                "sources": [{"name": n, "images": len(p) + d, "dropped_eval_duplicates": d, "drawn": int(c),
                             "weight": float(w)} for n, p, d, c, w in zip(names, per_source, dropped, counts, weights)]}
    Path(str(out_path) + ".manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ============================================================================ ImageNet-21K labels

IN21K_VARIANTS = {"fall11": 21841, "winter21": 19167}


def in21k_labels(root, variant: str) -> dict:
    """Class indices for ImageNet-21K from the synset folders present (sorted WordNet ids), plus the map from
    ImageNet-1K's 1000 classes (timm's synset order) to their index here (-1 where absent)."""
    import timm.data

    if variant not in IN21K_VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(IN21K_VARIANTS)}")
    rootp = Path(root)
    if not rootp.is_dir():
        raise ConfigError(f"ImageNet-21K root not found: {root}")
    synsets = sorted(p.name for p in rootp.iterdir() if p.is_dir() and p.name.startswith("n") and p.name[1:].isdigit())
    if not synsets:
        raise ConfigError(f"no synset folders (nXXXXXXXX) under {root}")
    info = Path(timm.data.__file__).parent / "_info" / "imagenet_synsets.txt"
    in1k = info.read_text().split()
    pos = {s: i for i, s in enumerate(synsets)}
    return {"variant": variant, "expected_classes": IN21K_VARIANTS[variant], "classes": len(synsets),
            "complete": len(synsets) == IN21K_VARIANTS[variant], "synsets": synsets,
            "in1k_to_in21k": [pos.get(s, -1) for s in in1k]}

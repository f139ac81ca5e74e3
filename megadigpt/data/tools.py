"""Offline dataset tooling behind ``megadigpt data ...``: validate, build shards, index shards, merge sources,
ImageNet-21K labels.

Shards are webdataset tars (``<key>.jpg`` + ``<key>.cls``) with a DALI index (``.idx``, the wds2idx format) beside
each, a ``manifest.json`` (counts, classes, sources, sha256 per shard) and a sample index folder ``index/``
(:mod:`megadigpt.data.index`: what the trainer memory-maps). ``data index`` writes such an index folder for shards
written elsewhere (img2dataset's). ``data merge`` writes an index folder, or a sample list (``.jsonl``, one sample
per line, pointing into shards or files; also what ``validate`` writes) for small merges; all are data sources.
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
    from .images import examine_image
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
            label = int(parts[1]) if len(parts) > 1 and len(parts[1]) <= 24 else (-1 if len(parts) < 2 else None)
            if label is None or not -1 <= label < 2 ** 63:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{path}:{n}: label {parts[1][:40]!r} is not an integer in [-1, 2**63-1]") from None
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
    labels_all = _labels_of(samples)
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
    labels = np.unique(labels_all[labels_all >= 0])
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "source": str(source), "count": len(samples),
                "classes": len(labels), "labelled": int((labels_all >= 0).sum()), "shard_size": shard_size,
                "shards": [{"name": n, **shards[n]} for n in sorted(shards)]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    # the sample index beside the shards (used automatically when the folder is the source); written last, so
    # its sizes and mtimes are those of the finished shards
    index_shards([str(out / n) for n in sorted(shards)], out / "index", workers=1, progress=False)
    return manifest


def _labels_of(samples) -> np.ndarray:
    lab = getattr(samples, "labels", None)
    return np.asarray(lab if lab is not None else [s.label for s in samples], dtype=np.int64)


# ============================================================================ index shards

def _scan_one(shard: str):
    """One shard's columns (in a worker process): sizes, keys as offsets + blob, and its problems."""
    from .sources import scan_shard

    problems = []
    size, mtime, keys, offs, sizes, labels = scan_shard(shard, problems)
    enc = [k.encode("utf-8", "backslashreplace") for k in keys]
    key_off = np.zeros(len(enc) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in enc], out=key_off[1:])
    return (shard, size, mtime, np.array(offs, dtype=np.int64), np.array(sizes, dtype=np.int64),
            np.array(labels, dtype=np.int64), key_off, np.frombuffer(b"".join(enc), dtype=np.uint8), problems)


def index_shards(source, out_dir, workers: int = 2, progress: bool = True) -> dict:
    """Scan tar shards (any source of shards: a folder, a pattern such as img2dataset's ``{00000..01023}.tar``, a
    list, URLs through the shard cache) in ``workers`` processes and write a sample index folder (atomically: a
    temporary folder renamed into place; a rerun replaces an old index) with ``problems.jsonl``."""
    from .index import IndexWriter
    from .sources import resolve_paths

    problems = []
    if isinstance(source, (list, tuple)) and source and all(str(s).endswith(".tar") and Path(s).is_file()
                                                              for s in source):
        shards = [str(s) for s in source]
    else:
        kind, shards = resolve_paths(source, problems)
        if kind != "tar":
            raise ConfigError(f"data index needs tar shards; {source!r} is a{'n' if kind[0] in 'aeio' else ''} "
                              f"{kind} source")
    w = IndexWriter(out_dir)
    bar = _progress(len(shards), "index", progress)
    bar.unit = "shard"
    n = 0
    try:
        w.add_problems(problems)
        chunk = max(1, min(64, len(shards) // (4 * max(1, workers)) or 1))
        if workers > 1 and len(shards) > 1:
            pool = ProcessPoolExecutor(max_workers=workers)
            results = pool.map(_scan_one, shards, chunksize=chunk)
        else:
            pool, results = None, map(_scan_one, shards)
        try:
            for shard, size, mtime, offs, sizes, labels, key_off, key_blob, probs in results:  # in shard order
                w.add(shard, size, mtime, offs, sizes, labels, key_off, key_blob)
                w.add_problems(probs)
                problems += probs
                n += len(offs)
                bar.update(1)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        out = w.close()
    except BaseException:
        w.abort()
        raise
    finally:
        bar.close()
    if n == 0:
        first = f", e.g. {problems[0].path}: {problems[0].reason}" if problems else ""
        raise ConfigError(f"no usable sample in {source!r} ({len(problems)} problems{first}; see "
                          f"{out}/problems.jsonl)")
    return {"index": str(out), "samples": n, "shards": len(shards), "problems": len(problems),
            "damaged_shards": len({p.path for p in problems if not p.key})}


# ============================================================================ merge

MERGE_KEYS = {"name", "source", "weight", "expected_count"}


def _sha256(sample: Sample, handles=None) -> str:
    return hashlib.sha256(sample.read(handles)).hexdigest()


def _hashes(samples, bar, handles):
    for s in samples:
        yield _sha256(s, handles)
        bar.update(1)


def merge(spec_path, out_path, seed: int = 0, progress: bool = True, chunk: int = 1 << 20) -> dict:
    """The merged public dataset from a YAML of sources (see docs/data.md, "Tooling"): per-source weights are the fraction of the
    merged epoch drawn from that source; sources are checked for completeness; exact duplicates (by content hash)
    of an evaluation set are dropped.

    Writes a sample index folder (``out_path``; ``manifest.json`` inside) in bounded memory: the sources' columns
    are copied chunk by chunk, no per-sample Python objects (36M entries: see the docs for time and memory), or,
    where ``out_path`` ends with ``.jsonl``, a sample list and ``<out>.manifest.json`` (small merges). Samples stay
    grouped by source and shard, not shuffled (the trainer draws a permutation per epoch); a source drawn more
    often than it has images contributes whole repeats (repeated rows) and then a random subset, kept in order."""
    from ..config import read_yaml
    from .index import IndexWriter

    spec = read_yaml(spec_path, "merge spec")  # binary, empty, duplicate keys, a folder: one line
    if not isinstance(spec, dict):
        raise ConfigError(f"{spec_path}: a merge spec is a mapping (sources, total, exclude_duplicates_of)")
    unknown = set(spec) - {"sources", "total", "exclude_duplicates_of"}
    if unknown:
        raise ConfigError(f"{spec_path}: unknown keys {sorted(unknown)}")
    sources = spec.get("sources") or []
    if not sources or not isinstance(sources, list):
        raise ConfigError(f"{spec_path}: no sources")
    per_source, names = [], []
    for i, src in enumerate(sources):
        bad = set(src) - MERGE_KEYS if isinstance(src, dict) else {"?"}
        if bad or "source" not in src or "name" not in src:
            raise ConfigError(f"{spec_path}: source {i} needs name and source (allowed keys {sorted(MERGE_KEYS)})")
    from ..safe_fs import announce_commands, pipe_commands

    # pipe: sources run shell commands: a spec from a colleague never runs one without a word (said before any runs)
    announce_commands(pipe_commands(*(src["source"] for src in sources)))
    for i, src in enumerate(sources):
        samples = find_samples(src["source"])
        exp = src.get("expected_count")
        if exp is not None and len(samples) != int(exp):
            raise ConfigError(f"source {src['name']} is incomplete: {len(samples)} images, expected {exp}")
        if float(src.get("weight", 1.0)) <= 0:
            raise ConfigError(f"source {src['name']}: weight must be > 0")
        per_source.append(samples)
        names.append(str(src["name"]))
    # kept[i]: the positions of source i that stay (None: all of them, nothing materialised)
    kept: List[Optional[np.ndarray]] = [None] * len(sources)
    dropped = [0] * len(sources)
    if spec.get("exclude_duplicates_of"):
        eval_samples = find_samples(spec["exclude_duplicates_of"])
        handles: dict = {}
        bar = _progress(len(eval_samples) + sum(map(len, per_source)), "dedup", progress)
        try:
            eval_hashes = set(_hashes(eval_samples, bar, handles))
            for i, samples in enumerate(per_source):
                dup = np.fromiter((h in eval_hashes for h in _hashes(samples, bar, handles)), dtype=bool,
                                  count=len(samples))
                dropped[i] = int(dup.sum())
                kept[i] = np.flatnonzero(~dup)
        finally:
            bar.close()
            for f in handles.values():
                f.close()
    lengths = [len(p) if k is None else len(k) for p, k in zip(per_source, kept)]
    weights = np.array([float(s.get("weight", 1.0)) for s in sources])
    total = int(spec.get("total") or sum(lengths))
    counts = np.floor(total * weights / weights.sum()).astype(int)
    counts[: total - counts.sum()] += 1  # distribute the remainder
    rng = np.random.default_rng(seed)
    plans = []  # per source: (whole repeats, the sorted positions of the partial one)
    for i, c in enumerate(counts):
        if lengths[i] == 0:
            raise ConfigError(f"source {names[i]} has no images left")
        reps, rest = divmod(int(c), lengths[i])  # up-sample by whole repeats, then a random subset
        plans.append((reps, np.sort(rng.choice(lengths[i], rest, replace=False)) if rest else None))

    def chunks(i):
        """Source i's merged rows, as (SampleIndex, positions) chunks, in order."""
        idx, k = per_source[i], kept[i]
        reps, part = plans[i]
        for _ in range(reps):
            for a in range(0, lengths[i], chunk):
                pos = np.arange(a, min(a + chunk, lengths[i]), dtype=np.int64)
                yield idx, pos if k is None else k[pos]
        if part is not None:
            for a in range(0, len(part), chunk):
                pos = part[a:a + chunk]
                yield idx, pos if k is None else k[pos]

    manifest = {"spec": str(spec_path), "total": int(counts.sum()), "seed": seed,
                "sources": [{"name": n, "images": len(p), "dropped_eval_duplicates": d, "drawn": int(c),
                             "weight": float(w)} for n, p, d, c, w in zip(names, per_source, dropped, counts, weights)]}
    out = Path(out_path)
    if str(out).endswith(".jsonl"):
        merged, extra = [], []
        for i in range(len(sources)):
            for idx, pos in chunks(i):
                sub = idx.subset(pos)
                merged += list(sub)
                extra += [{"source": names[i]}] * len(sub)
        write_sample_list(out, merged, extra)
        Path(str(out_path) + ".manifest.json").write_text(json.dumps(manifest, indent=1))
        return manifest
    w = IndexWriter(out, names)
    try:
        for i in range(len(sources)):
            for idx, pos in chunks(i):
                w.add_store(idx._store, idx.store_rows(pos), source=i)
            per_source[i].release()
        w.close()
    except BaseException:
        w.abort()
        raise
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
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

"""``megadigpt eval``: ImageNet-1K val and the robustness sets of the paper's Table 2, any labelled set and (for
image-text models) zero-shot classification and retrieval, from any source megadigpt reads.

Each set is a data source like any other (:mod:`megadigpt.data.sources`): a class-folder tree, local tar shards, an
index folder, a sample list, or remote shards (``https://.../val-{000000..000063}.tar``, ``s3://...``, ``pipe:...``,
read through the shard cache with ``--cache-dir``, ``--io-timeout``, ``--io-retries``). A source's class names are
its sorted class folders, or the ``classes.txt`` beside its shards (in its index folder, its sample list); a
source without names has labels that are taken as the model's class indices (said in the results).

Each set's class map (what its class names mean), as the sets are distributed:

- ``imagenet`` (val), ``sketch``: one class per WordNet synset (n01440764 ...), all 1000 classes.
- ``v2`` (ImageNet-V2, any of its three variants): classes ``0`` ... ``999`` = the class index (not sorted names).
- ``real`` (ReaL labels): the ImageNet val set again, scored against ReaL's label sets by the file name's (or the
  shard key's) val index (``ILSVRC2012_val_00000001.JPEG`` -> 0); images whose set is empty are left out (as in
  the ReaL paper). Labels: timm's bundled copy of ``real.json`` unless ``--real-labels`` is given.
- ``a`` / ``r`` (ImageNet-A / -R): the synsets of a 200-class subset; the logits are restricted to those classes
  (the source's class names; without names, the labels present) before the arg-max (the sets' own protocol).
- ``c`` (ImageNet-C): a folder ``<corruption>/<severity 1-5>/`` each holding a source (synset folders, shards, an
  index), or a URL template with ``{corruption}`` and ``{severity}`` (e.g.
  ``https://host/imagenet-c/{corruption}/{severity}/{000000..000009}.tar``: the 15 corruptions x 5 severities are
  tried, the unreadable ones left out and listed); top-1 error per corruption and severity, and the mean
  corruption error (mCE): per corruption, the sum over severities of the error divided by AlexNet's, averaged
  over the 15 corruptions (Hendrycks & Dietterich 2019), in percent.

The model's classes are its ``label_names`` (written by ``megadigpt finetune`` from ImageNet's synset folders); a
1000-class model without names is taken to be in the standard (sorted-synset) order, which is said in the results.

Any other labelled set: ``--set NAME=SOURCE`` (repeatable; e.g. ``--set cifar10=.../test-{000000..000001}.tar``),
scored top-1 / top-5 over the model's whole head and reported under its own name. Its label space must be the
model's: the source's class names (its ``classes.txt`` or class folders) are as many as the head's classes and,
where the model has names too, the same names in the same order; a source without names has labels that are
taken as the model's class indices, each below its class count. A mismatch is one line before any weights or
images are read (labels are class indices: a set numbered otherwise would be scored against the wrong classes).

An image-text model (a ``megadigpt clip`` run directory, its ``best/`` or ``last/``) is scored zero-shot: each
set's classes are open_clip's prompts (``--templates``: ``openai``, the 80 of CLIP's ImageNet protocol, or
``simple``, open_clip's 18; default: the run's ``clip.templates``) of its class names, the image scored by its
cosine similarity to each class's mean prompt feature (open_clip's ``build_zero_shot_classifier``). The ImageNet
family's class names are open_clip's ``IMAGENET_CLASSNAMES`` (in the synset order above, so ``--a``/``--r``
restrict to their 200 as for a classifier); a ``--set`` is scored against its own class names (its
``classes.txt`` or class folders, required). ``--pairs NAME=SOURCE`` (repeatable): held-out image-text pairs (as
``megadigpt clip`` reads them: ``.jpg`` + ``.txt``), scored by image->text and text->image R@1/5/10 over all of
them; pairs without a readable caption or image are left out and counted.

Every set's top-1 and top-5 (and loss, images) go to ``eval.json`` and ``eval.md`` (ReaL, a re-labelling, has a
top-1 only; ImageNet-C reports its mCE).
"""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..config import ConfigError, shorten

# AlexNet's top-1 error per corruption, averaged over the 5 severities (hendrycks/robustness), the mCE baseline
ALEXNET_ERR = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
log = logging.getLogger(__name__)
SETS = ("imagenet", "real", "v2", "a", "r", "sketch", "c")
SET_LABELS = {"imagenet": "ImageNet-1K val", "real": "ImageNet ReaL", "v2": "ImageNet-V2", "a": "ImageNet-A",
              "r": "ImageNet-R", "sketch": "ImageNet-Sketch", "c": "ImageNet-C"}
_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def parse_set_specs(specs, option: str = "--set") -> Dict[str, str]:
    """``--set NAME=SOURCE`` (or ``--pairs``) values -> {name: source}, in the order given. A name is a word
    (letters, digits, ``_ . + -``, up to 64), for ``--set`` not one of the ImageNet sets' names, given once; the
    source is everything after the first ``=`` (a URL may hold more)."""
    out: Dict[str, str] = {}
    for spec in specs or ():
        name, eq, source = str(spec).partition("=")
        name, source = name.strip(), source.strip()
        if not eq or not name or not source:
            raise ConfigError(f"{option} takes NAME=SOURCE (e.g. cifar10=data/cifar10/test-{{000000..000001}}.tar), "
                              f"got {shorten(spec, 80)}")
        if not _SET_NAME.fullmatch(name):
            raise ConfigError(f"{option} {shorten(name, 80)}: a set's name is letters, digits and _ . + - (it labels "
                              f"the results), up to 64 characters")
        if option == "--set" and name.lower() in SETS:
            raise ConfigError(f"--set {name}: {name} is the name of an ImageNet set; use --{name.lower()} for it, "
                              f"or another name for this one")
        if name in out:
            raise ConfigError(f"{option} {name} is given twice ({shorten(out[name], 60)} and {shorten(source, 60)})")
        out[name] = source
    return out


def _few(items, n: int = 4) -> str:
    items = list(items)
    return ", ".join(shorten(i, 40) if isinstance(i, str) else str(i) for i in items[:n]) + (
        f" and {len(items) - n} more" if len(items) > n else "")


def check_label_space(name: str, source, model_classes: Optional[List[str]], num_classes: int) -> Optional[List[str]]:
    """The class names of set ``name``'s ``source`` (None where it names none), refused (one line) where they do
    not fit the model's head: another class count, or - where the model has names too - other names, or the same
    names numbered otherwise. Reads only the names (``classes.txt``, folder names): no images, no weights."""
    from ..data.sources import label_names

    names = label_names(source)
    what = f"--set {name}"
    if names is None:
        return None
    if len(names) != num_classes:
        raise ConfigError(f"{what}: {shorten(source, 80)} has {len(names)} classes ({_few(names)}), the model's head "
                          f"has {num_classes}: evaluate a model fine-tuned on this label space")
    if model_classes is None or list(model_classes) == names:
        return names
    model_classes = list(model_classes)
    only_set = [c for c in names if c not in set(model_classes)]
    only_model = [c for c in model_classes if c not in set(names)]
    if only_set or only_model:
        raise ConfigError(f"{what}: {shorten(source, 80)} names other classes than the model: "
                          + "; ".join(([f"only the set has {_few(only_set)}"] if only_set else []) +
                                      ([f"only the model has {_few(only_model)}"] if only_model else [])))
    moved = [f"{shorten(c, 40)} is {i} in the set, {model_classes.index(c)} in the model" for i, c in enumerate(names)
             if model_classes.index(c) != i]
    raise ConfigError(f"{what}: {shorten(source, 80)} numbers its classes otherwise than the model: "
                      f"{', '.join(moved[:3])}{f' and {len(moved) - 3} more' if len(moved) > 3 else ''} "
                      f"(labels are class indices: give the set the model's class order, e.g. a classes.txt)")


def imagenet_synsets() -> List[str]:
    """The 1000 ImageNet-1K synsets in the standard (sorted) order, from timm's bundled list."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


@dataclass
class EvalSet:
    """One evaluation set: its samples (labels as the source has them), the map of those labels to what the
    scorer compares with (a model class index, or a position in ``subset``), the classes the logits are restricted
    to (ImageNet-A/-R), and what was assumed."""

    samples: object  # a SampleIndex
    label_map: np.ndarray
    subset: Optional[List[int]] = None
    note: Optional[str] = None


def _source_label(name: str) -> str:
    return "--c" if name.startswith("c/") else f"--{name}"


def load_set(name: str, source, classes: List[str], num_classes: int) -> EvalSet:
    """The samples of ``source`` (any source :func:`megadigpt.data.sources.find_samples` reads) and their class
    map for set ``name`` (``imagenet``, ``sketch``, ``v2``, ``a``, ``r``, or ``c/<corruption>/<severity>``, which
    reads as ``imagenet``). See the module docstring for what each set's class names mean."""
    from ..data.sources import label_names

    kind = "imagenet" if name.startswith("c/") else name
    what = _source_label(name)
    samples, labels = _scan(what, source)
    names = label_names(source)
    present = sorted(set(np.unique(labels).tolist()))
    note = None
    if names is None:
        note = f"{what}: the source names no classes: its labels were taken as the model's class indices"
        if present and present[-1] >= num_classes:
            raise ConfigError(f"{what} {source}: label {present[-1]} does not fit a {num_classes}-class model")
        if kind in ("a", "r"):
            subset = present
            lmap = np.full(num_classes, -1, dtype=np.int64)
            lmap[subset] = np.arange(len(subset))
            return EvalSet(samples, lmap, subset, note)
        return EvalSet(samples, np.arange(num_classes, dtype=np.int64), None, note)
    if present and present[-1] >= len(names):
        raise ConfigError(f"{what} {source}: label {present[-1]} but only {len(names)} class names")
    if kind == "v2":
        bad = [n for n in names if not n.isdigit()]
        if bad:
            raise ConfigError(f"{what} {source}: ImageNet-V2 names its classes by index (folders 0 .. 999); found "
                              f"{bad[0]!r}")
        lmap = np.array([int(n) for n in names], dtype=np.int64)
        if lmap.max() >= num_classes:
            raise ConfigError(f"{what} {source}: class {int(lmap.max())} does not fit a {num_classes}-class model")
        return EvalSet(samples, lmap)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ConfigError(f"{what} {source}: classes {unknown[:3]} are not classes of the model (expected WordNet "
                          f"synsets like n01440764)")
    if kind in ("a", "r"):
        subset = [index[n] for n in names]
        return EvalSet(samples, np.arange(len(names), dtype=np.int64), subset)
    if len(names) != len(classes):
        raise ConfigError(f"{what} {source}: {len(names)} classes, the model has {len(classes)} (this set covers "
                          f"all of them)")
    return EvalSet(samples, np.array([index[n] for n in names], dtype=np.int64))


def _scan(what: str, source, labelled: bool = True):
    """A set's samples; a shard that could not be read is an error (an evaluation scores every image of its set)."""
    from ..data.sources import scan_source

    samples, problems = scan_source(source)
    lost = [q for q in problems if not q.key]  # whole shards: a 404, a download that failed, a damaged tar
    if lost:
        more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
        raise ConfigError(f"{what}: shard {lost[0].path} could not be read: {lost[0].reason}{more}; an evaluation "
                          f"scores every image of its set: fix the source or name only the shards you mean")
    labels = np.asarray(samples.labels)
    if not len(labels):
        raise ConfigError(f"{what} {source}: no images")
    if labelled and labels.min() < 0:
        i = int(np.argmax(labels < 0))
        raise ConfigError(f"{what} {source}: {samples[i].key or samples[i].path} has no class (images belong in "
                          f"class folders, shards need a cls member)")
    return samples, labels


def load_named_set(name: str, source, names: Optional[List[str]], num_classes: int) -> EvalSet:
    """A ``--set NAME=SOURCE``: its samples, scored over the model's whole head (labels are the model's class
    indices: :func:`check_label_space` has checked the names)."""
    what = f"--set {name}"
    samples, labels = _scan(what, source)
    top = int(labels.max()) if len(labels) else -1
    note = None
    if names is None:
        note = f"{what}: the source names no classes: its labels were taken as the model's class indices"
        if top >= num_classes:
            raise ConfigError(f"{what} {source}: label {top} does not fit the model's {num_classes}-class head")
    elif top >= len(names):
        raise ConfigError(f"{what} {source}: label {top} but only {len(names)} class names")
    return EvalSet(samples, np.arange(num_classes, dtype=np.int64), None, note)


_VAL_INDEX = re.compile(r"ILSVRC2012_val_(\d{8})")


def real_labels(path: Optional[str] = None) -> List[List[int]]:
    if path is None:
        import timm

        path = Path(timm.__file__).parent / "data" / "_info" / "imagenet_real_labels.json"
    try:
        labels = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"ReaL labels {path}: {e}")
    if len(labels) != 50000:
        raise ConfigError(f"ReaL labels {path}: expected 50000 entries, got {len(labels)}")
    return labels


CORRUPTIONS = tuple(ALEXNET_ERR)
_UNREADABLE = ("no shard of", "data source not found", "data source pattern matches no file")


def c_sources(spec) -> Dict[str, Dict[int, str]]:
    """ImageNet-C's sources: corruption -> severity -> source. ``spec``: a local ``<corruption>/<severity>/`` tree
    (each severity folder a source), or a template with ``{corruption}`` and ``{severity}``, filled in for the 15
    corruptions and severities 1-5 (which ones are readable is found when they are read)."""
    spec = str(spec)
    if "{corruption}" in spec or "{severity}" in spec:
        if "{corruption}" not in spec or "{severity}" not in spec:
            raise ConfigError(f"--c {spec}: a template needs both {{corruption}} and {{severity}}")
        return {c: {s: spec.replace("{corruption}", c).replace("{severity}", str(s)) for s in range(1, 6)}
                for c in CORRUPTIONS}
    root = Path(spec)
    if not root.is_dir():
        raise ConfigError(f"--c: not a folder: {spec} (ImageNet-C is a <corruption>/<severity>/ tree, or a URL "
                          f"template with {{corruption}} and {{severity}})")
    out = {}
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        sev = {int(s.name): str(s) for s in cdir.iterdir() if s.is_dir() and s.name.isdigit()}
        if sev:
            out[cdir.name] = dict(sorted(sev.items()))
    if not out:
        raise ConfigError(f"{root}: expected ImageNet-C's <corruption>/<severity>/<synset>/ layout")
    return out


def mce(errors: Dict[str, Dict[int, float]]) -> Dict:
    """errors: corruption -> severity -> top-1 error (0..1). CE_c = sum_s E / sum_s E_AlexNet (AlexNet's per-
    severity errors are summarised by their mean, so the ratio uses the means); mCE = mean over corruptions."""
    ce = {}
    for c, sev in errors.items():
        if c in ALEXNET_ERR and sev:
            ce[c] = 100 * (sum(sev.values()) / len(sev)) / ALEXNET_ERR[c]
    return {"mCE": sum(ce.values()) / len(ce) if ce else None, "CE": ce,
            "missing_corruptions": sorted(set(ALEXNET_ERR) - set(ce)),
            "mean_error": 100 * sum(sum(s.values()) / len(s) for s in errors.values()) / max(len(errors), 1)}


# ============================================================================ running a model over a set


def read_classifier(path, which: str = "best"):
    """``(folder, config)`` of a fine-tuned classifier (an exported timm folder, or a fine-tuning run directory's
    ``best/``), from its ``config.json`` alone: no weights read."""
    p = Path(path)
    if (p / which / "config.json").is_file():
        p = p / which
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise ConfigError(f"{path}: not a classifier or image-text export (config.json + model.safetensors) nor a "
                          f"fine-tuning or clip run with {which}/")
    try:
        meta = json.loads((p / "config.json").read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{p / 'config.json'}: not readable JSON ({(str(e).splitlines() or [''])[0]})") from None
    if isinstance(meta, dict) and meta.get("task") == "image_text":
        if not isinstance(meta.get("visual"), dict) or not isinstance(meta.get("text"), dict):
            raise ConfigError(f"{p / 'config.json'}: an image-text export without its towers' arguments")
        return p, meta
    if not isinstance(meta, dict) or not isinstance(meta.get("model_args"), dict):
        raise ConfigError(f"{p / 'config.json'}: not a megadigpt/timm classifier export (no model_args)")
    if not meta.get("num_classes"):
        raise ConfigError(f"{path}: an encoder without a classifier head; fine-tune it first")
    return p, meta


def load_classifier(path, which: str = "best"):
    """A fine-tuned classifier: an exported timm folder, or a fine-tuning run directory (its ``best/``)."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    p, meta = read_classifier(path, which)
    model = VisionTransformer(**meta["model_args"])
    model.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
    return model.eval(), meta


@torch.no_grad()
def run_set(model, samples, scorer, size: int, batch: int, device, dtype, kind: str, num_workers: int, mean, std,
            crop_pct: float, limit: Optional[int] = None, label_map: Optional[np.ndarray] = None):
    """Score every sample once across ranks: ``scorer(logits, sample_ids, labels, valid) -> (k,) counts``, the
    labels mapped through ``label_map`` (source label -> what the scorer compares with) where given; returns the
    counts summed over ranks, and the samples scored."""
    import torch.distributed as dist

    from ..data.classification import build_classification_loader, shard_indices
    from .transfer import eval_batches

    if limit:
        step = max(1, len(samples) // limit)
        samples = samples[::step][:limit]  # an even spread over the classes, deterministic
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    ids = shard_indices(len(samples), rank, world, 0, 0, train=False)
    loader = build_classification_loader(samples, False, size, batch, rank, world, kind=kind, device=device,
                                         num_workers=num_workers, mean=mean, std=std, crop_pct=crop_pct)
    lmap = None if label_map is None else torch.as_tensor(np.asarray(label_map), dtype=torch.long, device=device)
    total = torch.zeros(getattr(scorer, "width", 3), dtype=torch.float64, device=device)
    it = iter(loader)
    for b in range(eval_batches(len(samples), world, batch)):
        data = next(it, None)
        if data is None:  # this rank's slice is one batch shorter (the model is not sharded: nothing to wait for)
            break
        logits = model(data["image"].to(device).to(dtype)).float()
        sid = ids[b * batch:b * batch + len(data["label"])]
        y = data["label"].to(device).long()
        if lmap is not None:
            y = lmap[y.clamp(min=0)]  # padding rows (valid = False) carry a placeholder label
        counts = scorer(logits, sid, y, data["valid"].to(device))
        total += counts
    if hasattr(loader, "close"):
        loader.close()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total, samples


def topk_scorer(subset: Optional[List[int]] = None):
    """Counts (top-1 hits, top-5 hits, n, summed cross-entropy). ``subset``: class indices the logits are restricted
    to; labels are then positions in the subset. The loss is fine-tuning's validation loss (``val_loss``), so an
    export's evaluation can be compared with the run's own to the last digits, not only by its top-1."""
    import torch.nn.functional as F

    def score(logits, sid, y, valid):
        if subset is not None:
            logits = logits[:, subset]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        v = valid.double()
        ce = F.cross_entropy(logits, y.clamp(0, logits.shape[1] - 1), reduction="none").double()  # padding: masked
        return torch.stack([((top[:, 0] == y).double() * v).sum(), ((top == y[:, None]).any(1).double() * v).sum(),
                            v.sum(), (ce * v).sum()])

    score.width = 4
    return score


def real_scorer(samples, labels: List[List[int]]):
    """Counts (ReaL top-1 hits, scored images, plain top-1 hits). Images with no ReaL label are not scored."""

    def score(logits, sid, y, valid):
        out = torch.zeros(3, dtype=torch.float64, device=logits.device)
        pred = logits.argmax(1).tolist()
        for j, i in enumerate(sid):
            if not bool(valid[j]):
                continue
            smp = samples[i]
            m = _VAL_INDEX.search(Path(smp.key).name) or _VAL_INDEX.search(Path(smp.path).name)
            if not m:
                raise ConfigError(f"ReaL needs the original val file names or shard keys (ILSVRC2012_val_XXXXXXXX);"
                                  f" got {smp.key or smp.path}")
            real = labels[int(m.group(1)) - 1]
            if real:
                out[0] += float(pred[j] in real)
                out[1] += 1
            out[2] += float(pred[j] == int(y[j]))
        return out

    return score


def zero_shot_names(name: str, source) -> List[str]:
    """The class names a ``--set`` is scored zero-shot against (its ``classes.txt`` or class folders): refused in
    one line where the source names none (zero-shot prompts are made of the names)."""
    from ..data.sources import label_names

    names = label_names(source)
    if not names:
        raise ConfigError(f"--set {name}: {shorten(source, 80)} names no classes; zero-shot scoring builds its "
                          f"prompts from the class names (a classes.txt beside the shards, or class folders)")
    return list(names)


def retrieval_of(clip, tokenize, meta, samples, batch: int, num_workers: int, device, dtype, common) -> dict:
    """Image-text retrieval (R@1/5/10 both ways) over every pair of ``samples`` (``--pairs``), every rank encoding
    its share: :func:`megadigpt.train.clip.pair_retrieval`."""
    import torch.distributed as dist

    from ..data.captions import pair_loader
    from ..data.classification import timm_transform
    from .clip import pair_retrieval

    size, ctx = common["size"], meta["text"]["text_cfg"]["context_length"]
    transform = timm_transform(False, size, common["mean"], common["std"], common["crop_pct"], None)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if common.get("limit"):
        samples = samples[::max(1, len(samples) // common["limit"])][:common["limit"]]  # as run_set spreads a set
    res = pair_retrieval(clip, samples, lambda idx: pair_loader(samples, idx, transform, tokenize, size, ctx, batch,
                                                                False, num_workers=num_workers),
                         batch, size, ctx, device, dtype, rank, world)
    if not res["pairs"]:
        raise ConfigError(f"--pairs: none of the {len(samples)} pairs has a readable image and caption")
    return res


OUTPUT_FILES = ("eval.json", "eval.md")  # what --out receives


def evaluate_sets(model_path: str, folders: Dict[str, str], out_dir: Optional[str] = None, which: str = "best",
                  batch: int = 64, limit: Optional[int] = None, loader: str = "auto", num_workers: int = 4,
                  real_labels_path: Optional[str] = None, device: str = "auto", precision: str = "auto",
                  named: Optional[Dict[str, str]] = None, pairs: Optional[Dict[str, str]] = None,
                  templates: Optional[str] = None) -> dict:
    """``megadigpt eval``. ``folders``: ImageNet set name -> its source; ``named``: any other labelled set, name ->
    source (``--set NAME=SOURCE``); ``pairs``: held-out image-text pairs for retrieval (``--pairs NAME=SOURCE``,
    image-text models only); ``templates``: the zero-shot prompts (``simple`` | ``openai``; default: the clip
    run's, else ``openai``); see the module doc. Returns and writes the table. Every check that can fail (sources
    found, label spaces, the sets listed) runs before the weights are loaded. Remote reads follow
    :func:`megadigpt.data.remote.configure` (the CLI sets it from ``--cache-dir`` ...)."""
    from ..data.sources import check_source
    from ..distributed import env as dist_env
    from .common import auto_precision, resolve_device_type, resolve_loader, torch_dtype

    named, pairs = dict(named or {}), dict(pairs or {})
    unknown = set(folders) - set(SETS)
    if unknown:
        raise ConfigError(f"unknown evaluation sets {sorted(unknown)}; choose from {', '.join(SETS)}, or name your "
                          f"own with --set NAME=SOURCE")
    clash = sorted(n for n in named if n.lower() in SETS)
    if clash:
        raise ConfigError(f"--set {clash[0]}: the name of an ImageNet set; use --{clash[0].lower()} for it")
    if not folders and not named and not pairs:
        raise ConfigError("give at least one evaluation set (--set NAME=SOURCE for any labelled set; --imagenet, "
                          "--v2, --a, --r, --sketch, --c for the ImageNet family; --pairs NAME=SOURCE for retrieval)")
    if "real" in folders and "imagenet" not in folders:
        folders["imagenet"] = folders["real"]
    if "real" in folders and folders["real"] != folders["imagenet"]:
        raise ConfigError("--real scores the --imagenet images: give one of them, or the same source to both")
    c_plan = c_sources(folders["c"]) if "c" in folders else None
    for name, src in folders.items():  # every source found (remote shards fetched) before the model is loaded
        if name not in ("c", "real"):
            check_source(src)
    for src in [*named.values(), *pairs.values()]:
        check_source(src)
    kind = resolve_loader(loader)
    dev_type = resolve_device_type(device)
    folder, meta = read_classifier(model_path, which)  # its config alone: the label spaces are checked before weights
    zero_shot = meta.get("task") == "image_text"
    notes = []
    if zero_shot:  # any label space: each set's own class names are the classes (open_clip's for ImageNet's)
        num_classes, own_names, classes = 1000, None, imagenet_synsets() if folders else None
        named_names = {n: zero_shot_names(n, src) for n, src in named.items()}
        templates = templates or (meta.get("zeroshot") or {}).get("templates") or "openai"
    elif pairs or templates:
        raise ConfigError(f"--pairs and --templates are for an image-text model (a megadigpt clip run or its "
                          f"export); {shorten(model_path, 80)} is a classifier")
    else:
        num_classes = meta["num_classes"]
        own_names = meta.get("label_names")
        named_names = {n: check_label_space(n, src, own_names, num_classes) for n, src in named.items()}
        classes = own_names
    if folders and not zero_shot:  # the ImageNet family: the model's classes by name (synsets)
        if not classes:
            if num_classes != 1000:
                raise ConfigError(f"the model has {num_classes} unnamed classes: the ImageNet sets need a 1000-class "
                                  f"ImageNet model (fine-tuned on synset folders); for another label space use "
                                  f"--set NAME=SOURCE")
            classes = imagenet_synsets()
            notes.append("the model has no label names: the standard sorted-synset order was assumed")
        elif not all(re.fullmatch(r"n\d{8}", c) for c in classes):
            notes.append(f"the model's classes are not ImageNet synsets ({_few(classes, 3)}): its scores are labelled "
                         f"with ImageNet set names; for its own label space use --set NAME=SOURCE")
    labels_real = real_labels(real_labels_path) if "real" in folders else None
    sets = {name: load_set(name, folders[name], classes, num_classes)
            for name in SETS if name in folders and name not in ("real", "c")}
    sets.update({n: load_named_set(n, src, named_names[n], len(named_names[n]) if zero_shot else num_classes)
                 for n, src in named.items()})
    pair_sets = {n: _scan(f"--pairs {n}", src, labelled=False)[0] for n, src in pairs.items()}
    notes += [e.note for e in sets.values() if e.note]
    if zero_shot:
        from .clip import load_export

        model, tokenize = load_export(folder)
        pre = meta.get("preprocessing") or {}
        size = meta["visual"]["img_size"]
    else:
        model, meta = load_classifier(model_path, which)
        pre = meta.get("pretrained_cfg", {})
        size = meta["model_args"]["img_size"]

    env = dist_env.discover()
    from ..distributed.engine import init_distributed, pick_device

    device = pick_device(env, dev_type)  # also the current CUDA device, as NCCL needs
    dist_env.export(env, device.index if device.type == "cuda" else None)  # LOCAL_RANK: the device DeepSpeed uses
    if env.world_size > 1:
        init_distributed(env, dev_type)
    prec = precision if precision != "auto" else auto_precision(dev_type)
    dtype = torch_dtype(prec)
    model.to(device=device, dtype=dtype)
    common = dict(size=size, batch=batch, device=device, dtype=dtype, kind=kind, num_workers=num_workers,
                  mean=pre.get("mean", (0.485, 0.456, 0.406)), std=pre.get("std", (0.229, 0.224, 0.225)),
                  crop_pct=pre.get("crop_pct", 0.875), limit=limit)
    results = {"model": str(model_path), "note": None, "img_size": size, "limit": limit, "precision": prec,
               "sources": {**{k: str(v) for k, v in folders.items()}, **{k: str(v) for k, v in named.items()},
                           **{f"pairs:{k}": str(v) for k, v in pairs.items()}},
               "sets": {}}
    heads = {}
    if zero_shot:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        from .clip import templates_of, zero_shot_head

        results["zero_shot"] = {"templates": templates, "prompts_per_class": len(templates_of(templates)),
                                "imagenet_class_names": "open_clip's IMAGENET_CLASSNAMES" if folders else None}
        heads = {n: zero_shot_head(model, tokenize, named_names[n], templates, device, dtype) for n in named}
        if folders:
            heads[None] = zero_shot_head(model, tokenize, list(IMAGENET_CLASSNAMES), templates, device, dtype)

    def scorer_of(name):  # the classifier; for an image-text model, the zero-shot head of the set's class names
        return heads.get(name, heads.get(None)) if zero_shot else model

    for name, es in sets.items():
        c, used = run_set(scorer_of(name), es.samples, topk_scorer(es.subset), label_map=es.label_map, **common)
        if name == "imagenet" and "real" in folders:
            r, _ = run_set(scorer_of(name), es.samples, real_scorer(used, labels_real), label_map=es.label_map,
                           **common)
            results["sets"]["real"] = {"label": SET_LABELS["real"], "top1": 100 * r[0].item() / max(r[1].item(), 1),
                                       "top5": None, "images": int(r[1].item())}
        entry = results["sets"].setdefault(name, {"label": SET_LABELS.get(name, name)})
        if name in named:
            entry.update({"source": str(named[name]), "classes": len(named_names[name]) if zero_shot else num_classes,
                          "class_names": "the source's" if named_names[name] else "none (labels = class indices)"})
        elif es.subset is not None:
            entry["classes"] = len(es.subset)
        entry.update({"top1": 100 * c[0].item() / max(c[2].item(), 1), "top5": 100 * c[1].item() / max(c[2].item(), 1),
                      "loss": c[3].item() / max(c[2].item(), 1), "images": int(c[2].item())})
    if c_plan is not None:
        errors, unreadable = {}, []
        for corr, sevs in c_plan.items():
            for sev, src in sevs.items():
                try:
                    es = load_set(f"c/{corr}/{sev}", src, classes, num_classes)
                except ConfigError as e:
                    if "{corruption}" not in str(folders["c"]) or not str(e).startswith(_UNREADABLE):
                        raise
                    unreadable.append(f"{corr}/{sev}")  # a template names every combination; not all need exist
                    log.warning("ImageNet-C %s/%s left out: %s", corr, sev, e)
                    continue
                cc, _ = run_set(scorer_of(None), es.samples, topk_scorer(), label_map=es.label_map, **common)
                errors.setdefault(corr, {})[sev] = 1 - cc[0].item() / max(cc[2].item(), 1)
        if not errors:
            raise ConfigError(f"--c {folders['c']}: no corruption and severity could be read")
        results["sets"]["c"] = {"label": SET_LABELS["c"], **mce(errors), "errors": errors, "unreadable": unreadable}
    if pairs:
        results["retrieval"] = {n: retrieval_of(model, tokenize, meta, samples, batch, num_workers, device, dtype,
                                                common) for n, samples in pair_sets.items()}
    results["note"] = "; ".join(dict.fromkeys(notes)) or None
    if env.rank == 0:
        text = table(results)
        print(text)
        if out_dir:  # replaced atomically, recorded as megadigpt's (checked by the CLI: megadigpt.checkpoint.convert)
            from ..checkpoint.convert import write_output

            write_output(Path(out_dir) / "eval.json", json.dumps(results, indent=1), "eval")
            write_output(Path(out_dir) / "eval.md", text + "\n", "eval")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return results


def table(results: dict) -> str:
    """``eval.md``: one row per set with its name, top-1, top-5, loss and images scored (ReaL: top-1 only), then
    ImageNet-C's mCE, and the notes."""
    def pct(v):
        return "-" if v is None else f"{v:.2f}"

    lines = ["| set | top-1 (%) | top-5 (%) | loss | images |", "|---|---|---|---|---|"]
    order = list(results["sets"])
    for k in sorted(order, key=lambda k: (SETS.index(k) if k in SETS else len(SETS), order.index(k))):
        r = results["sets"][k]
        if k == "c":
            continue
        label = r.get("label") or SET_LABELS.get(k, k)
        if r.get("classes") and k in ("a", "r"):
            label += f" ({r['classes']} classes)"
        loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "-"
        lines.append(f"| {label} | {pct(r.get('top1'))} | {pct(r.get('top5'))} | {loss} | {r.get('images', '-')} |")
    c = results["sets"].get("c")
    if c is not None:
        lines.append("")
        lines.append(f"ImageNet-C: mCE {c['mCE']:.2f} (lower is better), mean top-1 error {c['mean_error']:.2f}% over "
                     f"{len(c['errors'])} corruptions" if c.get("mCE") is not None else
                     "ImageNet-C: mCE - (no corruption of the 15 could be scored against AlexNet's)")
        if c.get("unreadable"):
            lines.append(f"\nImageNet-C: {len(c['unreadable'])} corruption/severity sources could not be read "
                         f"(left out): {', '.join(c['unreadable'][:5])}{' ...' if len(c['unreadable']) > 5 else ''}")
    if results.get("retrieval"):
        lines += ["", "| pairs (retrieval) | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | pairs |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in results["retrieval"].items():
            bad = f" ({r['bad_pairs']} bad left out)" if r.get("bad_pairs") else ""
            recalls = " | ".join(f"{r[f'{d}_r{k}']:.2f}" for d in ("i2t", "t2i") for k in (1, 5, 10))
            lines.append(f"| {name} | {recalls} | {r['pairs']}{bad} |")
    zs = results.get("zero_shot")
    if zs:
        lines.append(f"\nZero-shot: open_clip's {zs['templates']} templates ({zs['prompts_per_class']} prompts per class)"
                     + (f"; ImageNet class names: {zs['imagenet_class_names']}" if zs.get("imagenet_class_names") else "")
                     + "; other sets: their own class names")
    if results.get("note"):
        lines.append(f"\nNote: {results['note']}")
    return "\n".join(lines)

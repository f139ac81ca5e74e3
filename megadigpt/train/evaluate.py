"""``megadigpt eval``: ImageNet-1K val and the robustness sets of the paper's Table 2, from folders you provide.

Each set's class map (what its folder names mean), as the sets are distributed:

- ``imagenet`` (val), ``sketch``: one folder per WordNet synset (n01440764 ...), all 1000 classes.
- ``v2`` (ImageNet-V2, any of its three variants): folders ``0`` ... ``999`` = the class index (not sorted names).
- ``real`` (ReaL labels): the ImageNet val folder again, scored against ReaL's label sets by the file name's val
  index (``ILSVRC2012_val_00000001.JPEG`` -> 0); images whose set is empty are left out (as in the ReaL paper).
  Labels: timm's bundled copy of ``real.json`` unless ``--real-labels`` is given.
- ``a`` / ``r`` (ImageNet-A / -R): synset folders of a 200-class subset; the logits are restricted to those 200
  classes before the arg-max (the sets' own protocol).
- ``c`` (ImageNet-C): ``<corruption>/<severity 1-5>/<synset>/``; top-1 error per corruption and severity, and the
  mean corruption error (mCE): per corruption, the sum over severities of the error divided by AlexNet's, averaged
  over the 15 corruptions (Hendrycks & Dietterich 2019), in percent.

The model's classes are its ``label_names`` (written by ``megadigpt finetune`` from ImageNet's synset folders); a
1000-class model without names is taken to be in the standard (sorted-synset) order, which is said in the results.
"""

import json
import re
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..config import ConfigError

# AlexNet's top-1 error per corruption, averaged over the 5 severities (hendrycks/robustness), the mCE baseline
ALEXNET_ERR = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
SETS = ("imagenet", "real", "v2", "a", "r", "sketch", "c")
_IMG = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jpe")


def imagenet_synsets() -> List[str]:
    """The 1000 ImageNet-1K synsets in the standard (sorted) order, from timm's bundled list."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def _images(root: Path):
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMG and p.is_file())


def synset_samples(root, classes: List[str], subset: bool = False):
    """Images under ``root/<synset>/``; label = the synset's index in ``classes``. Returns (samples, synsets present)."""
    from ..data.sources import Sample

    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    index = {s: i for i, s in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ConfigError(f"{root}: folders {unknown[:3]} are not classes of the model (expected WordNet synsets "
                          f"like n01440764)")
    if not subset and len(folders) != len(classes):
        raise ConfigError(f"{root}: {len(folders)} class folders, the model has {len(classes)} classes")
    samples = [Sample(str(p), key=p.name, label=index[p.parent.name]) for p in _images(root)
               if p.parent.parent == root]
    if not samples:
        raise ConfigError(f"{root}: no images in <synset>/ folders")
    return samples, folders


def v2_samples(root, num_classes: int):
    from ..data.sources import Sample

    root = Path(root)
    out = []
    for p in _images(root):
        if p.parent.parent != root or not p.parent.name.isdigit():
            raise ConfigError(f"{root}: ImageNet-V2 keeps images in folders named by class index (0 .. 999); "
                              f"found {p.relative_to(root)}")
        label = int(p.parent.name)
        if label >= num_classes:
            raise ConfigError(f"{root}: class folder {label} does not fit a {num_classes}-class model")
        out.append(Sample(str(p), key=p.name, label=label))
    if not out:
        raise ConfigError(f"{root}: no images")
    return out


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


def c_folders(root) -> Dict[str, Dict[int, Path]]:
    root = Path(root)
    out = {}
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        sev = {int(s.name): s for s in cdir.iterdir() if s.is_dir() and s.name.isdigit()}
        if sev:
            out[cdir.name] = sev
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


def load_classifier(path, which: str = "best"):
    """A fine-tuned classifier: an exported timm folder, or a fine-tuning run directory (its ``best/``)."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    p = Path(path)
    if (p / which / "config.json").is_file():
        p = p / which
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise ConfigError(f"{path}: not a classifier export (config.json + model.safetensors) nor a fine-tuning run "
                          f"with {which}/")
    try:
        meta = json.loads((p / "config.json").read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{p / 'config.json'}: not readable JSON ({(str(e).splitlines() or [''])[0]})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_args"), dict):
        raise ConfigError(f"{p / 'config.json'}: not a megadigpt/timm classifier export (no model_args)")
    if not meta.get("num_classes"):
        raise ConfigError(f"{path}: an encoder without a classifier head; fine-tune it first")
    model = VisionTransformer(**meta["model_args"])
    model.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
    return model.eval(), meta


@torch.no_grad()
def run_set(model, samples, scorer, size: int, batch: int, device, dtype, kind: str, num_workers: int, mean, std,
            crop_pct: float, limit: Optional[int] = None) -> torch.Tensor:
    """Score every sample once across ranks: ``scorer(logits, sample_ids, labels, valid) -> (k,) counts``;
    returns the counts summed over ranks."""
    import torch.distributed as dist

    from ..data.classification import build_classification_loader, shard_indices
    from .finetune import eval_batches

    if limit:
        step = max(1, len(samples) // limit)
        samples = samples[::step][:limit]  # an even spread over the classes, deterministic
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    ids = shard_indices(len(samples), rank, world, 0, 0, train=False)
    loader = build_classification_loader(samples, False, size, batch, rank, world, kind=kind, device=device,
                                         num_workers=num_workers, mean=mean, std=std, crop_pct=crop_pct)
    total = torch.zeros(3, dtype=torch.float64, device=device)
    it = iter(loader)
    for b in range(eval_batches(len(samples), world, batch)):
        data = next(it, None)
        if data is None:  # this rank's slice is one batch shorter (the model is not sharded: nothing to wait for)
            break
        logits = model(data["image"].to(device).to(dtype)).float()
        sid = ids[b * batch:b * batch + len(data["label"])]
        counts = scorer(logits, sid, data["label"].to(device), data["valid"].to(device))
        total += counts
    if hasattr(loader, "close"):
        loader.close()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total, samples


def topk_scorer(subset: Optional[List[int]] = None):
    """Counts (top-1 hits, top-5 hits, n). ``subset``: class indices the logits are restricted to; labels are then
    positions in the subset."""

    def score(logits, sid, y, valid):
        if subset is not None:
            logits = logits[:, subset]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        v = valid.double()
        return torch.stack([((top[:, 0] == y).double() * v).sum(), ((top == y[:, None]).any(1).double() * v).sum(),
                            v.sum()])

    return score


def real_scorer(samples, labels: List[List[int]]):
    """Counts (ReaL top-1 hits, scored images, plain top-1 hits). Images with no ReaL label are not scored."""

    def score(logits, sid, y, valid):
        out = torch.zeros(3, dtype=torch.float64, device=logits.device)
        pred = logits.argmax(1).tolist()
        for j, i in enumerate(sid):
            if not bool(valid[j]):
                continue
            m = _VAL_INDEX.search(Path(samples[i].path).name)
            if not m:
                raise ConfigError(f"ReaL needs the original val file names (ILSVRC2012_val_XXXXXXXX.JPEG); got "
                                  f"{samples[i].path}")
            real = labels[int(m.group(1)) - 1]
            if real:
                out[0] += float(pred[j] in real)
                out[1] += 1
            out[2] += float(pred[j] == int(y[j]))
        return out

    return score


def evaluate_sets(model_path: str, folders: Dict[str, str], out_dir: Optional[str] = None, which: str = "best",
                  batch: int = 64, limit: Optional[int] = None, loader: str = "auto", num_workers: int = 4,
                  real_labels_path: Optional[str] = None, device: str = "auto", precision: str = "auto") -> dict:
    """``megadigpt eval``. ``folders``: set name -> its root (see the module doc). Returns and writes the table."""
    from ..distributed import env as dist_env
    from .pretrain import _device_type, _dtype, auto_precision, resolve_loader

    unknown = set(folders) - set(SETS)
    if unknown:
        raise ConfigError(f"unknown evaluation sets {sorted(unknown)}; choose from {', '.join(SETS)}")
    if not folders:
        raise ConfigError("give at least one evaluation set (--imagenet, --v2, --a, --r, --sketch, --c)")
    if "real" in folders and "imagenet" not in folders:
        folders["imagenet"] = folders["real"]
    for name, root in folders.items():
        if not Path(root).is_dir():
            raise ConfigError(f"--{name}: folder not found: {root}")
    kind = resolve_loader(loader)
    dev_type = _device_type(device)
    model, meta = load_classifier(model_path, which)
    num_classes = meta["num_classes"]
    classes = meta.get("label_names")
    note = None
    if not classes:
        if num_classes != 1000:
            raise ConfigError(f"the model has {num_classes} unnamed classes: the ImageNet sets need a 1000-class "
                              f"ImageNet model (fine-tuned on synset folders)")
        classes = imagenet_synsets()
        note = "the model has no label names: the standard sorted-synset order was assumed"
    labels_real = real_labels(real_labels_path) if "real" in folders else None

    env = dist_env.discover()
    dist_env.export(env)
    from ..distributed.engine import init_distributed, pick_device

    device = pick_device(env, dev_type)  # also the current CUDA device, as NCCL needs
    if env.world_size > 1:

        init_distributed(env, dev_type)
    prec = precision if precision != "auto" else auto_precision(dev_type)
    dtype = _dtype(prec)
    model.to(device=device, dtype=dtype)
    cfg = meta.get("pretrained_cfg", {})
    size = meta["model_args"]["img_size"]
    common = dict(size=size, batch=batch, device=device, dtype=dtype, kind=kind, num_workers=num_workers,
                  mean=cfg.get("mean", (0.485, 0.456, 0.406)), std=cfg.get("std", (0.229, 0.224, 0.225)),
                  crop_pct=cfg.get("crop_pct", 0.875), limit=limit)
    results = {"model": str(model_path), "note": note, "img_size": size, "limit": limit, "sets": {}}
    for name in [s for s in SETS if s in folders and s != "real"]:
        root = folders[name]
        if name in ("imagenet", "sketch"):
            samples, _ = synset_samples(root, classes)
            c, used = run_set(model, samples, topk_scorer(), **common)
            if name == "imagenet" and "real" in folders:
                r, _ = run_set(model, samples, real_scorer(samples, labels_real), **common)
                results["sets"]["real"] = {"top1": 100 * r[0].item() / max(r[1].item(), 1),
                                           "images": int(r[1].item())}
        elif name == "v2":
            samples = v2_samples(root, num_classes)
            c, used = run_set(model, samples, topk_scorer(), **common)
        elif name in ("a", "r"):
            full, present = synset_samples(root, classes, subset=True)
            subset = [classes.index(s) for s in present]
            pos = {ci: j for j, ci in enumerate(subset)}  # labels become positions in the subset
            samples = [type(s)(s.path, key=s.key, label=pos[s.label]) for s in full]
            c, used = run_set(model, samples, topk_scorer(subset), **common)
            results["sets"][name] = {"classes": len(subset)}
        elif name == "c":
            errors = {}
            for corr, sevs in c_folders(root).items():
                errors[corr] = {}
                for s, sroot in sorted(sevs.items()):
                    samples, _ = synset_samples(sroot, classes)
                    cc, _ = run_set(model, samples, topk_scorer(), **common)
                    errors[corr][s] = 1 - cc[0].item() / max(cc[2].item(), 1)
            results["sets"]["c"] = {**mce(errors), "errors": errors}
            continue
        results["sets"].setdefault(name, {}).update(
            {"top1": 100 * c[0].item() / max(c[2].item(), 1), "top5": 100 * c[1].item() / max(c[2].item(), 1),
             "images": int(c[2].item())})
    if env.rank == 0:
        text = table(results)
        print(text)
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "eval.json").write_text(json.dumps(results, indent=1))
            (Path(out_dir) / "eval.md").write_text(text + "\n")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return results


def table(results: dict) -> str:
    names = {"imagenet": "ImageNet-1K val", "real": "ImageNet ReaL", "v2": "ImageNet-V2", "a": "ImageNet-A",
             "r": "ImageNet-R", "sketch": "ImageNet-Sketch", "c": "ImageNet-C"}
    lines = ["| set | metric | value | images |", "|---|---|---|---|"]
    for k in SETS:
        r = results["sets"].get(k)
        if r is None:
            continue
        if k == "c":
            lines.append(f"| {names[k]} | mCE (lower is better) | {r['mCE']:.2f} | - |" if r["mCE"] is not None else
                         f"| {names[k]} | mCE | - | - |")
        else:
            lines.append(f"| {names[k]} | top-1 | {r['top1']:.2f} | {r.get('images', '-')} |")
    return "\n".join(lines)

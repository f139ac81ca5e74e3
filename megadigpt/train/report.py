"""``megadigpt report RUN [RUN ...] [--out DIR]``: look, not read. PNG plots of one or several runs (overlaid), the
plotted data as ``report.json`` and a short markdown summary.

Reads only what the runs wrote as data (``metrics.jsonl``, ``config.yaml`` through the safe YAML reader, the
checkpoint markers' ``schedule``, a probe's ``results.json``); nothing it reads can run code.

One plot per metric, named after its key in ``metrics.jsonl`` (``train_loss.png``, ``gen_loss.png``,
``val_top1.png``, ``knn_top1.png``, ``mfu_total.png``, ...; :data:`METRICS`), each only where a run logged it. Its
title is the metric's name and unit; its subtitle each run's configuration (task, model, global batch, peak lr,
precision, ZeRO stage, ranks). Several runs share each plot, one colour per run, the legend naming the run's
directory. Training metrics are drawn raw (faint) and smoothed (TensorBoard's debiased EMA, ``--smoothing``);
evaluations (a few points) are drawn with markers, unsmoothed. MFU is stored as a fraction in ``metrics.jsonl``
and plotted and summarised in percent, as ``megadigpt bench`` prints it.

``lr.png`` draws the whole schedule, warm-up included, recomputed from the schedule the run recorded (the start or
resume event's ``schedule``, a ``schedule_change`` event's, or else a checkpoint marker's) and ``config.yaml``
(which schedule: pretraining's and fine-tuning's cosine, :func:`megadigpt.train.optim.lr_at`, or segmentation's
poly, :func:`megadigpt.train.segment.lr_at`), with the logged values as points on it. The x axis is
``metrics.jsonl``'s step everywhere: the line logged at step s carries the lr of the s-th update (0-based update
s - 1), so the schedule is drawn at s = 1..total_steps. Without a readable config or a recorded schedule the plot
shows the logged points only and says why.

``report.json`` holds every plotted series (values as plotted: MFU in %), the schedules and the notes.
``summary.md``: one row per run (its configuration), and one row per run of last / best values (median for
throughput, MFU and step time). Resumed runs log some steps twice; the last record of a step wins, as in
:func:`megadigpt.train.metrics.read_metrics`.
"""

import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..config import ConfigError


@dataclass(frozen=True)
class Metric:
    key: str  # the key in metrics.jsonl; the plot is <key>.png
    title: str  # the plot's title: the metric's name and unit
    unit: str  # the y axis
    scale: float = 1.0  # plotted = logged x scale (MFU: fraction -> %)
    smooth: bool = True  # logged at every log step: raw + smoothed; False: evaluations, drawn with markers
    best: str = "min"  # summary.md: last / min, last / max, or the median (throughput: the first line excluded)

    @property
    def file(self) -> str:
        return f"{self.key}.png"


def _top(key: str, what: str) -> Metric:
    return Metric(key, f"{what} (%)", "%", smooth=False, best="max")


METRICS: Tuple[Metric, ...] = (
    Metric("gen_loss", "gen_loss: generative loss", "loss"),
    Metric("dis_loss", "dis_loss: discriminative loss", "loss"),
    Metric("loss", "loss: gen_loss + dis_loss", "loss"),
    Metric("train_loss", "train_loss: training loss", "loss"),
    Metric("decode_loss", "decode_loss: UperNet head's loss", "loss"),
    Metric("aux_loss", "aux_loss: auxiliary head's loss", "loss"),
    Metric("lr", "lr: learning rate", "lr", smooth=False, best="none"),
    Metric("grad_norm", "grad_norm: global L2 norm of the gradients", "norm", best="none"),
    Metric("images_per_s", "images/s (all ranks)", "images/s", best="median"),
    Metric("step_time_s", "step time (s) per optimizer step", "s", best="median"),
    Metric("mfu_total", "MFU (%): student + teacher FLOPs", "MFU (%)", scale=100.0, best="median"),
    Metric("mfu_student", "MFU (%): student FLOPs only", "MFU (%)", scale=100.0, best="median"),
    _top("knn_top1", "k-NN top-1"),
    _top("knn_top5", "k-NN top-5"),
    _top("val_top1", "validation top-1"),
    _top("val_top5", "validation top-5"),
    _top("val_ema_top1", "validation top-1, EMA weights"),
    _top("val_ema_top5", "validation top-5, EMA weights"),
    Metric("val_loss", "val_loss: validation loss", "loss", smooth=False),
    Metric("val_ema_loss", "val_ema_loss: validation loss, EMA weights", "loss", smooth=False),
    _top("val_mIoU", "validation mIoU"),
    _top("val_mAcc", "validation mAcc"),
    _top("val_aAcc", "validation aAcc"),
    _top("val_ema_mIoU", "validation mIoU, EMA weights"),
)
BY_KEY = {m.key: m for m in METRICS}


def memory_metric(key: str) -> Optional[Metric]:
    """A memory field (any ``*_gib`` key of a step record, e.g. ``peak_memory_gib``): plotted in GiB, unsmoothed."""
    if not key.endswith("_gib") or key in BY_KEY:
        return None
    return Metric(key, f"{key[:-4].replace('_', ' ')} (GiB)", "GiB", smooth=False, best="max")


# what --out may receive (guarded before any work; memory plots are named after their key and added per run)
OUTPUT_FILES = (*(m.file for m in METRICS), "probe.png", "summary.md", "report.json")


# ------------------------------------------------------------------------------------------------ reading a run
def read_metrics(path: Path) -> Tuple[Dict[int, dict], List[dict]]:
    """({step: merged record}, [events]) from metrics.jsonl; torn or foreign lines are skipped (a kill
    mid-write); for a step logged twice the last record wins."""
    steps: Dict[int, dict] = {}
    events: List[dict] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if "event" in rec:
            events.append(rec)
        elif isinstance(rec.get("step"), int) and not isinstance(rec.get("step"), bool):
            steps.setdefault(rec["step"], {}).update(rec)
    return steps, events


def read_steps(path: Path) -> Dict[int, dict]:
    """{step: merged record} from metrics.jsonl (:func:`read_metrics`)."""
    return read_metrics(path)[0]


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


@dataclass
class RunData:
    path: Path
    name: str  # the legend: the directory's name (with its parents where two runs share it)
    steps: Dict[int, dict]
    events: List[dict]
    cfg: Optional[dict]  # config.yaml, or None where it is missing or unreadable
    cfg_note: str  # why cfg is None
    start: dict  # the last start/resume event
    cache: dict = field(default_factory=dict)  # facts and schedules, read once (the markers are files)

    def series(self, metric: Metric) -> Tuple[List[int], List[float]]:
        xs, ys = [], []
        for s in sorted(self.steps):
            v = _number(self.steps[s].get(metric.key))
            if v is not None:
                xs.append(s)
                ys.append(v * metric.scale)
        return xs, ys

    @property
    def task(self) -> str:
        cfg = self.cfg or {}
        return ("segmentation" if "segment" in cfg else "fine-tune" if "finetune" in cfg else
                "pretraining" if "target" in cfg else "run")

    @property
    def total_steps(self):
        return self.start.get("total_steps")


def _load_run(path: Path) -> RunData:
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{path} has no metrics.jsonl (not a megadigpt run directory, or it never logged a step)")
    steps, events = read_metrics(metrics)
    cfg, note = None, ""
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        note = "no config.yaml"
    else:
        from ..config import read_yaml

        try:
            cfg = read_yaml(cfg_file, "run config")
        except (ConfigError, OSError, UnicodeDecodeError) as e:
            note = f"config.yaml unreadable ({str(e)[:80]})"
        if cfg is not None and not isinstance(cfg, dict):
            cfg, note = None, "config.yaml is not a mapping"
    start = next((e for e in reversed(events) if e.get("event") in ("start", "resume")), {})
    return RunData(path, path.resolve().name, steps, events, cfg, note, start)


def _legend_names(paths: Sequence[Path]) -> List[str]:
    """Each run's directory name; where two share it, as many parent folders as tell them apart."""
    parts = [p.resolve().parts for p in paths]
    names = [p[-1] for p in parts]
    for depth in range(2, max(len(p) for p in parts) + 1):
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            break
        names = ["/".join(p[-depth:]) if n in dup else n for p, n in zip(parts, names)]
    return [n if names.count(n) == 1 else f"{n} [{i + 1}]" for i, n in enumerate(names)]


# ------------------------------------------------------------------------------------------------ configuration
def run_facts(run: RunData) -> Dict[str, object]:
    """What the subtitle and summary.md say about a run: task, model, target, global batch, peak lr, precision,
    ZeRO stage, ranks, steps. The start event's resolved values (precision, world size, the model's geometry of a
    fine-tune whose config says ``auto``) over the config's."""
    if "facts" not in run.cache:
        run.cache["facts"] = _facts(run)
    return run.cache["facts"]


def _facts(run: RunData) -> Dict[str, object]:
    cfg, start = run.cfg or {}, run.start
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    args = start.get("model_args") if isinstance(start.get("model_args"), dict) else {}
    geo = {**{k: v for k, v in args.items() if v is not None},
           **{k: v for k, v in model.items() if v is not None}}
    arch = geo.get("arch") if geo.get("arch") not in (None, "auto") else "ViT"
    dims = [f"{label} {geo[k]}" for k, label in (("embed_dim", "width"), ("depth", "depth"), ("patch_size", "patch"))
            if geo.get(k) is not None]
    size = geo.get("img_size") or geo.get("crop_size")
    if size:
        dims.append(f"{size} px")
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    optim = cfg.get("optim") if isinstance(cfg.get("optim"), dict) else {}
    target = cfg.get("target") if isinstance(cfg.get("target"), dict) else {}
    sched = (schedules(run)[0] or [(0, {})])[-1][1]
    peak = sched.get("peak_lr", optim.get("lr"))
    precision = start.get("precision") or train.get("precision")
    return {
        "task": run.task if run.cfg is not None else None,
        "model": f"{arch} ({', '.join(dims)})" if dims else (arch if model or geo else None),
        "target": " ".join(str(x) for x in (target.get("kind"), target.get("model")) if x) or None,
        "global batch": train.get("global_batch"),
        "peak lr": f"{peak:.3g}" if _number(peak) is not None else (f"blr {optim['blr']:.3g}" if
                                                                     _number(optim.get("blr")) else None),
        "precision": precision,
        "ZeRO": train.get("zero_stage"),
        "ranks": start.get("world_size"),
        "steps": f"{max(run.steps) if run.steps else 0} of {run.total_steps or '?'}",
    }


def subtitle(run: RunData) -> str:
    f = run_facts(run)
    parts = [f["task"], f["model"], f["target"] and f"target {f['target']}",
             f["global batch"] is not None and f"global batch {f['global batch']}",
             f["peak lr"] and f"lr {f['peak lr']}", f["precision"],
             f["ZeRO"] is not None and f"ZeRO-{f['ZeRO']}",
             f["ranks"] is not None and f"{f['ranks']} rank{'s' if f['ranks'] != 1 else ''}"]
    if run.cfg is None:
        parts.append(run.cfg_note)
    return " · ".join(str(p) for p in parts if p) or "no configuration recorded"


# ------------------------------------------------------------------------------------------------ the lr schedule
def _valid_schedule(s) -> bool:
    return (isinstance(s, dict) and isinstance(s.get("total_steps"), int) and s["total_steps"] > 0
            and all(_number(s.get(k)) is not None for k in ("warmup_steps", "peak_lr", "min_lr")))


def schedules(run: RunData) -> Tuple[List[Tuple[int, dict]], str]:
    """[(first update it governs, schedule)] in the order of the run, and a note where none (or not the first)
    was recorded. The start and resume events and ``schedule_change`` events carry it; a run logged before they
    did falls back on its oldest checkpoint marker (the schedule of that checkpoint's stretch)."""
    if "schedules" not in run.cache:
        run.cache["schedules"] = _schedules(run)
    return run.cache["schedules"]


def _schedules(run: RunData) -> Tuple[List[Tuple[int, dict]], str]:
    segs: List[Tuple[int, dict]] = []
    for e in run.events:
        if e.get("event") in ("start", "resume", "schedule_change") and _valid_schedule(e.get("schedule")):
            step = e.get("step") if isinstance(e.get("step"), int) else 0
            segs = [x for x in segs if x[0] < step]  # a later record of the same stretch wins
            if not segs or segs[-1][1] != e["schedule"]:
                segs.append((step, e["schedule"]))
    if not segs or segs[0][0] > 0:
        marker = _oldest_marker_schedule(run.path, segs[0][0] if segs else None)
        if marker is not None:
            segs.insert(0, (0, marker))
    if not segs:
        return [], "no schedule recorded (start event or checkpoint marker)"
    if segs[0][0] > 0:
        return segs, f"schedule before step {segs[0][0]} not recorded"
    return segs, ""


def _oldest_marker_schedule(run_dir: Path, before: Optional[int]) -> Optional[dict]:
    from ..checkpoint.ds_checkpoint import complete_tags, read_marker

    try:
        tags = complete_tags(run_dir)
        m = (read_marker(run_dir, tags[0]) or {}) if tags else {}  # the oldest: a later one may hold a changed one
    except (ConfigError, OSError):
        return None
    step = m.get("step") if isinstance(m.get("step"), int) else None
    if _valid_schedule(m.get("schedule")) and step is not None and (before is None or step <= before):
        return m["schedule"]
    return None


def _lr_function(run: RunData):
    """lr(update index, schedule) for this run's kind of schedule, or (None, why)."""
    if run.cfg is None:
        return None, f"{run.cfg_note}: logged points only"
    optim = run.cfg.get("optim") if isinstance(run.cfg.get("optim"), dict) else {}
    if "segment" in run.cfg:
        from types import SimpleNamespace

        from ..segment_config import SegmentOptimConfig
        from .segment import lr_at as seg_lr_at

        d = SegmentOptimConfig()
        o = {k: optim.get(k, getattr(d, k)) for k in ("schedule", "poly_power", "warmup_ratio")}
        return (lambda i, s: seg_lr_at(i, SimpleNamespace(min_lr=s["min_lr"], **o), s["peak_lr"],
                                       s["warmup_steps"], s["total_steps"])), ""
    from .optim import lr_at  # imports torch (about a second): only here

    return (lambda i, s: lr_at(i, s["peak_lr"], s["warmup_steps"], s["total_steps"], s["min_lr"])), ""


def lr_schedule(run: RunData, limit: int = 2000) -> Tuple[Optional[Dict[str, list]], str]:
    """({"step": [...], "lr": [...]}, note): the lr of every update the run's schedule plans, at the step that
    logs it (update i at step i + 1, 1..total_steps); at most ``limit`` evenly spread steps plus the warm-up's
    end and each change of schedule, on longer runs. (None, why) where it cannot be recomputed."""
    fn, why = _lr_function(run)
    if fn is None:
        return None, why
    segs, note = schedules(run)
    if not segs:
        return None, f"{note}: logged points only"
    total = segs[-1][1]["total_steps"]
    first = segs[0][0] + 1
    keep = {first, total}
    for start, s in segs:
        w = int(s["warmup_steps"])
        keep |= {start + 1, start, w, w + 1, w + 2}
    if total - first + 1 <= limit:
        steps = list(range(first, total + 1))
    else:
        span = total - first
        steps = sorted({first + round(k * span / (limit - 1)) for k in range(limit)} |
                       {k for k in keep if first <= k <= total})
    lrs, j = [], 0
    try:
        for s in steps:
            i = s - 1  # the update logged at step s
            while j + 1 < len(segs) and segs[j + 1][0] <= i:
                j += 1
            lrs.append(float(fn(i, segs[j][1])))
    except (TypeError, ValueError, ArithmeticError) as e:  # a config.yaml edited by hand
        return None, f"schedule not recomputable from config.yaml ({e}): logged points only"
    return {"step": steps, "lr": lrs}, note


# ------------------------------------------------------------------------------------------------ smoothing
def smooth(values: Sequence[float], weight: float) -> List[float]:
    """TensorBoard's scalar smoothing: an exponential moving average, debiased (the first points are not pulled
    towards 0); ``weight`` 0 returns the values."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** n) if weight > 0 else v)
    return out


# ------------------------------------------------------------------------------------------------ plotting
def _save(fig, out: Path, name: str) -> None:
    import matplotlib.pyplot as plt

    tmp = out / f".{name}.tmp{os.getpid()}"  # replaced atomically, recorded as megadigpt's
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out / name)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    from ..checkpoint.convert import record_outputs

    record_outputs(out, [name], "report")


def _figure(title: str, subtitles: List[str], xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for s in subtitles[:6]:
        lines += textwrap.wrap(s, 150) or [""]
    if len(subtitles) > 6:
        lines.append(f"... and {len(subtitles) - 6} more runs")
    fig, ax = plt.subplots(figsize=(7.2, 4.2 + 0.14 * len(lines)), dpi=110)
    fig.suptitle(title, fontsize=11)
    ax.set_title("\n".join(lines), fontsize=7, color="0.3")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and blocks
    return fig, ax


def _finish(fig, ax, notes: List[str], legend: bool) -> None:
    """Notes go under the axes (never over a curve), the legend where matplotlib finds room."""
    if legend:
        ax.legend(fontsize=7)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom", color="0.35")
    height = fig.get_figheight() * fig.dpi
    fig.tight_layout(rect=(0, (12 * len(notes) + 6) / height if notes else 0, 1, 1))


def _colors(runs: List[RunData], drawn: List[RunData]) -> List[str]:
    """Each run keeps its colour in every plot (its place in the command line), whichever runs a plot shows."""
    return [f"C{runs.index(r) % 10}" for r in drawn]


def _subtitles(drawn: List[RunData], runs: List[RunData]) -> List[str]:
    """One line per run the plot shows, named where the report has several runs (one line where they agree)."""
    subs = [subtitle(r) for r in drawn]
    if len(runs) == 1:
        return subs
    if len(drawn) > 1 and len(set(subs)) == 1:
        return [f"{', '.join(r.name for r in drawn)}: {subs[0]}"]
    return [f"{r.name}: {s}" for r, s in zip(drawn, subs)]


def plot_metric(out: Path, metric: Metric, runs: List[RunData], smoothing: float) -> Optional[dict]:
    """``<key>.png`` of every run that logged ``metric`` (None where none did); returns what it plotted."""
    data = {r.name: r.series(metric) for r in runs}
    data = {k: v for k, v in data.items() if v[0]}
    if not data:
        return None
    drawn = [r for r in runs if r.name in data]
    fig, ax = _figure(metric.title, _subtitles(drawn, runs), "step", metric.unit)
    record = {"metric": metric.key, "title": metric.title, "unit": metric.unit, "scale": metric.scale,
              "series": {}, "notes": {}}
    smoothed = metric.smooth and smoothing > 0
    for r, color in zip(drawn, _colors(runs, drawn)):
        xs, ys = data[r.name]
        rec = {"step": xs, "value": ys}
        if smoothed:
            rec["smoothed"] = smooth(ys, smoothing)
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1.0)
            ax.plot(xs, rec["smoothed"], color=color, linewidth=1.6, label=r.name)
        else:
            ax.plot(xs, ys, color=color, linewidth=1.4, marker="." if not metric.smooth else None, label=r.name)
        record["series"][r.name] = rec
    notes = []
    if smoothed:
        notes.append(f"faint: raw; solid: smoothed (EMA {smoothing:g})")
    _finish(fig, ax, notes, len(runs) > 1)
    _save(fig, out, metric.file)
    return record


def plot_lr(out: Path, runs: List[RunData]) -> Optional[dict]:
    """``lr.png``: each run's whole schedule (line) and its logged values (points)."""
    metric = BY_KEY["lr"]
    data = {r.name: r.series(metric) for r in runs}
    curves = {r.name: lr_schedule(r) for r in runs}
    drawn = [r for r in runs if data[r.name][0] or curves[r.name][0]]
    if not drawn:
        return None
    fig, ax = _figure(metric.title, _subtitles(drawn, runs), "step", metric.unit)
    record = {"metric": "lr", "title": metric.title, "unit": metric.unit, "scale": 1.0, "series": {},
              "schedule": {}, "notes": {}}
    notes = []
    for r, color in zip(drawn, _colors(runs, drawn)):
        xs, ys = data[r.name]
        curve, note = curves[r.name]
        if curve:
            ax.plot(curve["step"], curve["lr"], color=color, linewidth=1.4, label=f"{r.name}: schedule")
            record["schedule"][r.name] = curve
        if xs:
            ax.plot(xs, ys, linestyle="none", marker="o", markersize=3, color=color, label=f"{r.name}: logged")
            record["series"][r.name] = {"step": xs, "value": ys}
        if note:
            record["notes"][r.name] = note
            notes.append(note if len(drawn) == 1 else f"{r.name}: {note}")
    _finish(fig, ax, notes, True)
    _save(fig, out, "lr.png")
    return record


def _probe_curves(runs: List[RunData], probes: Sequence[str]) -> Dict[str, List[Tuple[int, float]]]:
    files = []
    for p in probes:
        path = Path(p)
        f = path / "results.json" if path.is_dir() else path
        if not f.is_file():
            raise ConfigError(f"probe results not found: {f}")
        files.append(((path if path.is_dir() else path.parent).resolve().name, f))
    if not probes:
        files = [(r.name, r.path / "results.json") for r in runs if (r.path / "results.json").is_file()]
    out = {}
    for label, f in files:
        try:
            res = json.loads(f.read_text())
            per_block = [(int(x["layer"]), float(x["top1"])) for x in res.get("linear", [])]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{f}: not a probe results file ({e})") from None
        if per_block:
            out[label if label not in out else str(f)] = sorted(per_block)
    return out


def plot_probe(out: Path, curves: Dict[str, List[Tuple[int, float]]], runs: List[RunData]) -> dict:
    fig, ax = _figure("linear-probe top-1 (%) per block", _subtitles(runs, runs), "block", "%")
    for (label, pts), color in zip(curves.items(), [f"C{i % 10}" for i in range(len(curves))]):
        ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", color=color, label=label)
    _finish(fig, ax, [], len(curves) > 1)
    _save(fig, out, "probe.png")
    return {"metric": "linear-probe top-1", "unit": "%",
            "series": {k: {"block": [b for b, _ in v], "value": [t for _, t in v]} for k, v in curves.items()}}


# ------------------------------------------------------------------------------------------------ summary
def _aggregate(metric: Metric, values: List[float]) -> str:
    last = f"{values[-1]:.4g}"
    if metric.best == "min":
        return f"{last} / {min(values):.4g}"
    if metric.best == "max":
        return f"{last} / {max(values):.4g}"
    if metric.best == "median":
        steady = values[1:] if len(values) > 2 else values  # the first line holds start-up (compilation, loaders)
        s = sorted(steady)
        mid = len(s) // 2
        return f"{(s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2):.4g}"
    return last


def _header(metric: Metric) -> str:
    name = {"images_per_s": "images/s", "step_time_s": "step time (s)", "mfu_total": "MFU total (%)",
            "mfu_student": "MFU student (%)"}.get(metric.key, metric.key + (" (%)" if metric.unit == "%" else "")
                                                  + (" (GiB)" if metric.unit == "GiB" else ""))
    how = {"min": "last / min", "max": "last / max", "median": "median"}[metric.best]
    return f"{name}, {how}"


def _summary(runs: List[RunData], metrics: List[Metric], written: List[str], probe: Dict[str, list]) -> str:
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs: " + ", ".join(r.name for r in runs)
    lines = [f"# {title}", ""]
    facts = [run_facts(r) for r in runs]
    cols = [k for k in facts[0] if any(f[k] not in (None, "") for f in facts)]
    lines += ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r, f in zip(runs, facts):
        cells = ["" if f[k] is None else str(f[k]).replace("|", "/") for k in cols]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    lines += ["", "Run directories: " + ", ".join(f"`{r.path}`" for r in runs), ""]
    table = [m for m in metrics if m.best != "none"]
    if table:
        lines += ["| run | " + " | ".join(_header(m) for m in table) + " |", "|---" * (len(table) + 1) + "|"]
        for r in runs:
            cells = []
            for m in table:
                ys = r.series(m)[1]
                cells.append(_aggregate(m, ys) if ys else "")
            lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
        lines += ["", "MFU is against the device's 16-bit peak (metrics.jsonl stores it as a fraction; shown in %). "
                  "Medians leave out the first logged line (start-up).", ""]
    for label, pts in probe.items():
        b = max(pts, key=lambda x: x[1])
        lines.append(f"Best linear probe ({label}): block {b[0]}, top-1 {b[1]:.2f}%")
    if probe:
        lines.append("")
    lines += [f"![{n[:-4]}]({n})" for n in written] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the command
def _as_list(x) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, (str, os.PathLike)) else list(x)


def default_out(run_dirs) -> Path:
    dirs = _as_list(run_dirs)
    if len(dirs) != 1:
        raise ConfigError(f"{len(dirs)} runs: give --out DIR for the overlaid report (one run's default is "
                          f"<run_dir>/report)")
    return Path(dirs[0]) / "report"


def output_files(run_dirs) -> List[str]:
    """The names ``report`` may write into ``--out`` (for the guard before any work): the fixed ones and each
    run's memory fields."""
    names = list(OUTPUT_FILES)
    for d in _as_list(run_dirs):
        f = Path(d) / "metrics.jsonl"
        if f.is_file():
            keys = {k for rec in read_steps(f).values() for k in rec}
            names += sorted(m.file for m in map(memory_metric, keys) if m and m.file not in names)
    return names


def report(run_dirs: Union[str, os.PathLike, Sequence], out_dir=None, probe=None, smoothing: float = 0.6) -> dict:
    """Write the plots, ``report.json`` and ``summary.md`` into ``out_dir`` (default ``<run_dir>/report`` for one
    run; required for several); returns what it wrote."""
    paths = [Path(d) for d in _as_list(run_dirs)]
    if not paths:
        raise ConfigError("report: no run directory given")
    if not 0 <= smoothing < 1:
        raise ConfigError(f"--smoothing {smoothing}: must be in [0, 1) (TensorBoard's slider; 0 = raw only)")
    out = Path(out_dir) if out_dir else default_out(paths)
    runs = [_load_run(p) for p in paths]
    for r, name in zip(runs, _legend_names(paths)):
        r.name = name
    probe_curves = _probe_curves(runs, _as_list(probe))
    out.mkdir(parents=True, exist_ok=True)

    keys = {k for r in runs for rec in r.steps.values() for k in rec}
    memory = [m for m in map(memory_metric, sorted(keys)) if m]
    plotted: Dict[str, dict] = {}
    present: List[Metric] = []
    for m in (*METRICS, *memory):
        rec = plot_lr(out, runs) if m.key == "lr" else plot_metric(out, m, runs, smoothing)
        if rec is not None:
            plotted[m.file] = rec
            present.append(m)
    if probe_curves:
        plotted["probe.png"] = plot_probe(out, probe_curves, runs)
    if not plotted:
        raise ConfigError(f"{', '.join(str(p / 'metrics.jsonl') for p in paths)}: no logged steps to plot")
    written = list(plotted)

    from ..checkpoint.convert import write_output

    doc = {"written_by": "megadigpt report", "smoothing": smoothing,
           "note": "values as plotted (MFU in %); x = metrics.jsonl's step; lr schedule: the lr of update s - 1 at "
                   "step s",
           "runs": [{"name": r.name, "run_dir": str(r.path), "subtitle": subtitle(r), "facts": run_facts(r),
                     "total_steps": r.total_steps, "last_step": max(r.steps) if r.steps else None,
                     "schedules": [{"from_step": s, **sch} for s, sch in schedules(r)[0]]} for r in runs],
           "plots": plotted}
    write_output(out / "report.json", json.dumps(doc, indent=1) + "\n", "report")
    write_output(out / "summary.md", _summary(runs, present, written, probe_curves), "report")
    return {"out": str(out), "plots": written, "steps": sum(len(r.steps) for r in runs),
            "runs": [r.name for r in runs]}

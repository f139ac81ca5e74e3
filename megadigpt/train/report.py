"""``megadigpt report <run_dir>``: look, not read. PNG plots of a run and a short markdown summary.

Reads only what the run wrote as data (``metrics.jsonl``, ``config.yaml`` through the safe YAML reader, a probe's
``results.json``); nothing it reads can run code. Plots (each only where the run logged it):

- ``loss.png``: the generative and discriminative losses of pretraining, or the training loss of fine-tuning;
- ``lr.png``: the learning rate the optimizer used at each logged step;
- ``throughput.png``: images/s (and MFU where logged);
- ``knn.png``: the k-NN monitor's top-1 during pretraining, or validation top-1 (and EMA) during fine-tuning;
- ``probe.png``: linear-probe top-1 of every block (the iGPT/DiGIT curve), from ``megadigpt probe``'s
  ``results.json`` in the run directory or given with ``--probe``.

``summary.md`` lists the run's size, steps, last and best values, and links the plots. Resumed runs log some steps
twice; the last record of a step wins, as in :func:`megadigpt.train.metrics.read_metrics`.
"""

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from ..config import ConfigError

SERIES = {
    "loss.png": ("loss", ["gen_loss", "dis_loss", "train_loss"]),
    "lr.png": ("learning rate", ["lr"]),
    "throughput.png": ("images/s", ["images_per_s"]),
    "knn.png": ("top-1 (%)", ["knn_top1", "val_top1", "val_ema_top1"]),
}
OUTPUT_FILES = (*SERIES, "probe.png", "summary.md")  # what --out may receive


def read_steps(path: Path) -> Dict[int, dict]:
    """{step: merged record} from metrics.jsonl; torn or foreign lines are skipped (a kill mid-write)."""
    out: Dict[int, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and "event" not in rec:
            out.setdefault(rec["step"], {}).update(rec)
    return out


def _events(path: Path) -> List[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" in rec:
            out.append(rec)
    return out


def _plot(out: Path, name: str, ylabel: str, curves: Dict[str, tuple], title: str, marker: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker=marker or None, label=label, linewidth=1.4)
    ax.set_xlabel("block" if name == "probe.png" else "step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
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


def report(run_dir, out_dir=None, probe: Optional[str] = None) -> dict:
    """Write the plots and ``summary.md`` into ``out_dir`` (default ``<run_dir>/report``); returns what it wrote."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{run} has no metrics.jsonl (not a megadigpt run directory, or it never logged a step)")
    steps = read_steps(metrics)
    events = _events(metrics)
    out = Path(out_dir) if out_dir else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    title = run.resolve().name
    written, lines = [], []
    for name, (ylabel, keys) in SERIES.items():
        curves = {}
        for k in keys:
            pts = [(s, r[k]) for s, r in sorted(steps.items()) if isinstance(r.get(k), (int, float))]
            if pts:
                curves[k] = tuple(zip(*pts))
        if curves:
            _plot(out, name, ylabel, curves, title, marker="." if name == "knn.png" else "")
            written.append(name)
    probe_file = Path(probe) / "results.json" if probe and Path(probe).is_dir() else (
        Path(probe) if probe else run / "results.json")
    per_block = None
    if probe_file.is_file():
        try:
            res = json.loads(probe_file.read_text())
            per_block = [(int(x["layer"]), float(x["top1"])) for x in res.get("linear", [])]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{probe_file}: not a probe results file ({e})") from None
        if per_block:
            xs, ys = zip(*sorted(per_block))
            _plot(out, "probe.png", "linear-probe top-1 (%)", {"linear probe": (xs, ys)}, title, marker="o")
            written.append("probe.png")
    elif probe:
        raise ConfigError(f"probe results not found: {probe_file}")
    if not written:
        raise ConfigError(f"{metrics} holds no logged steps to plot")

    start = next((e for e in reversed(events) if e.get("event") in ("start", "resume")), {})
    last_step = max(steps) if steps else 0
    lines += [f"# {title}", "", f"Run directory: `{run}`", ""]
    facts = [("steps logged", f"{len(steps)} (last {last_step} of {start.get('total_steps', '?')})"),
             ("ranks", start.get("world_size")), ("precision", start.get("precision")),
             ("images in the data", start.get("images") or start.get("train_images"))]
    cfg_file = run / "config.yaml"
    if cfg_file.is_file():
        from ..config import read_yaml

        cfg = read_yaml(cfg_file, "run config")
        if isinstance(cfg, dict):
            model = cfg.get("model") or {}
            facts += [("model", ", ".join(f"{k}={model[k]}" for k in ("arch", "embed_dim", "depth", "patch_size",
                                                                       "img_size") if model.get(k) is not None))]
            target = cfg.get("target") or {}
            if target:
                facts.append(("target", f"{target.get('kind')} {target.get('model') or ''}".strip()))
    lines += [f"- {k}: {v}" for k, v in facts if v not in (None, "")]
    lines += ["", "| metric | last | best |", "|---|---|---|"]
    for k in ("gen_loss", "dis_loss", "train_loss", "images_per_s", "mfu_total", "knn_top1", "val_top1",
              "val_ema_top1"):
        vals = [r[k] for _, r in sorted(steps.items()) if isinstance(r.get(k), (int, float))]
        if vals:
            best = min(vals) if k.endswith("loss") else max(vals)
            lines.append(f"| {k} | {vals[-1]:.4g} | {best:.4g} |")
    if per_block:
        b = max(per_block, key=lambda x: x[1])
        lines += ["", f"Best linear probe: block {b[0]}, top-1 {b[1]:.2f}%"]
    lines += [""] + [f"![{n[:-4]}]({n})" for n in written] + [""]
    from ..checkpoint.convert import write_output

    write_output(out / "summary.md", "\n".join(lines), "report")
    return {"out": str(out), "plots": written, "steps": len(steps)}

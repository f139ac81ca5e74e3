"""Look, not read: the metric sinks (metrics.jsonl, W&B in its real offline mode, the log lines a SLURM job
shows) and ``megadigpt report``'s plots, report.json and summary, on real tiny runs: a pretraining and a fine-tune
from it, each reported alone and overlaid."""

import json
import re
import shutil
import statistics

import pytest

from megadigpt.config import ConfigError
from megadigpt.train.metrics import MetricsSink, format_duration

from .conftest import TINY, run_cli


def _log_run(run_dir, steps=6, wandb=None, start=0):
    sink = MetricsSink(run_dir, True, False, "off", steps, start, wandb=wandb)
    sink.event(event="start", step=start, world_size=2, total_steps=steps, images=1000, precision="fp32")
    for s in range(start + 1, steps + 1):
        sink.log(s, {"gen_loss": 2.0 / s, "dis_loss": 1.0 / s, "lr": 1e-3 * s / steps, "images_per_s": 100.0 + s,
                     "knn_top1": 10.0 * s if s % 3 == 0 else None})
    sink.close()


def test_log_lines_without_a_terminal_carry_time_step_total_and_eta(tmp_path, capsys):
    _log_run(tmp_path / "run", steps=4)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " step " in ln]
    assert len(lines) == 4
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step 1/4 \(25%\) eta \d+:\d\d:\d\d gen_loss=2 ", lines[0])
    assert "step 4/4 (100%) eta 0:00:00" in lines[-1]
    assert format_duration(93784) == "1d2:03:04"
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("time" in r for r in recs)


def test_wandb_offline_run_is_written_and_resumed_under_one_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    settings = {"project": "megadigpt-test", "mode": "offline", "config": {"model": {"depth": 2}}}
    _log_run(run, steps=3, wandb=settings)
    run_id = (run / "wandb_id.txt").read_text().strip()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(run_id)
    data = list(offline[0].glob("*.wandb"))
    assert data and data[0].stat().st_size > 0
    _log_run(run, steps=6, wandb=settings, start=3)  # a resume: the same W&B run id, a second offline segment
    assert (run / "wandb_id.txt").read_text().strip() == run_id
    # W&B names a second segment started within the same second <time>-<id>-1: the id is what must match
    segments = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", n)
                                      for n in segments), segments


def test_report_of_logged_steps_with_a_probe(tmp_path):
    """A run directory with only metrics.jsonl (no config, no schedule) and a probe's results.json: the k-NN
    monitor goes to knn_top1.png, the probe to probe.png, the lr plot says why it shows the logged points only."""
    run = tmp_path / "run"
    _log_run(run, steps=6)
    (run / "results.json").write_text(json.dumps({"linear": [{"layer": 1, "top1": 20.0}, {"layer": 2, "top1": 35.5},
                                                             {"layer": 3, "top1": 30.0}]}))
    from megadigpt.train.report import report

    res = report(run)
    assert res["plots"] == ["gen_loss.png", "dis_loss.png", "lr.png", "images_per_s.png", "knn_top1.png",
                            "probe.png"]
    for name in res["plots"]:
        assert (run / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (run / "report" / "summary.md").read_text()
    assert "| run | gen_loss, last / min | dis_loss, last / min | images/s, median | knn_top1 (%), last / max |" \
        in summary
    assert "| run | 0.3333 / 0.3333 | 0.1667 / 0.1667 |" in summary  # last = best = 2/6, 1/6
    assert "| 60 / 60 |" in summary
    assert "Best linear probe (run): block 2, top-1 35.50%" in summary
    doc = json.loads((run / "report" / "report.json").read_text())
    assert doc["plots"]["lr.png"]["schedule"] == {}
    assert doc["plots"]["lr.png"]["notes"] == {"run": "no config.yaml: logged points only"}
    assert doc["plots"]["knn_top1.png"]["series"]["run"] == {"step": [3, 6], "value": [30.0, 60.0]}
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        report(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A real 6-step pretraining (warm-up 2 steps, cosine to 0, a line every step, checkpoints at 3 and 6)."""
    run = tmp_path_factory.mktemp("report") / "pre"
    run_cli(["pretrain", "--data", "demo", "--run-dir", str(run)] + TINY +
            ["train.global_batch=8", "train.micro_batch=8", "train.zero_stage=0", "train.ckpt_every=3",
             "train.max_steps=6"])
    return run


@pytest.fixture(scope="module")
def finetune_run(pretrain_run, cifar_small):
    """A real fine-tune of that pretraining: 2 epochs of 4 steps, validated (and EMA-validated) after each."""
    run = pretrain_run.parent / "ft"
    run_cli(["finetune", "--init-from", str(pretrain_run), "--train", str(cifar_small / "train.jsonl"), "--val",
             str(cifar_small / "val.jsonl"), "--run-dir", str(run), "--config", "cifar10_finetune",
             "data.num_workers=0", "train.progress=off", "train.log_every=1", "train.tensorboard=false",
             "train.global_batch=32", "train.micro_batch=16", "data.loader=torch", "train.epochs=2",
             "train.zero_stage=1", "finetune.ema_decay=0.9"])
    return run


def _lines(run, event=False):
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if ("event" in r) == event]


def _cli(argv, capsys):
    from megadigpt.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_pretraining_report_names_units_schedule_and_mfu(pretrain_run, tmp_path, capsys):
    run = shutil.copytree(pretrain_run, tmp_path / "pre")
    code, out, err = _cli(["report", run], capsys)  # the old single-run form, default --out <run>/report
    assert code == 0, err
    rep = run / "report"
    assert "report.json and summary.md in" in out
    names = sorted(p.name for p in rep.glob("*.png"))
    assert names == ["dis_loss.png", "gen_loss.png", "host_peak_gib.png", "images_per_s.png", "loss.png", "lr.png",
                     "mfu_student.png", "step_time_s.png"], names  # host_peak_gib: the harness's memory field
    doc = json.loads((rep / "report.json").read_text())
    plots = doc["plots"]
    assert plots["mfu_student.png"]["title"] == "MFU (%): student FLOPs only"
    assert plots["images_per_s.png"]["title"].startswith("images/s")
    assert plots["step_time_s.png"]["title"].startswith("step time (s)")
    assert plots["gen_loss.png"]["title"].startswith("gen_loss")
    subtitle = doc["runs"][0]["subtitle"]
    for part in ("pretraining", "vit_tiny (width 64, depth 4, patch 4, 32 px)", "target pixels", "global batch 8",
                 "lr 0.001", "fp32", "ZeRO-0", "1 rank"):
        assert part in subtitle, subtitle

    # the whole schedule, warm-up included, at every step 1..total; the logged values lie on it
    from megadigpt.train.optim import lr_at

    start = _lines(run, event=True)[0]
    assert start["event"] == "start" and start["schedule"] == {"total_steps": 6, "warmup_steps": 2.0,
                                                              "peak_lr": 0.001, "min_lr": 0.0}
    curve = plots["lr.png"]["schedule"]["pre"]
    assert curve["step"] == list(range(1, 7))
    assert curve["lr"] == [lr_at(s - 1, 1e-3, 2, 6, 0.0) for s in range(1, 7)]
    assert curve["lr"][:3] == [0.0, 0.0005, 0.001]  # the warm-up, from 0 to the peak
    logged = {r["step"]: r["lr"] for r in _lines(run)}
    pts = plots["lr.png"]["series"]["pre"]
    assert dict(zip(pts["step"], pts["value"])) == logged
    assert all(curve["lr"][s - 1] == pytest.approx(v, abs=1e-12) for s, v in logged.items())

    # MFU: a fraction in metrics.jsonl, percent in the plot and summary.md (as `megadigpt bench` prints it)
    mfu = {r["step"]: r["mfu_student"] for r in _lines(run)}
    assert all(0 < v < 1 for v in mfu.values())
    series = plots["mfu_student.png"]["series"]["pre"]
    assert series["value"] == pytest.approx([100 * mfu[s] for s in series["step"]])
    # raw and smoothed: TensorBoard's debiased EMA with the default weight 0.6
    w, last, expect = 0.6, 0.0, []
    for n, v in enumerate(series["value"], 1):
        last = w * last + (1 - w) * v
        expect.append(last / (1 - w ** n))
    assert series["smoothed"] == pytest.approx(expect) and series["smoothed"][0] == pytest.approx(series["value"][0])
    summary = (rep / "summary.md").read_text()
    assert "MFU student (%), median" in summary
    def cells(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    row = next(ln for ln in summary.splitlines() if ln.startswith("| pre |") and "/" in ln and "of 6" not in ln)
    header = next(ln for ln in summary.splitlines() if "MFU student (%)" in ln)
    cell = cells(row)[cells(header).index("MFU student (%), median")]
    assert float(cell) == pytest.approx(statistics.median([100 * mfu[s] for s in sorted(mfu)][1:]), rel=1e-3)
    assert "| pre | pretraining | vit_tiny (width 64, depth 4, patch 4, 32 px) |" in summary and "| 6 of 6 |" in summary

    # --smoothing 0: raw lines only
    code, _, err = _cli(["report", run, "--smoothing", "0", "--out", tmp_path / "raw"], capsys)
    assert code == 0, err
    raw = json.loads((tmp_path / "raw" / "report.json").read_text())["plots"]["gen_loss.png"]["series"]["pre"]
    assert "smoothed" not in raw
    code, _, err = _cli(["report", run, "--smoothing", "1", "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "--smoothing 1.0: must be in [0, 1)" in err


def test_the_schedule_of_an_older_run_and_of_a_changed_one(pretrain_run, tmp_path):
    """Without the start event's schedule (runs logged before it was recorded) the oldest checkpoint marker's is
    used; a schedule changed on resume draws each stretch with its own; without config.yaml, logged points only."""
    from megadigpt.train.optim import lr_at
    from megadigpt.train.report import report

    run = shutil.copytree(pretrain_run, tmp_path / "old")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in json.loads(ln).items() if k != "schedule"}) + "\n" for ln in lines))
    report(run, tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "report.json").read_text())
    assert doc["plots"]["lr.png"]["schedule"]["old"]["lr"] == [lr_at(i, 1e-3, 2, 6, 0.0) for i in range(6)]
    assert doc["runs"][0]["schedules"] == [{"from_step": 0, "total_steps": 6, "warmup_steps": 2.0, "peak_lr": 0.001,
                                            "min_lr": 0.0}]

    longer = {"total_steps": 10, "warmup_steps": 2.0, "peak_lr": 0.001, "min_lr": 0.0}
    with open(run / "metrics.jsonl", "a") as f:  # what a resume at step 6 with train.max_steps=10 records
        f.write(json.dumps({"event": "schedule_change", "step": 6, "changes": ["total_steps 6 -> 10"],
                            "schedule": longer}) + "\n")
        f.write(json.dumps({"event": "resume", "step": 6, "total_steps": 10, "schedule": longer}) + "\n")
    report(run, tmp_path / "b")
    curve = json.loads((tmp_path / "b" / "report.json").read_text())["plots"]["lr.png"]["schedule"]["old"]
    assert curve["step"] == list(range(1, 11))
    assert curve["lr"] == [lr_at(i, 1e-3, 2, 6 if i < 6 else 10, 0.0) for i in range(10)]

    (run / "config.yaml").unlink()
    report(run, tmp_path / "c")
    lr = json.loads((tmp_path / "c" / "report.json").read_text())["plots"]["lr.png"]
    assert lr["schedule"] == {} and lr["notes"] == {"old": "no config.yaml: logged points only"}
    assert len(lr["series"]["old"]["step"]) == 6


def test_a_fine_tune_and_its_pretraining_overlaid(pretrain_run, finetune_run, tmp_path, capsys):
    out = tmp_path / "both"
    code, stdout, err = _cli(["report", pretrain_run, finetune_run, "--out", out], capsys)
    assert code == 0, err
    names = {p.name for p in out.glob("*.png")}
    assert {"val_top1.png", "val_ema_top1.png", "train_loss.png", "gen_loss.png", "lr.png", "grad_norm.png",
            "images_per_s.png", "step_time_s.png"} <= names, names
    assert not names & {"knn.png", "knn_top1.png", "loss_total.png", "throughput.png"}  # a fine-tune has no k-NN
    doc = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["pre", "ft"]
    plots = doc["plots"]
    val = {r["step"]: r["val_top1"] for r in _lines(finetune_run) if "val_top1" in r}
    assert sorted(val) == [4, 8]  # 128 images / 32 a step = 4 steps an epoch
    assert plots["val_top1.png"]["series"] == {"ft": {"step": [4, 8], "value": [val[4], val[8]]}}
    assert plots["val_top1.png"]["title"] == "validation top-1 (%)"
    assert set(plots["images_per_s.png"]["series"]) == {"pre", "ft"}  # one plot, both runs
    assert set(plots["lr.png"]["schedule"]) == {"pre", "ft"}
    ft_sched = next(e for e in _lines(finetune_run, event=True) if e["event"] == "start")["schedule"]
    from megadigpt.train.optim import lr_at

    curve = plots["lr.png"]["schedule"]["ft"]
    assert curve["step"] == list(range(1, ft_sched["total_steps"] + 1)) and curve["lr"][0] == 0.0
    assert curve["lr"] == [lr_at(i, ft_sched["peak_lr"], ft_sched["warmup_steps"], ft_sched["total_steps"],
                                 ft_sched["min_lr"]) for i in range(ft_sched["total_steps"])]
    assert "fine-tune" in doc["runs"][1]["subtitle"] and "ZeRO-1" in doc["runs"][1]["subtitle"]
    summary = (out / "summary.md").read_text()
    rows = [ln for ln in summary.splitlines() if ln.startswith(("| pre |", "| ft |"))]
    assert len(rows) == 4  # one row per run in the runs table and in the metrics table
    assert f"{val[8]:.4g} / {max(val.values()):.4g}" in rows[3]
    assert "val_top1 (%), last / max" in summary

    code, _, err = _cli(["report", pretrain_run, finetune_run], capsys)  # several runs need a folder of their own
    assert code == 2 and "2 runs: give --out DIR" in err


def test_memory_fields_are_plotted_where_logged(pretrain_run, tmp_path):
    """No loop logs memory per step yet; a ``*_gib`` field, where a run has one, gets its own plot in GiB."""
    from megadigpt.train.report import output_files, report

    run = shutil.copytree(pretrain_run, tmp_path / "mem")
    lines = []
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(ln)
        if "event" not in r:
            r["peak_memory_gib"] = 0.5 + r["step"] / 100
        lines.append(json.dumps(r) + "\n")
    (run / "metrics.jsonl").write_text("".join(lines))
    assert "peak_memory_gib.png" in output_files([run])
    res = report(run, tmp_path / "out")
    assert "peak_memory_gib.png" in res["plots"]
    plot = json.loads((tmp_path / "out" / "report.json").read_text())["plots"]["peak_memory_gib.png"]
    assert plot["title"] == "peak memory (GiB)" and plot["series"]["mem"]["value"][-1] == pytest.approx(0.56)
    assert "peak_memory_gib (GiB), last / max" in (tmp_path / "out" / "summary.md").read_text()

"""Look, not read: the metric sinks (metrics.jsonl, W&B in its real offline mode, the log lines a SLURM job
shows) and ``megadigpt report``'s plots and summary."""

import json
import re

import pytest

from megadigpt.config import ConfigError
from megadigpt.train.metrics import MetricsSink, format_duration


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
    assert all(p.name.endswith(run_id) for p in (run / "wandb").glob("offline-run-*"))


def test_report_writes_plots_and_summary(tmp_path):
    run = tmp_path / "run"
    _log_run(run, steps=6)
    (run / "results.json").write_text(json.dumps({"linear": [{"layer": 1, "top1": 20.0}, {"layer": 2, "top1": 35.5},
                                                             {"layer": 3, "top1": 30.0}]}))
    from megadigpt.train.report import report

    res = report(run)
    assert res["plots"] == ["loss.png", "lr.png", "throughput.png", "knn.png", "probe.png"]
    for name in res["plots"]:
        assert (run / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (run / "report" / "summary.md").read_text()
    assert "| gen_loss | 0.3333 | 0.3333 |" in summary  # last = best = 2/6
    assert "| knn_top1 | 60 | 60 |" in summary
    assert "Best linear probe: block 2, top-1 35.50%" in summary
    assert "last 6 of 6" in summary
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        report(tmp_path / "nothing")

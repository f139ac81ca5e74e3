"""Launch and resume without surprises (issue 18): a schedule change on resume is refused unless allowed (and then
recorded), a finished run says so at once, --version, --help with defaults, W&B offline files from a real run,
``megadigpt report`` on a real run directory."""

import json
import shutil
import time

import pytest

from .conftest import TINY, run_cli

BASE = TINY + ["train.global_batch=8", "train.micro_batch=8", "train.zero_stage=0", "train.ckpt_every=2"]


def _events(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' in ln]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step run; each test works on its own copy."""
    run = tmp_path_factory.mktemp("boundaries") / "run"
    run_cli(["pretrain", "--data", "demo", "--run-dir", str(run)] + BASE + ["train.max_steps=4"])
    return run


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_schedule_change_on_resume_is_refused_then_allowed_and_recorded(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    common = ["pretrain", "--data", "demo", "--run-dir", str(run)] + BASE
    p = run_cli(common + ["train.max_steps=6"], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("megadigpt: error:")]
    assert len(err) == 1 and "total_steps 4 -> 6" in err[0] and "--allow-schedule-change" in err[0], p.stderr
    p = run_cli(common + ["train.max_steps=4", "optim.lr=2e-3"], check=False)
    assert p.returncode == 2 and "peak_lr 0.001 -> 0.002" in p.stderr, p.stderr[-2000:]
    run_cli(common + ["train.max_steps=6", "--allow-schedule-change"])
    ev = _events(run)
    change = [e for e in ev if e["event"] == "schedule_change"]
    assert len(change) == 1 and change[0]["changes"] == ["total_steps 4 -> 6"] and change[0]["step"] == 4
    assert ev[-1]["event"] == "done" and ev[-1]["step"] == 6


def test_a_finished_run_says_so_at_once(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    common = ["pretrain", "--data", "demo", "--run-dir", str(run)] + BASE + ["train.max_steps=4"]
    t0 = time.monotonic()
    p = run_cli(common)
    took = time.monotonic() - t0
    assert p.returncode == 0
    assert "already finished: step 4 of 4" in p.stdout + p.stderr, (p.stdout, p.stderr)
    assert took < 8, took  # no engine, no teacher: only the interpreter's and the imports' start-up


def test_version_and_help_defaults():
    p = run_cli(["--version"])
    from megadigpt import __version__

    assert p.stdout.strip() == f"megadigpt {__version__}"
    p = run_cli(["pretrain", "--help"])
    assert " ".join(p.stdout.split()).count("(default: demo)") == 1, p.stdout
    p = run_cli(["plan", "--help"])
    assert "(default: 8)" in p.stdout, p.stdout


def test_wandb_offline_and_report_on_a_real_run(tmp_path):
    run = tmp_path / "run"
    run_cli(["pretrain", "--data", "demo", "--run-dir", str(run)] + BASE +
            ["train.max_steps=3", "train.wandb=true", "train.wandb_mode=offline"], WANDB_SILENT="true")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert offline[0].name.endswith((run / "wandb_id.txt").read_text().strip())
    p = run_cli(["report", str(run)])
    for name in ("gen_loss.png", "lr.png", "images_per_s.png"):
        assert (run / "report" / name).read_bytes()[:4] == b"\x89PNG"
    summary = (run / "report" / "summary.md").read_text()
    assert "gen_loss, last / min" in summary and "| 3 of 3 |" in summary
    assert str(run / "report") in p.stdout

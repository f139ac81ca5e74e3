"""Hostile run directories and configs (issue 28): links planted where a run writes, a torn log, YAML bombs,
control characters and over-long names, ``pipe:`` commands said aloud.

Real runs: each planted-link case is a tiny single-rank pretraining on the demo images (a process each: a refusal
under a process group leaves with ``os._exit``), asserting exit 2, one line naming the planted name, and the file
the link points at unchanged, byte for byte.
"""

import json
import os
import time
from pathlib import Path

import pytest

from .conftest import TINY, run_cli

RUN = TINY + ["train.max_steps=1", "train.global_batch=4", "train.micro_batch=4", "train.zero_stage=0"]

# (name planted in the run directory, kind of target) -> every one must be refused with a line naming it
PLANTED = [(".lock", "file"), ("config.yaml", "file"), ("metrics.jsonl", "file"), ("bad_samples.jsonl", "file"),
           ("checkpoints", "dir"), ("metrics.jsonl", "fifo")]

def _tree_digest(root: Path) -> dict:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_planted_links_are_refused_and_never_written_through(tmp_path):
    outside = tmp_path / "home"
    outside.mkdir()
    (outside / "notes.txt").write_text("my notes\n")
    (outside / "folder").mkdir()
    (outside / "folder" / "keep.txt").write_text("keep\n")
    before = _tree_digest(outside)
    argvs, runs = [], []
    for i, (name, kind) in enumerate(PLANTED):
        run = tmp_path / f"run{i}"
        run.mkdir()
        if kind == "fifo":
            os.mkfifo(run / name)
        else:
            os.symlink(outside / ("notes.txt" if kind == "file" else "folder"), run / name)
        runs.append(run)
        argvs.append(["pretrain", "--run-dir", str(run), *RUN])
    for (name, kind), run, argv in zip(PLANTED, runs, argvs):
        res = run_cli(argv, check=False, timeout=300)
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("megadigpt: error:")]
        assert res.returncode == 2, (name, res.stderr[-2000:])
        assert len(lines) == 1 and str(run / name) in lines[0], (name, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, res.stderr[-2000:]
        assert not (run / "checkpoints").is_dir() or (run / "checkpoints").is_symlink(), name  # nothing trained
    assert _tree_digest(outside) == before  # not a byte written outside the run
    assert sorted(p.name for p in (outside / "folder").iterdir()) == ["keep.txt"]


def test_safe_fs_primitives(tmp_path):
    """The primitives themselves: O_NOFOLLOW opens, atomic replacement, bounded reads, a torn log ended."""
    from megadigpt.config import ConfigError
    from megadigpt.safe_fs import open_append, read_regular, write_atomic

    target = tmp_path / "notes.txt"
    target.write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / "x.json")
    for call in (lambda: write_atomic(run / "x.json", "new", root=run), lambda: open_append(run / "x.json"),
                 lambda: read_regular(run / "x.json")):
        with pytest.raises(ConfigError, match="symbolic link"):
            call()
    write_atomic(run / "x.json", "replaced", root=run, replace_links=True)  # a temporary's name: the link goes
    assert target.read_text() == "keep" and not (run / "x.json").is_symlink()
    assert (run / "x.json").read_text() == "replaced"
    (run / "big").write_bytes(b"x" * 2048)
    with pytest.raises(ConfigError, match="2048 bytes"):
        read_regular(run / "big", limit=1024)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_regular("/dev/zero")
    log = run / "m.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "gen')  # torn by kill -9
    with open_append(log) as f:
        f.write('{"step": 3}\n')
    assert log.read_text().splitlines()[-1] == '{"step": 3}'
    assert list(run.glob(".*tmp*")) == []  # no temporary left behind


def test_resumed_log_starts_on_a_fresh_line(tmp_path):
    """kill -9 mid-write leaves a torn last line in metrics.jsonl; the resumed run's first record is whole."""
    from megadigpt.train.metrics import read_metrics

    run = tmp_path / "run"
    args = ["pretrain", "--run-dir", str(run), *TINY, "train.max_steps=3", "train.global_batch=4",
            "train.micro_batch=4", "train.zero_stage=0"]
    p = run_cli(args, check=False, MEGADIGPT_FAULTS="term=2")  # preempted: step 2 checkpointed, exit 75
    assert p.returncode == 75, p.stderr[-2000:]
    log = run / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 3, "gen_loss": 1.')  # a record torn by kill -9, no newline
    run_cli(args)
    lines = log.read_text().splitlines()
    torn = next(i for i, ln in enumerate(lines) if ln.startswith('{"step": 3, "gen_loss": 1.') and not ln.endswith("}"))
    assert json.loads(lines[torn + 1])  # the next record starts on its own line
    assert 3 in read_metrics(log)  # the resumed step 3 was recorded and is read back


@pytest.mark.parametrize("case", ["alias-bomb", "deep", "fifo", "device", "nul-path", "long-name", "newline-run-dir",
                                  "escape-arg", "huge-value"])
def test_hostile_configs_and_paths_are_one_line(tmp_path, case):
    """Alias expansion and nesting are bounded before validation; values are quoted shortened; NUL, control
    characters and over-long names are one line; a FIFO or a device given as a config cannot block or stream."""
    import resource

    from megadigpt.cli import main

    cfg = tmp_path / "c.yaml"
    argv = ["show-config", "--config", str(cfg)]
    if case == "alias-bomb":  # 1 kB that stands for 10**9 values
        body = 'x: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]\n'
        prev = "a"
        for i in range(8):
            body += f"x{i}: &b{i} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
            prev = f"b{i}"
        cfg.write_text(body + f"model:\n  taps: *{prev}\n")
        assert cfg.stat().st_size < 2048
        match = "alias"
    elif case == "deep":
        cfg.write_text("model:\n  taps: " + "[" * 50000 + "]" * 50000 + "\n")
        match = "nested"
    elif case == "fifo":
        os.mkfifo(cfg)
        match = "not a regular file"
    elif case == "device":
        argv = ["show-config", "--config", "/dev/zero"]
        match = "not a regular file"
    elif case == "nul-path":
        argv = ["show-config", "--config", "cifar10_pretrain", "train.init_from=a\x00b"]
        match = "NUL"
    elif case == "long-name":
        argv = ["show-config", "--config", "cifar10_pretrain", "train.run_dir=runs/" + "x" * 300]
        match = "300 bytes"
    elif case == "newline-run-dir":
        argv = ["pretrain", "--run-dir", str(tmp_path / "a\nb"), *RUN]
        match = "control character"
    elif case == "escape-arg":
        argv = ["convert", str(tmp_path / "run\x1b[2J"), "--to", "fp32", "--out", str(tmp_path / "o.pt")]
        match = "control character"
    else:  # a 100 kB value is quoted shortened in the refusal
        argv = ["show-config", "--config", "cifar10_pretrain", "model.arch=" + "v" * 100_000]
        match = "chars"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 2, err.getvalue()
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megadigpt: error:") and match in lines[0], lines
    assert len(lines[0]) < 600  # values quoted shortened
    assert time.monotonic() - t0 < 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 512 * 1024  # KiB: well under 0.5 GiB
    assert not (tmp_path / "a\nb").exists()


def test_pipe_commands_are_said_and_recorded(tmp_path):
    """A pipe: source runs a shell command: it is printed once at start and recorded in the start event."""
    shards = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10").glob("train-*.tar"))
    if not shards:
        pytest.skip("../shared/data/cifar10 is absent")
    run = tmp_path / "run"
    p = run_cli(["pretrain", "--data", f"pipe:cat {shards[0]}", "--run-dir", str(run), *RUN,
                 "data.mode=indexed", f"data.cache_dir={tmp_path / 'cache'}"])
    said = [ln for ln in p.stderr.splitlines() if ln.startswith("megadigpt: runs: ")]
    assert said == [f"megadigpt: runs: cat {shards[0]}"], p.stderr[-2000:]
    start = next(json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
                 if '"event": "start"' in ln)
    assert start["pipe_commands"] == [f"pipe:cat {shards[0]}"]


def test_merge_spec_pipe_commands_are_said(tmp_path, capsys, monkeypatch):
    """A merge spec from a colleague that lists a pipe: source: the command is said before it runs."""
    monkeypatch.setenv("MEGADIGPT_CACHE", str(tmp_path / "cache"))
    import io
    import tarfile

    import numpy as np

    from megadigpt.data import tools

    from .conftest import make_jpeg

    rng = np.random.default_rng(0)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(3):
            data = make_jpeg(rng)
            info = tarfile.TarInfo(f"{i:04d}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    spec = tmp_path / "merge.yaml"
    spec.write_text(f"sources:\n  - name: a\n    source: 'pipe:cat {shard}'\n")
    tools.merge(spec, tmp_path / "merged", progress=False)
    err = capsys.readouterr().err
    assert f"megadigpt: runs: cat {shard}" in err.splitlines()

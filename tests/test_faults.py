"""Faults a long run meets: a full disk during a save (a real tmpfs where root may mount one, else a fault hook),
a damaged newest checkpoint, a second run on the same run directory, a launcher killed with SIGKILL, SIGTERM
under torchrun, two launcher-less runs on one machine. Real processes, real DeepSpeed on gloo, real files."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megadigpt.checkpoint import ds_checkpoint as ck

from .conftest import REPO, TINY, losses, megadigpt_cmd, run_cli, subprocess_env

STEPS = 4


def _args(cifar_dir, run_dir, *extra, steps=STEPS, micro=4):
    return ["pretrain", "--data", str(cifar_dir / "train-000000.tar"), "--run-dir", str(run_dir), *TINY,
            "train.global_batch=8", f"train.micro_batch={micro}", f"train.max_steps={steps}", "train.zero_stage=1",
            "train.ckpt_every=2", *extra]


def _events(run_dir, name):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if f'"event": "{name}"' in l]


def _same_losses(run_dir, base, steps):
    got = losses(run_dir)
    for s in steps:
        assert got[s] == pytest.approx(base[s], abs=1e-7), s


@pytest.fixture(scope="module")
def baseline(cifar_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults") / "base"
    run_cli(_args(cifar_dir, run_dir), nproc=2)
    return run_dir, losses(run_dir)


def _tag_bytes(run_dir, tag):
    return sum(p.stat().st_size for p in (ck.checkpoint_dir(run_dir) / tag).rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs (unmounted afterwards), or None where mounting is refused."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_marker_lists_every_file_with_size_and_checksum(baseline):
    run_dir, _ = baseline
    for tag in ck.complete_tags(run_dir):
        files = ck.read_marker(run_dir, tag)["files"]
        on_disk = {str(p.relative_to(ck.checkpoint_dir(run_dir) / tag)) for p in
                   (ck.checkpoint_dir(run_dir) / tag).rglob("*") if p.is_file() and p.name != ck.MARKER}
        assert set(files) == on_disk and len(on_disk) >= 3  # model states + one optimizer shard per rank
        for name, rec in files.items():
            assert (rec["size"], rec["crc32"]) == ck._digest(ck.checkpoint_dir(run_dir) / tag / name)
        assert ck.verify(run_dir, tag, checksums=True) is None


def test_damaged_newest_checkpoint_falls_back_to_the_last_good_one(baseline, cifar_dir, tmp_path):
    base_dir, base = baseline
    run_dir = tmp_path / "dmg"
    shutil.copytree(base_dir, run_dir)
    shard = ck.checkpoint_dir(run_dir) / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    assert ck.latest_tag(run_dir) == "step_00000004"  # sizes are fine
    assert "checksum" in ck.verify(run_dir, "step_00000004", checksums=True)
    truncated = tmp_path / "trunc"
    shutil.copytree(base_dir, truncated)
    (ck.checkpoint_dir(truncated) / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert ck.latest_tag(truncated) == "step_00000002"  # a size mismatch is found by the cheap check alone

    p = run_cli(_args(cifar_dir, run_dir), nproc=2)
    assert "checkpoint step_00000004 is damaged" in p.stderr and "resuming from step_00000002" in p.stderr
    assert _events(run_dir, "resume")[-1]["step"] == 2
    assert _events(run_dir, "checkpoint_skipped")[0]["tag"] == "step_00000004"
    _same_losses(run_dir, base, range(1, STEPS + 1))
    assert ck.verify(run_dir, "step_00000004", checksums=True) is None  # saved again, whole


def test_disk_full_is_one_line_and_the_rerun_resumes_exactly(baseline, cifar_dir, tmp_path, small_disk):
    base_dir, base = baseline
    if small_disk is not None:  # room for the first checkpoint and the logs, not for a second checkpoint
        size = _tag_bytes(base_dir, "step_00000002") * 3 // 2 + 256 * 1024
        subprocess.run(["mount", "-o", f"remount,size={size}", str(small_disk)], check=True)
        run_dir, env = small_disk / "run", {}
    else:
        run_dir, env = tmp_path / "run", {"MEGADIGPT_FAULTS": "enospc_in_save=4"}
    p = run_cli(_args(cifar_dir, run_dir), nproc=2, check=False, **env)
    assert p.returncode != 0
    want = (f"megadigpt: error: no space left on device while saving checkpoint step_00000004 to "
            f"{ck.checkpoint_dir(run_dir)} (the previous checkpoint step_00000002 is intact)")
    lines = [l for l in p.stderr.splitlines() if l.startswith("megadigpt:")]
    assert lines == [want], p.stderr[-3000:]
    # no worker traceback (torchrun's own summary is a traceback of its ChildFailedError); both ranks exited 2
    assert not re.search(r"\[rank\d\]: Traceback", p.stderr) and p.stderr.count("Traceback") == 1, p.stderr[-3000:]
    assert p.stderr.count("exitcode  : 2") == 2, p.stderr[-3000:]
    assert ck.latest_tag(run_dir) == "step_00000002"
    assert not (ck.checkpoint_dir(run_dir) / "step_00000004").exists()  # never marked: removed
    if small_disk is not None:
        subprocess.run(["mount", "-o", "remount,size=256M", str(small_disk)], check=True)
        env = {}
    else:
        env = {"MEGADIGPT_FAULTS": ""}
    run_cli(_args(cifar_dir, run_dir), nproc=2, **env)
    assert _events(run_dir, "resume")[-1]["step"] == 2
    _same_losses(run_dir, base, range(1, STEPS + 1))


_HOLDER = """
import sys, time
from megadigpt.train.runtime import try_lock
assert try_lock(sys.argv[1]) is None
print("locked", flush=True)
time.sleep(600)
"""


def test_second_run_on_a_run_dir_stops_naming_the_holder(cifar_dir, tmp_path):
    from megadigpt.train import runtime

    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=str(REPO), env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        msg = runtime.try_lock(run_dir)
        assert msg and f"pid {holder.pid}" in msg and "in use by another run" in msg
        p = run_cli(_args(cifar_dir, run_dir), check=False)
        assert p.returncode == 2, p.stderr[-3000:]
        errors = [l for l in p.stderr.splitlines() if l.startswith("megadigpt: error:")]
        assert len(errors) == 1 and f"pid {holder.pid}" in errors[0] and "Traceback" not in p.stderr
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock
        holder.wait()
    assert runtime.try_lock(run_dir) is None  # a killed holder leaves no stale lock
    runtime.release(run_dir)


def _start_torchrun(cifar_dir, run_dir, **env):
    proc = subprocess.Popen(megadigpt_cmd(2) + _args(cifar_dir, run_dir, "train.ckpt_every=100", steps=6),
                            env=subprocess_env(MEGADIGPT_FAULTS="sleep=2", **env), cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and '"step": 1,' in metrics.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "megadigpt" in " ".join(c.cmdline())]
    assert len(workers) == 2
    return proc, workers


def test_workers_exit_when_torchrun_is_killed(cifar_dir, tmp_path):
    run_dir = tmp_path / "orphans"
    proc, workers = _start_torchrun(cifar_dir, run_dir)
    proc.kill()  # SIGKILL to the agent only (its workers live in sessions of their own)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=60)
    for w in alive:
        w.kill()
    assert not alive, "workers outlived their launcher"
    assert ck.latest_tag(run_dir) == "step_00000002"  # they checkpointed the step in flight first
    assert [e["signal"] for e in _events(run_dir, "signal")] == ["SIGHUP"]


def test_sigterm_under_torchrun(cifar_dir, tmp_path):
    """torchrun forwards SIGTERM to its workers, which checkpoint and exit 75; torchrun itself then re-raises the
    signal as its SignalException and exits 1 (torch's behaviour: documented in docs/checkpoints.md)."""
    run_dir = tmp_path / "term"
    proc, workers = _start_torchrun(cifar_dir, run_dir)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "megadigpt: checkpointed at step 2 on SIGTERM" in err, err[-3000:]
    assert ck.latest_tag(run_dir) == "step_00000002"
    ev = _events(run_dir, "signal")
    assert len(ev) == 1 and ev[0]["signal"] == "SIGTERM" and ev[0]["step"] == 2


def test_two_runs_without_a_launcher_at_once(cifar_dir, tmp_path):
    """No MASTER_PORT: each picks a free port (a fixed 29500 made the second die with EADDRINUSE). One of them is
    stopped with SIGTERM: exit code 75, one signal event."""
    envs = [subprocess_env(MEGADIGPT_FAULTS=f) for f in ("sleep=2", "")]  # the first lingers at step 2
    for env in envs:
        env.pop("MASTER_PORT")
    procs = [subprocess.Popen(megadigpt_cmd(1) + _args(cifar_dir, tmp_path / f"r{i}", micro=8, steps=3), env=env,
                              cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i, env in enumerate(envs)]
    metrics = tmp_path / "r0" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and '"step": 1,' in metrics.read_text()):
        assert procs[0].poll() is None, procs[0].stderr.read()[-3000:]
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [75, 0], "\n".join(e[-2000:] for e in errs)
    assert [e["signal"] for e in _events(tmp_path / "r0", "signal")] == ["SIGTERM"]
    assert ck.latest_tag(tmp_path / "r0") == "step_00000002" and ck.latest_tag(tmp_path / "r1") == "step_00000003"

"""Start-up machinery every training loop shares: the run-directory lock, the stop signals, and the watch on the
launcher.

- **Lock**: rank 0 holds ``fcntl.flock`` on ``<run_dir>/.lock`` for the run's lifetime; the file names the holder
  (host, pid, start time, command). A second run on the same directory stops on every rank with one line naming
  it. The kernel drops the lock when its holder dies, ``kill -9`` included, so a stale lock cannot exist (a file
  left behind is harmless). On a filesystem without locks (Lustre mounted without ``flock``) the run goes on,
  with a warning. A ``.lock`` that is a symbolic link or not a regular file (planted in a shared run directory)
  is one line naming it: the lock is opened with ``O_NOFOLLOW`` (:mod:`megadigpt.safe_fs`), never truncated
  through a link. The names a run writes (``RUN_FILES``, ``RUN_FOLDERS``) are checked under the lock: a link, a
  device or a pipe planted at any of them stops every rank with one line naming it.
- **Signals**: SIGTERM, SIGUSR1 (SLURM's warning) and, under a launcher, SIGHUP ask for checkpoint-and-exit; the
  loops reduce :attr:`SignalFlag.code` with MAX across ranks at the end of each step, and end the run with
  :class:`Checkpointed` (or :class:`TrainingDiverged` after repeated non-finite losses).
- **Launcher death**: under torchrun, the deepspeed launcher or mpirun, each rank watches the launcher that
  started it. torchrun starts every worker in its own session, so a ``kill -9`` of the agent reached no worker
  (they trained on, or hung). Linux's ``PR_SET_PDEATHSIG`` (SIGHUP when the parent goes, set before the
  rendezvous: ``megadigpt.distributed.env.follow_launcher``; its default action ends a rank still starting up)
  plus a poll of the parent (every second, against the parent pid seen at start-up: the signal fires on the death
  of the parent *thread*, and is lost if the parent died before it was set; the deepspeed launcher's runner, the
  grandparent, is polled too) set the same flag as SIGTERM: the ranks checkpoint at the end of the step and
  exit. A rank that has not exited
  ``MEGADIGPT_ORPHAN_GRACE`` seconds (default 300) after its launcher died (a peer gone, a collective that never
  returns) exits with code 1. Plain python and srun are left alone (a shell that exits is no reason to stop a
  ``nohup`` run; SLURM kills its own tasks).

Written here rather than taken from a library: it is a few system calls (flock, prctl, getppid) whose exact
semantics matter; psutil (a DeepSpeed dependency) tells the processes apart.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from ..safe_fs import open_fd

LOCK_NAME = ".lock"
# what a run writes in its directory (files, then folders); each must be a regular file / a real folder, never a
# link or a device, when the run starts (:func:`check_run_entries`); the writers open them without following links
RUN_FILES = ("config.yaml", "metrics.jsonl", "bad_samples.jsonl", "label_names.json", "wandb_id.txt")
RUN_FOLDERS = ("checkpoints", "tensorboard", "wandb", "eval", "best", "last", "best_ema", "last_ema")
_held = {}  # resolved run dir -> open lock file (this process holds it; a second pretrain() in it re-enters)


# ============================================================================ run-directory lock


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["start"]))
        return f"pid {h['pid']} on {h['host']}, started {started}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no record"


def try_lock(run_dir) -> Optional[str]:
    """Take the run directory's lock for this process; None when held, else a message naming the holder."""
    import fcntl

    run_dir = Path(run_dir).resolve()
    if str(run_dir) in _held:
        return None
    path = run_dir / LOCK_NAME
    fd = open_fd(path, os.O_RDWR | os.O_CREAT, root=run_dir, what="the run directory's lock")  # never through a link
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        finally:
            os.close(fd)
        return (f"{run_dir} is in use by another run ({_describe_holder(holder)}); wait for it to end or stop it, "
                f"or use another train.run_dir")
    except OSError as e:  # no locks on this filesystem
        os.close(fd)
        print(f"megadigpt: warning: cannot lock {path} ({e.strerror}): nothing stops a second run on this "
              f"directory", file=sys.stderr, flush=True)
        return None
    record = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(),
              "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[str(run_dir)] = fd
    return None


def release(run_dir):
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock


def check_run_entries(run_dir) -> Optional[str]:
    """None, or a message naming the first name the run writes that is a symbolic link, a device or a pipe (a
    file where a folder goes, or the reverse), planted in a shared or unpacked run directory."""
    import stat

    run_dir = Path(run_dir)
    for names, want in ((RUN_FILES, stat.S_ISREG), (RUN_FOLDERS, stat.S_ISDIR)):
        for name in names:
            try:
                st = os.lstat(run_dir / name)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                return (f"{run_dir / name} is a symbolic link (to {os.readlink(run_dir / name)}); megadigpt does not "
                        f"write or read run files through links it did not make: remove it, or use another "
                        f"train.run_dir")
            if not want(st.st_mode):
                return (f"{run_dir / name} is not a {'regular file' if want is stat.S_ISREG else 'folder'}; remove "
                        f"it, or use another train.run_dir")
    return None


def hold_run_dir(run_dir, rank0: bool):
    """Rank 0 takes the lock and checks that nothing the run writes is a planted link (:func:`check_run_entries`);
    every rank learns the verdict (one broadcast), so all stop with exit code 2 when another run holds it or a
    link is planted (rank 0 prints the line)."""
    import torch.distributed as dist

    problem = [_lock_and_check(run_dir) if rank0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise ConfigError(problem[0])


def _lock_and_check(run_dir) -> Optional[str]:
    """Rank 0's verdict as a message (never raised here: the other ranks wait for it in the broadcast)."""
    try:
        problem = try_lock(run_dir)
    except ConfigError as e:  # a planted .lock
        return str(e)
    if problem is None:
        problem = check_run_entries(run_dir)
        if problem:
            release(run_dir)
    return problem


# ============================================================================ signals and the launcher


def _launcher_processes():
    """The local processes whose death orphans this rank: the parent, and under the deepspeed launcher (whose
    launch.py is the parent) its runner too."""
    try:
        import psutil
    except ImportError:  # the parent alone, by getppid()
        return []
    out = []
    try:
        parent = psutil.Process(os.getppid())
        out.append(parent)
        if "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
            grand = parent.parent()
            if grand is not None and "deepspeed" in " ".join(grand.cmdline()):
                out.append(grand)
    except psutil.Error:
        pass
    return out


class SignalFlag:
    """SIGTERM and SIGUSR1 (SLURM's warning before the time limit or preemption) ask for checkpoint-and-exit, and
    so does the end of the launcher (SIGHUP, see the module docstring). ``code`` is 0 (none), 1 (SIGHUP: the
    launcher exited or hung up), 2 (SIGTERM) or 3 (SIGUSR1): reduce it with MAX across ranks (SIGUSR1 anywhere
    asks for a requeue), name it with ``name_of``."""

    NAMES = {1: "SIGHUP", 2: "SIGTERM", 3: "SIGUSR1"}
    CODES = {v: k for k, v in NAMES.items()}

    def __init__(self, watch_launcher: bool = True):
        from ..distributed.env import LAUNCHER_PID, discover, set_parent_death_signal

        self.code = 0
        self._old = {}
        self._stop = threading.Event()
        self._orphaned = False
        launched = discover().launcher in ("torch", "mpi") and sys.platform.startswith("linux")
        sigs = [signal.SIGTERM, signal.SIGUSR1]
        if launched and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup's choice stands
            sigs.append(signal.SIGHUP)
        for sig in sigs:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        self._pdeathsig = launched and discover().launcher == "torch"  # set in start_processes (follow_launcher)
        self._clear_pdeathsig = set_parent_death_signal
        if launched and watch_launcher:
            watched = _launcher_processes() if os.getppid() == LAUNCHER_PID else []
            threading.Thread(target=self._watch, args=(LAUNCHER_PID, watched), daemon=True,
                             name="megadigpt-launcher-watch").start()

    @property
    def raised(self) -> bool:
        return self.code > 0

    @classmethod
    def name_of(cls, code) -> str:
        return cls.NAMES.get(int(code), "none")

    def _handle(self, signum, frame):
        self.code = max(self.code, self.CODES.get(signal.Signals(signum).name, 2))

    def _watch(self, ppid, watched):
        while not self._stop.wait(1.0):
            gone = ppid if os.getppid() != ppid else next((p.pid for p in watched if not p.is_running()), None)
            if gone is not None:
                self._orphaned = True
                self.code = max(self.code, 1)
                grace = float(os.environ.get("MEGADIGPT_ORPHAN_GRACE", 300))
                print(f"megadigpt: the launcher (pid {gone}) exited: checkpointing, then exiting (at most "
                      f"{grace:g} s)", file=sys.stderr, flush=True)
                time.sleep(grace)
                print(f"megadigpt: still running {grace:g} s after the launcher exited: exiting without a "
                      f"checkpoint", file=sys.stderr, flush=True)
                os._exit(1)

    def restore(self):
        if not self._orphaned:  # an orphan keeps its deadline: the shutdown after the loop can hang too
            self._stop.set()
        if self._pdeathsig:
            self._clear_pdeathsig(0)
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ============================================================================ how a loop stops early


class TrainingDiverged(RuntimeError):
    """Repeated non-finite losses: the run directory was rolled back to the last good checkpoint."""

    exit_code = 3


class Checkpointed(RuntimeError):
    """Stopped by SIGTERM/SIGUSR1 after a checkpoint; rerunning (or requeueing) the same command resumes.
    ``signal`` is the one the ranks agreed on (SIGUSR1 if any rank got it: SLURM's warning, which asks for a
    requeue; SIGTERM alone means stop)."""

    exit_code = 75  # EX_TEMPFAIL

    def __init__(self, step: int, signal: str):
        super().__init__(f"checkpointed at step {step} on {signal}; run the same command to resume")
        self.step, self.signal = step, signal


def requeue_after_signal(signal_name: str) -> Optional[str]:
    """Rank 0, after the checkpoint that SLURM's warning signal (SIGUSR1) asked for: requeue this batch job, which
    then resumes from its run directory. Returns what happened (None: nothing to do). SIGTERM never requeues, and
    ``MEGADIGPT_REQUEUE=0`` (``--no-requeue``) turns it off."""
    job = os.environ.get("SLURM_JOB_ID")
    if signal_name != "SIGUSR1" or not job or os.environ.get("MEGADIGPT_REQUEUE", "1") == "0":
        return None
    try:
        p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not requeue SLURM job {job} ({e}); submit the same script again to resume"
    if p.returncode != 0:
        return (f"could not requeue SLURM job {job} (scontrol: {p.stderr.strip() or p.returncode}); submit the same "
                f"script again to resume")
    return f"requeued SLURM job {job}: it resumes from its last checkpoint when it starts again"

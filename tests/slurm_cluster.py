"""A real SLURM cluster on this machine, for the launcher tests: munged, slurmctld and two slurmd daemons that
pretend to be the nodes ``node1`` and ``node2`` (each in its own UTS namespace, so its tasks see that hostname).
Everything it starts lives under one folder and is stopped by PID; nothing system-wide is touched (its own munge
socket, its own ports, no /etc/hosts edits). Needs root and Debian's slurm-wlm + munge (``apt-get install
slurm-wlm munge slurm-client``).

    python -m tests.slurm_cluster /tmp/cluster      # start one by hand; prints the SLURM_CONF to export
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REQUIRED = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged", "unshare")


def missing_tools() -> list:
    return [t for t in REQUIRED if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def _free_ports(n: int) -> list:
    """n consecutive free TCP ports (slurm.conf gives the slurmd ports as a range)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65000:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + n))
    raise RuntimeError("no free port range")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """``with LocalSlurm(folder) as c: subprocess.run(["sbatch", ...], env=c.env(...))``"""

    def __init__(self, root, nodes: int = 2, cpus_per_node: int = 4):
        self.root = Path(root).resolve()
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        self.procs = []
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.txt"

    # -- setup ---------------------------------------------------------------------------------------------------
    def _write_conf(self):
        r = self.root
        ctl_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        lines = [
            "ClusterName=megadigpt-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.socket,cred_expire=10",  # a requeued job waits this long (default 120)
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
            "MinJobAge=4",  # else `sbatch --wait` polls for up to 32 s
            # no DependencyParameters=kill_invalid_depend: `megadigpt submit` must cancel a failed stage's dependents
            # by itself (sbatch --kill-on-invalid-dep=yes), on clusters without that setting too
            "JobRequeue=1", "ReturnToService=2", "MailProg=/bin/true",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={self.jobcomp}",  # every job's final state, for tests
            "SlurmdParameters=config_overrides",  # two "nodes" on one machine
            "SchedulerParameters=sched_interval=1,bf_interval=1",  # requeued / dependent jobs start promptly
            f"NodeName=node[1-{len(self.nodes)}] NodeHostname={host} NodeAddr=127.0.0.1 "
            f"Port=[{node_ports[0]}-{node_ports[-1]}] CPUs={self.cpus} RealMemory=4000 State=UNKNOWN",
            f"PartitionName=debug Nodes=node[1-{len(self.nodes)}] Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def env(self, **extra) -> dict:
        e = dict(os.environ)
        e["SLURM_CONF"] = str(self.conf)
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def start(self, timeout: float = 60):
        if self.root.exists():
            shutil.rmtree(self.root)
        for d in ("state", "munge", *[f"spool/{n}" for n in self.nodes]):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root / "munge", "munge", "munge")
        self.root.chmod(0o755)
        self._write_conf()
        m = self.root / "munge"
        self._spawn(["runuser", "-u", "munge", "--", _sbin("munged"), "--foreground", f"--socket={m}/munge.socket",
                     f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
                    "munged")
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged did not create its socket")
        self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for n in self.nodes:
            self._spawn(["unshare", "--uts", "sh", "-c",
                         f'hostname {n} && exec {_sbin("slurmd")} -D -N {n} -f "{self.conf}"'], f"slurmd-{n}")
        self._wait(self._all_idle, timeout, "nodes did not become idle")
        return self

    def _spawn(self, cmd, name):
        log = open(self.root / f"{name}.stdout", "wb")
        self.procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                                  start_new_session=True)))

    def _wait(self, pred, timeout, what):
        end = time.time() + timeout
        while time.time() < end:
            for name, p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}): {self.logs()}")
            if pred():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {timeout} s: {self.logs()}")

    def _all_idle(self) -> bool:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env())
        states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
        return p.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -- teardown ------------------------------------------------------------------------------------------------
    def stop(self):
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True, env=self.env())
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # slurmstepd processes of killed jobs outlive slurmd: they carry the spool path on their command line
        subprocess.run(["pkill", "-KILL", "-f", f"slurmstepd.*{self.root}"], capture_output=True)
        self.procs = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- queries -------------------------------------------------------------------------------------------------
    def job_states(self) -> dict:
        """{job_id: [final states in order]} from the job-completion log (a requeued job appears more than once)."""
        out = {}
        if not self.jobcomp.exists():
            return out
        for line in self.jobcomp.read_text().splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "JobId" in f:
                out.setdefault(int(f["JobId"]), []).append(f.get("JobState"))
        return out

    def wait_jobs_gone(self, job_ids, timeout: float):
        """Wait until none of the jobs is pending or running any more."""
        ids = ",".join(str(j) for j in job_ids)
        end = time.time() + timeout
        while time.time() < end:
            p = subprocess.run(["squeue", "-h", "-j", ids, "-o", "%i %T"], capture_output=True, text=True,
                               env=self.env())
            if p.returncode == 0 and not p.stdout.strip():
                return
            time.sleep(1)
        raise TimeoutError(f"jobs {ids} still queued after {timeout} s:\n{p.stdout}\n{self.logs()}")


if __name__ == "__main__":
    c = LocalSlurm(sys.argv[1] if len(sys.argv) > 1 else "/tmp/megadigpt-slurm").start()
    print(f"export SLURM_CONF={c.conf}   # Ctrl-C (or SIGTERM) stops the cluster", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        # a second Ctrl-C must not abandon the daemons halfway through stopping them
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        c.stop()

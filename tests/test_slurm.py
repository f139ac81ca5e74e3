"""SLURM, for real: a cluster of two "nodes" on this machine (tests/slurm_cluster.py), and `megadigpt submit`
queueing the same sbatch scripts users get. Two nodes x two tasks pretrain with ZeRO-3; a warning signal mid-run
checkpoints, requeues and resumes to the uninterrupted losses; a three-stage chain runs in order, each job running
its set-up lines and then `srun python -m megadigpt ...` from the code snapshot; a failing stage cancels the stages
after it. Also the parts that need no cluster: dry runs, the script's text, set-up lines, early errors, the shipped
scripts and chains."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from megadigpt.config import ConfigError
from megadigpt.launch import slurm

from .conftest import REPO, TINY, losses, require_shared, subprocess_env
from .slurm_cluster import LocalSlurm, missing_tools

PRETRAIN = TINY + ["train.global_batch=8", "train.micro_batch=2", "train.max_steps=6", "train.zero_stage=3",
                   "data.loader=torch"]
FINETUNE = ["--config", "cifar10_finetune", "data.num_workers=0", "train.progress=off", "train.log_every=1",
            "train.tensorboard=false", "train.global_batch=16", "train.micro_batch=8", "data.loader=torch",
            "train.epochs=1"]
CPU = {"gpus_per_node": 0, "time": "00:10:00", "signal_seconds": 60}
BIN = Path(sys.executable).parent  # the test's python: the jobs' set-up activates it as a user's would
ACTIVATE = f"source {BIN / 'activate'}" if (BIN / "activate").is_file() else f"export PATH={BIN}:$PATH"
# a chain's set-up lines (then each stage's): run in the batch shell before the launch line
SETUP = [ACTIVATE, 'echo "setup ran: chain, python $(command -v python)"']


def _submit(args, env, check=True):
    p = subprocess.run([sys.executable, "-m", "megadigpt", "submit", *map(str, args)], capture_output=True,
                       text=True, timeout=300, env=env, cwd=str(REPO))
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _jobs(run_dir) -> list:
    return [json.loads(x) for x in (Path(run_dir) / "slurm" / "jobs.jsonl").read_text().splitlines()]


def _events(run_dir) -> list:
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "event" in r]


def _write_chain(path, root, stages, slurm_defaults=None, setup=None):
    spec = {"run_root": str(root), "slurm": slurm_defaults or CPU, "stages": stages}
    if setup is not None:
        spec["setup"] = setup
    path.write_text(yaml.safe_dump(spec))
    return path


def _chain3(cifar_small, root, path, pretrain_env=None):
    data = cifar_small / "train.jsonl"
    ft = ["--train", str(data), "--val", str(cifar_small / "val.jsonl")] + FINETUNE
    return _write_chain(path, root, [
        {"name": "pretrain", "command": "pretrain", "args": ["--data", str(data)] + PRETRAIN,
         "slurm": {"nodes": 2, "ntasks_per_node": 2, "env": pretrain_env or {}}},
        {"name": "in21k", "command": "finetune", "init_from": "{pretrain}", "args": ft,
         "slurm": {"nodes": 1, "ntasks_per_node": 2}},
        {"name": "in1k", "command": "finetune", "init_from": "{in21k}/last", "args": ft,
         "slurm": {"nodes": 1, "ntasks_per_node": 2}, "setup": ['echo "setup ran: stage in1k"']},
    ], setup=SETUP)


# ============================================================================ the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = None
    if missing_tools():
        why = f"SLURM not installed ({', '.join(missing_tools())}; apt-get install slurm-wlm munge slurm-client)"
    elif os.geteuid() != 0:
        why = "the localhost SLURM cluster needs root (it runs slurmd and munged)"
    if why:
        if require_shared():
            pytest.fail(f"{why}: CI must run the SLURM tests")
        pytest.skip(why)
    # not under pytest's tmp folder: that is private to root, and munged runs as the munge user
    c = LocalSlurm(tempfile.mkdtemp(prefix="megadigpt-slurm-"))
    c.start()
    yield c
    c.stop()
    left = subprocess.run(["pgrep", "-f", str(c.root)], capture_output=True, text=True).stdout.split()
    shutil.rmtree(c.root, ignore_errors=True)
    assert not left, f"daemons left running: {left}"


@pytest.fixture(scope="module")
def job_env(cluster):
    """What the jobs inherit from the submitting shell (sbatch exports it): CPU settings, the cluster's config."""
    env = subprocess_env(SLURM_CONF=cluster.conf)
    env.pop("MASTER_PORT")  # each job derives its own from its id
    return env


@pytest.fixture(scope="module")
def chain_run(cluster, job_env, cifar_small, tmp_path_factory):
    """The three-stage chain (2-node pretraining -> fine-tune -> fine-tune), submitted and run to the end."""
    base = tmp_path_factory.mktemp("chain")
    root = base / "runs"
    path = _chain3(cifar_small, root, base / "chain.yaml")
    _submit([path], job_env)
    ids = [_jobs(root / s)[-1]["job_id"] for s in ("pretrain", "in21k", "in1k")]
    cluster.wait_jobs_gone(ids, timeout=900)
    return root, [int(i) for i in ids]


def _log(run_dir, job_id) -> str:
    return (Path(run_dir) / "slurm" / f"{job_id}.out").read_text()


def test_chain_runs_in_order_on_two_nodes(cluster, chain_run):
    root, ids = chain_run
    states = cluster.job_states()
    assert [states.get(i, [None])[-1] for i in ids] == ["COMPLETED"] * 3, (states, cluster.logs())
    # the pretraining ran as 4 ranks on both nodes, from the code snapshot taken at submission
    start = _events(root / "pretrain")[0]
    assert start["event"] == "start" and start["world_size"] == 4 and start["hosts"] == ["node1", "node2"]
    code = Path(_jobs(root / "pretrain")[-1]["code"])
    assert start["code"] == str(code / "megadigpt") and code.parent == root / "code"
    assert json.loads((code / "SNAPSHOT.json").read_text())["sha256"].startswith(code.name)
    assert sorted(losses(root / "pretrain")) == list(range(1, 7))
    # each stage started after the one before had finished, and took its weights
    done = {}
    for s in ("pretrain", "in21k", "in1k"):
        ev = _events(root / s)
        done[s] = (ev[0]["time"], ev[-1]["time"], ev[0], ev[-1]["event"])
        assert done[s][3] == "done", ev
    assert done["pretrain"][1] < done["in21k"][0] and done["in21k"][1] < done["in1k"][0]
    assert done["in21k"][2]["init_from"] == str(root / "pretrain")
    assert done["in1k"][2]["init_from"] == str(root / "in21k" / "last")
    assert done["in21k"][2]["hosts"] == ["node1"] and done["in21k"][2]["world_size"] == 2
    # dependencies as queued
    assert _jobs(root / "in21k")[-1]["after"] == [str(ids[0])] and _jobs(root / "in1k")[-1]["after"] == [str(ids[1])]
    log = _log(root / "in1k", ids[2])
    assert "exit 0" in log
    # the set-up lines ran in the batch shell, in order, before the launch line; the python they activated ran it
    assert log.index("setup ran: chain, python ") < log.index("setup ran: stage in1k") < log.index("megadigpt: job")
    assert f"setup ran: chain, python {BIN / 'python'}\n" in log
    script = (root / "in1k" / "slurm" / "job.sbatch").read_text()
    assert f"\nsrun --kill-on-bad-exit=1 python -m megadigpt finetune --init-from {root / 'in21k' / 'last'} " in script
    assert (root / "chain.yaml").is_file()


def test_warning_signal_checkpoints_requeues_and_resumes(cluster, job_env, chain_run, cifar_small, tmp_path):
    """SIGUSR1 to the job's tasks (what --signal=USR1@S delivers before the time limit) mid-run: all ranks
    checkpoint, rank 0 requeues the job, the requeued job resumes and ends with the uninterrupted losses."""
    run = tmp_path / "pre"
    env = dict(job_env, MEGADIGPT_FAULTS="sleep=2,sleep=3,sleep=4")  # 3 s more in steps 2-4: time to signal
    _submit(["--nodes", 2, "--ntasks-per-node", 2, "--gpus-per-node", 0, "--time", "00:10:00", "pretrain",
             "--data", cifar_small / "train.jsonl", "--run-dir", run] + PRETRAIN, env)
    job = int(_jobs(run)[-1]["job_id"])
    end = time.time() + 300
    while not (run / "metrics.jsonl").exists() or 2 not in losses(run):
        assert time.time() < end, cluster.logs()
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", str(job)], check=True, env=job_env)
    cluster.wait_jobs_gone([job], timeout=600)

    states = cluster.job_states()[job]
    assert states[-1] == "COMPLETED" and len(states) >= 2, states  # requeued once, then finished
    ev = [(e["event"], e.get("signal")) for e in _events(run)]
    assert ("signal", "SIGUSR1") in ev and ev[-1] == ("done", None), ev
    assert [e for e, _ in ev].count("resume") == 1
    log = _log(run, job)
    assert "requeued SLURM job" in log and "(restart 1)" in log, log[-3000:]
    root, _ = chain_run
    want, got = losses(root / "pretrain"), losses(run)
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=1e-6), s


def test_failed_stage_cancels_the_rest(cluster, job_env, cifar_small, tmp_path):
    """A stage that crashes fails its job; the stages after it are cancelled, not left pending, and never run."""
    root = tmp_path / "runs"
    data = cifar_small / "train.jsonl"
    ft = ["--train", str(data), "--val", str(cifar_small / "val.jsonl")] + FINETUNE
    path = _write_chain(tmp_path / "chain.yaml", root, [
        {"name": "a", "command": "pretrain", "args": ["--data", str(data)] + PRETRAIN,
         "slurm": {"ntasks_per_node": 2, "env": {"MEGADIGPT_FAULTS": "crash=1"}}},
        {"name": "b", "command": "finetune", "init_from": "{a}", "args": ft},
        {"name": "c", "command": "finetune", "init_from": "{b}/last", "args": ft},
    ])
    _submit([path], job_env)
    ids = [int(_jobs(root / s)[-1]["job_id"]) for s in "abc"]
    cluster.wait_jobs_gone(ids, timeout=600)
    states = cluster.job_states()
    assert [states[i][-1] for i in ids] == ["FAILED", "CANCELLED", "CANCELLED"], states
    assert "injected crash" in _log(root / "a", ids[0])
    for s in "bc":
        assert not (root / s / "metrics.jsonl").exists()


# ============================================================================ no cluster needed


def test_dry_run_prints_the_chain_and_leaves_nothing(cifar_small, tmp_path):
    root = tmp_path / "runs"
    path = _chain3(cifar_small, root, tmp_path / "chain.yaml")
    p = _submit(["--dry-run", "--partition", "cpu", path], subprocess_env())
    out = p.stdout
    assert out.count("#!/bin/bash") == 3 and out.count("#SBATCH --partition=cpu") == 3
    assert "--dependency=afterok:<job of pretrain> --kill-on-invalid-dep=yes" in out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=2" in out and "--gpus-per-node" not in out
    assert f"--init-from {root / 'in21k' / 'last'}" in out and "#SBATCH --signal=USR1@60" in out
    assert "srun --kill-on-bad-exit=1" in out and f"MEGADIGPT_CODE='{root / 'code' / '<hash>'}'" in out
    assert not root.exists()  # nothing written, nothing created
    # each script: the set-up lines (the chain's, then the stage's), the snapshot on PYTHONPATH, then the launch
    scripts = out.split("#!/bin/bash")[1:]
    for name, script in zip(("pretrain", "in21k", "in1k"), scripts):
        lines = [ln.split("  # ")[0] for ln in script.split("\n")]  # (without the script's comments)
        launch = [ln for ln in lines if ln.startswith("srun ")]
        assert len(launch) == 1 and launch[0].startswith("srun --kill-on-bad-exit=1 python -m megadigpt "), launch
        want = ["set +u"] + SETUP + (['echo "setup ran: stage in1k"'] if name == "in1k" else []) + ["set -u"]
        i = lines.index("set +u")
        assert lines[i:i + len(want)] == want, (name, lines[i:i + len(want)])
        assert lines.index('export PYTHONPATH="$MEGADIGPT_CODE${PYTHONPATH:+:$PYTHONPATH}"') > i + len(want) - 1
        assert "export PYTHONSAFEPATH=1" in lines and lines.index(launch[0]) > lines.index("export PYTHONSAFEPATH=1")
    assert f"python -m megadigpt pretrain --run-dir {root / 'pretrain'} --data {cifar_small / 'train.jsonl'} " \
        f"{' '.join(PRETRAIN)}\n" in scripts[0]


def test_dry_run_of_the_shipped_chain_without_its_data_or_weights(tmp_path):
    """``submit --dry-run vitl14_merged`` on a machine without /datasets and /weights: the four scripts, and a
    warning per missing input, not an error; the chain's node counts are those of the shipped sbatch scripts and
    slurm/README.md."""
    import re

    p = _submit(["--dry-run", "vitl14_merged"], subprocess_env(), check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("#!/bin/bash") == 4
    warn = [ln for ln in p.stderr.splitlines() if ln.startswith("megadigpt submit: warning:")]
    assert any("/weights/open_clip_vit_h14.bin" in w for w in warn), p.stderr
    assert any("/datasets/merged/train.jsonl" in w for w in warn), p.stderr
    assert any("/datasets/imagenet/val" in w for w in warn), p.stderr
    stages, _ = slurm.load_chain(slurm.resolve_chain_path("vitl14_merged"), None)
    readme = (REPO / "slurm" / "README.md").read_text()
    scripts = {"pretrain": "pretrain_merged", "in21k": "finetune_in21k", "in1k": "finetune_in1k", "eval": "eval"}
    for s in stages:
        sbatch = (REPO / "slurm" / f"{scripts[s.name]}.sbatch").read_text()
        assert f"#SBATCH --nodes={s.slurm.nodes}\n" in sbatch, s.name
        assert f"#SBATCH --gpus-per-node={s.slurm.gpus_per_node}\n" in sbatch, s.name
        row = next(ln for ln in readme.splitlines() if f"`{scripts[s.name]}.sbatch`" in ln)
        assert re.search(rf"\| {s.slurm.nodes} (nodes )?x {s.slurm.gpus_per_node}(,| GPU)", row), (s.name, row)
    assert stages[3].slurm.gpus_per_node == 1 and not stages[3].slurm.exclusive  # eval scores one model


def test_submit_refuses_bad_input_before_queueing(cifar_small, tmp_path):
    data = cifar_small / "train.jsonl"
    env = subprocess_env(PATH=str(Path(sys.executable).parent))  # no sbatch on this PATH: checks come first
    pre = ["pretrain", "--data", data] + PRETRAIN
    cases = {
        "not divisible by train.micro_batch 2 x world size 6": ["--nodes", 3, "--ntasks-per-node", 2,
                                                               "--gpus-per-node", 0] + pre,
        "model.nope": ["--dry-run"] + pre + ["model.nope=1"],
        "not found": ["pretrain", "--data", tmp_path / "missing"] + PRETRAIN,  # a real submit: an error
        "one task per GPU": ["--dry-run", "--ntasks-per-node", 2, "--gpus-per-node", 4] + pre,
        "give --out": ["--dry-run", "eval", tmp_path],
        "unrecognized arguments: --bogus": ["--dry-run"] + pre + ["--bogus"],
    }
    for msg, args in cases.items():
        p = _submit(args, env, check=False)
        assert p.returncode == 2 and msg in p.stderr, (msg, p.stderr[-2000:])
    p = _submit(["--gpus-per-node", 0, "--ntasks-per-node", 2, "pretrain", "--data", data, "--run-dir",
                 tmp_path / "r"] + PRETRAIN, env, check=False)
    assert p.returncode == 2 and "sbatch not found" in p.stderr
    # chains: a stage may only refer to an earlier one; keys are checked
    bad = {"not an earlier stage": [{"name": "x", "command": "finetune", "init_from": "{y}"},
                                    {"name": "y", "command": "pretrain"}],
           "unknown key": [{"name": "x", "command": "pretrain", "nodes": 2}],
           "unique name": [{"name": "x", "command": "pretrain"}, {"name": "x", "command": "pretrain"}]}
    for msg, stages in bad.items():
        with pytest.raises(ConfigError, match=msg):
            slurm.load_chain(_write_chain(tmp_path / "bad.yaml", tmp_path / "r", stages), None)


def test_chain_from_a_later_stage(cifar_small, tmp_path):
    """--from: the earlier stages must have run; their outputs are then checked like any other input."""
    root = tmp_path / "runs"
    stages, _ = slurm.load_chain(_chain3(cifar_small, root, tmp_path / "chain.yaml"), None)
    with pytest.raises(ConfigError, match="earlier stage pretrain has no output"):
        slurm.chain_from(stages, "in21k")
    with pytest.raises(ConfigError, match="no such stage"):
        slurm.chain_from(stages, "in22k")
    (root / "pretrain").mkdir(parents=True)
    rest = slurm.chain_from(stages, "in21k")
    assert [s.name for s in rest] == ["in21k", "in1k"]
    assert rest[0].pending == [] and rest[1].pending == [str(root / "in21k")]


def _fake_slurm(folder: Path) -> Path:
    """`scontrol` and `srun` stand-ins: srun prints its command line, then runs the python it names with the job's
    environment, printing the megadigpt it imports (what `python -m megadigpt` would run)."""
    folder.mkdir()
    (folder / "scontrol").write_text("#!/bin/bash\n[ \"$2\" = hostnames ] && echo node1 || echo NodeAddr=127.0.0.1\n")
    (folder / "srun").write_text('#!/bin/bash\necho "SRUN: $*"\nshift\n'
                                 '"$1" -c "import megadigpt, os; print(\'IMPORTS\', megadigpt.__file__, '
                                 'os.environ.get(\'SETUP_RAN\'))"\n')
    for f in ("scontrol", "srun"):
        (folder / f).chmod(0o755)
    return folder


def test_code_snapshot_is_what_jobs_import(tmp_path):
    """The snapshot is reused while the code is the same; the job script puts it on PYTHONPATH, and `srun python
    -m megadigpt` imports it even when the job starts in a checkout (where the working directory would otherwise
    come first), with the python the set-up lines chose (none: the python that ran submit)."""
    from megadigpt.launch.snapshot import snapshot

    a, b = snapshot(tmp_path), snapshot(tmp_path)
    assert a["path"] == b["path"] and b.get("reused") and not a.get("reused")
    assert sorted(p.name for p in (tmp_path / "code").iterdir()) == [Path(a["path"]).name]
    fake = _fake_slurm(tmp_path / "bin")
    for setup in ([], ["export SETUP_RAN=yes", ACTIVATE]):
        stage = slurm.Stage("ev", "eval", ["runs/x", "--out", str(tmp_path / "out"), "--imagenet", "/d/val"],
                            str(tmp_path / "out"), slurm.replace(slurm.stage_defaults("eval"), setup=setup))
        script = tmp_path / "job.sbatch"
        script.write_text(slurm.render(stage, python=sys.executable, code_dir=a["path"], log="x.out"))
        env = subprocess_env(PATH=f"{fake}:/usr/bin:/bin", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1",
                             SLURM_NTASKS="1", PYTHONPATH="")
        p = subprocess.run(["bash", str(script)], cwd=str(REPO), capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"SRUN: --kill-on-bad-exit=1 python -m megadigpt eval runs/x --out {tmp_path / 'out'} --imagenet " \
               f"/d/val\n" in p.stdout
        want = f"IMPORTS {Path(a['path']) / 'megadigpt' / '__init__.py'} {'yes' if setup else None}\n"
        assert want in p.stdout, p.stdout
    # a python that imports another megadigpt (here: the checkout, by PYTHONPATH) stops the job before srun
    env["PYTHONPATH"] = str(REPO)
    script.write_text(script.read_text().replace('export PYTHONPATH="$MEGADIGPT_CODE${PYTHONPATH:+:$PYTHONPATH}"',
                                                 'export PYTHONPATH="$PYTHONPATH:$MEGADIGPT_CODE"'))
    p = subprocess.run(["bash", str(script)], cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 2 and "SRUN" not in p.stdout and "not the code snapshot" in p.stderr, p.stderr


def test_setup_lines_and_what_each_stage_reserves(tmp_path):
    """`setup:` of the chain, then of the stage, then --setup, in that order before the launch line; each line one
    line of text; an eval stage reserves one GPU and a short time unless told otherwise."""
    stages, _ = slurm.load_chain(_write_chain(tmp_path / "c.yaml", tmp_path / "r", [
        {"name": "a", "command": "pretrain", "setup": "module load a"},
        {"name": "b", "command": "eval", "model": "{a}", "slurm": {"gpus_per_node": 8}},
        {"name": "c", "command": "eval", "model": "{a}"},
        {"name": "d", "command": "probe", "weights": "{a}"}], slurm_defaults={"time": "01:00:00"},
        setup=["module load base"]), None, {"setup": ["source ~/v/bin/activate"], "partition": "p"})
    assert [s.slurm.setup for s in stages] == [["module load base", "module load a", "source ~/v/bin/activate"]] + \
        [["module load base", "source ~/v/bin/activate"]] * 3
    assert [(s.slurm.gpus_per_node, s.slurm.requeue, s.slurm.signal_seconds, s.slurm.partition) for s in stages] == \
        [(8, True, 300, "p"), (8, False, 0, "p"), (1, False, 0, "p"), (8, False, 0, "p")]
    assert {s.slurm.time for s in stages} == {"01:00:00"}  # the chain's time wins over the command's default
    one = slurm.single_stage("eval", ["m", "--imagenet", "/d", "--out", str(tmp_path / "o")], {})
    assert (one.slurm.gpus_per_node, one.slurm.time, one.slurm.requeue) == (1, "02:00:00", False)
    text = slurm.render(one, python=sys.executable, code_dir=str(tmp_path / "code"))
    assert "#SBATCH --gpus-per-node=1\n" in text and "#SBATCH --time=02:00:00\n" in text and "--signal" not in text
    assert f"export PATH={BIN}${{PATH:+:$PATH}}" in text  # no set-up lines: the python that ran submit
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    bad = {"control character": [{"name": "a", "command": "pretrain", "setup": ["module load a\nrm -rf x"]}],
           "list of shell lines": [{"name": "a", "command": "pretrain", "setup": [{"module": "a"}]}],
           "beside slurm": [{"name": "a", "command": "pretrain", "slurm": {"setup": ["module load a"]}}]}
    for msg, st in bad.items():
        with pytest.raises(ConfigError, match=msg):
            slurm.load_chain(_write_chain(tmp_path / "bad.yaml", tmp_path / "r", st), None)
    env = subprocess_env(PATH=str(BIN))
    p = _submit(["--dry-run", "--setup", "module load x\ty", "eval", "m", "--imagenet", tmp_path, "--out", tmp_path],
                env, check=False)
    assert p.returncode == 2 and "control character" in p.stderr and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.parametrize("chain", ["vitl14_merged", "vitl14_ade20k", "vitl14_zeroshot"])
def test_shipped_chains_pass_submits_checks_without_notes(chain):
    p = _submit(["--dry-run", chain], subprocess_env(), check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    other = [ln for ln in p.stderr.splitlines() if not ln.startswith("megadigpt submit: warning:")]
    assert other == [], other  # only the inputs missing on this machine; no note, no error


def test_requeue_only_on_the_warning_signal(monkeypatch):
    """SIGTERM (scancel, the time limit, preemption) never requeues: cancelling a job must stay possible."""
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    assert slurm.requeue_after_signal("SIGTERM") is None
    monkeypatch.setenv("MEGADIGPT_REQUEUE", "0")
    assert slurm.requeue_after_signal("SIGUSR1") is None
    monkeypatch.delenv("MEGADIGPT_REQUEUE")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert slurm.requeue_after_signal("SIGUSR1") is None


def test_shipped_sbatch_scripts_are_current_and_parse(tmp_path):
    """slurm/*.sbatch are rendered from TEMPLATES (python -m megadigpt.launch.slurm --templates slurm/)."""
    written = slurm.write_templates(tmp_path)
    assert {p.name for p in written} == {p.name for p in (REPO / "slurm").glob("*.sbatch")}
    for p in written:
        assert (REPO / "slurm" / p.name).read_text() == p.read_text(), f"regenerate slurm/{p.name}"
        subprocess.run(["bash", "-n", str(p)], check=True)
    # the shipped chain validates as far as it can without its data: its stages and keys
    stages, root = slurm.load_chain(slurm.resolve_chain_path("vitl14_merged"), str(tmp_path / "r"))
    assert [s.name for s in stages] == ["pretrain", "in21k", "in1k", "eval"]
    assert "--init-from" in stages[2].args and str(tmp_path / "r" / "in21k" / "last") in stages[2].args
    assert stages[0].slurm.world_size == 64 and stages[3].slurm.requeue is False

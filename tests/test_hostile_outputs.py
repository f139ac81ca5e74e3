"""Outputs that never destroy and scripts that never run what a value holds (issue 28).

- ``--out`` / ``--json`` of eval, probe, report, bench, plan and ``data in21k-labels``: never inside a run's
  ``checkpoints/``, never over a file megadigpt did not write (one line, exit 2, the file untouched) unless
  ``--force``; what megadigpt wrote there before is replaced without it. (``convert``: tests/test_exports.py, on its
  real run.)
- ``submit``: every value of a generated sbatch script from hostile run directories, job names, env values and
  arguments (``$(...)``, backticks, ``;``, quotes, spaces, ``#``, ``%``) is quoted: ``bash -n`` parses the script,
  running it with stub ``scontrol``/``srun`` runs nothing injected and hands ``srun`` the values verbatim, and each
  ``#SBATCH`` line is one token; a newline or another control character is one line, exit 2, nothing written.
- ``plan --models``: a malformed spec, an unknown architecture or a patch that does not divide the image is one line.

Everything runs in-process (``megadigpt.cli.main``) and refuses before any model, data or training: no run is
trained here."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megadigpt.cli import main
from megadigpt.launch import slurm

EVIL = "a b $(touch {d}/pwned1) `touch {d}/pwned2`; touch {d}/pwned3 'q' \"dq\" #c 100%x \\z"


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, pattern):
    import re

    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("megadigpt: error: "), (code, err)
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err


def _fake_run(root: Path) -> Path:
    """A run directory's shape (config.yaml, metrics.jsonl, checkpoints/latest + a tag): enough for the checks."""
    run = root / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000002")
    (run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (run / "config.yaml").write_text("model: {arch: vit_tiny}\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "gen_loss": 1.0 / s, "dis_loss": 2.0 / s,
                                                           "lr": 1e-3}) + "\n" for s in (1, 2, 3)))
    return run


# ------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("command", ["eval", "probe", "report", "bench"])
def test_outputs_refuse_foreign_files_and_checkpoint_folders(command, tmp_path, capsys):
    run = _fake_run(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    name = {"eval": "eval.json", "probe": "results.json", "report": "summary.md", "bench": "bench.md"}[command]
    (out / name).write_text("my notes\n")
    base = {"eval": ["eval", tmp_path / "model", "--imagenet", tmp_path / "imgs"],
            "probe": ["probe", tmp_path / "w.safetensors"],
            "report": ["report", run],
            "bench": ["bench", "--models", "vit_tiny/4", "--img-size", "32", "--teacher", "pixels"]}[command]
    code, _, err = _cli(base + ["--out", out], capsys)
    _one_line_error(code, err, rf"{name}.*megadigpt did not write|megadigpt did not write .*{name}|pass --force")
    assert (out / name).read_text() == "my notes\n"
    before = sorted(p.name for p in (run / "checkpoints").rglob("*"))
    code, _, err = _cli(base + ["--out", run / "checkpoints" / "step_00000002", "--force"], capsys)
    _one_line_error(code, err, r"inside the run's checkpoint folder .*checkpoints")
    assert sorted(p.name for p in (run / "checkpoints").rglob("*")) == before


def test_report_replaces_only_its_own_files(tmp_path, capsys):
    run = _fake_run(tmp_path)
    (run / "report").mkdir()
    (run / "report" / "summary.md").write_text("mine\n")
    code, _, err = _cli(["report", run], capsys)  # the default --out, <run>/report
    _one_line_error(code, err, r"summary\.md.*pass --force")
    assert (run / "report" / "summary.md").read_text() == "mine\n"
    assert _cli(["report", run, "--force"], capsys)[0] == 0
    assert (run / "report" / "summary.md").read_text() != "mine\n"
    assert _cli(["report", run], capsys)[0] == 0  # its own files: no --force needed
    (run / "report" / "loss.png").write_bytes(b"edited by hand")  # changed since: no longer megadigpt's
    code, _, err = _cli(["report", run], capsys)
    _one_line_error(code, err, r"loss\.png")
    assert (run / "report" / "loss.png").read_bytes() == b"edited by hand"


def test_an_input_is_never_an_output_even_with_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    labels = tmp_path / "real.json"
    labels.write_text("[]")
    os.link(labels, out / "eval.json")  # a hard link: another name of the input
    code, _, err = _cli(["eval", tmp_path / "model", "--imagenet", tmp_path / "imgs", "--real-labels", labels,
                         "--out", out, "--force"], capsys)
    _one_line_error(code, err, r"would overwrite .*eval\.json.*--force does not change this")
    assert labels.read_text() == "[]"


def test_bench_folder_must_be_new_empty_or_a_bench(tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _cli(["bench", "--models", "vit_tiny/4", "--img-size", "32", "--out", out], capsys)
    _one_line_error(code, err, r"notes\.txt.*--force")
    assert (out / "notes.txt").read_text() == "mine"


def test_plan_json_and_labels_files(tmp_path, capsys):
    mine = tmp_path / "rows.json"
    mine.write_text("[1, 2]")
    plan = ["plan", "--config", "demo", "--models", "vit_tiny/4", "--zero", "1", "--ckpt", "off", "--offload", "off",
            "--gpus", "1"]
    code, _, err = _cli(plan + ["--json", mine], capsys)
    _one_line_error(code, err, r"--json .*rows\.json.* exists and megadigpt did not write it; pass --force")
    assert mine.read_text() == "[1, 2]"
    fresh = tmp_path / "plan.json"
    assert _cli(plan + ["--json", fresh], capsys)[0] == 0
    assert _cli(plan + ["--json", fresh], capsys)[0] == 0  # its own rows: replaced without --force
    assert json.loads(fresh.read_text())[0]["arch"] == "vit_tiny"
    assert _cli(plan + ["--json", mine, "--force"], capsys)[0] == 0 and mine.read_text() != "[1, 2]"
    labels = tmp_path / "labels.json"
    labels.write_text("mine")
    code, _, err = _cli(["data", "in21k-labels", tmp_path, "--variant", "winter21", "--out", labels], capsys)
    _one_line_error(code, err, r"labels\.json.*pass --force")
    assert labels.read_text() == "mine"


# ------------------------------------------------------------------------------------------- plan --models


@pytest.mark.parametrize("models,pattern", [
    ("vit_base/15", r"patch 15 does not divide the image size 64"),
    ("vit_base/0", r"positive patch size"), ("vit_base/-1", r"positive patch size"),
    ("vit_base/abc", r"positive patch size"), ("vit_base/\u00b2", r"positive patch size"),
    ("vit_base/16/2", r"write arch/patch"), ("/16", r"write arch/patch"),
    ("vit_nonesuch/16", r"unknown model 'vit_nonesuch'"), ("", r"--models is empty"),
    (",", r"--models is empty"), ("vit_base/16,,vit_large/16", r"empty item"),
])
def test_plan_refuses_malformed_models_in_one_line(models, pattern, capsys):
    code, _, err = _cli(["plan", "--config", "demo", "--models", models], capsys)
    _one_line_error(code, err, pattern)


# ------------------------------------------------------------------------------------------- sbatch scripts

STUBS = {
    "scontrol": '#!/bin/bash\nif [ "$2" = hostnames ]; then echo node1; else echo "NodeName=node1 NodeAddr=127.0.0.1 '
                'x=y"; fi\n',
    "srun": '#!/bin/bash\nprintf \'%s\\0\' "$@" > "$STUB_OUT/srun.args"\nprintf \'%s\' "$EVIL_ENV" > '
            '"$STUB_OUT/env"\nprintf \'%s\' "$PYTHONPATH" > "$STUB_OUT/pythonpath"\n',
}


def _snapshot(code_dir) -> None:
    """A stand-in code snapshot: the script checks, before srun, that python imports megadigpt from it."""
    pkg = Path(code_dir) / "megadigpt"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")


def _run_script(script: str, tmp_path: Path) -> list:
    """Run a rendered script as the batch shell would, with stub scontrol / srun; returns srun's arguments."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "1",
           "STUB_OUT": str(tmp_path), "HOME": str(tmp_path)}
    p = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert p.returncode == 0, p.stderr
    return (tmp_path / "srun.args").read_bytes().decode().split("\0")[:-1]


def test_hostile_values_are_quoted_in_the_script(tmp_path):
    evil = EVIL.format(d=tmp_path)
    run_dir = str(tmp_path / evil)
    opts = slurm.SlurmOptions(gpus_per_node=0, partition="gpu#a", account="acct'x", job_name="j;`id`#",
                              env={"EVIL_ENV": evil}, sbatch=["--comment=$(touch x) `y`"])
    stage = slurm.Stage("ev", "eval", [str(tmp_path / "m $(touch x)"), "--out", run_dir, "--imagenet", evil],
                        run_dir, opts)
    code_dir = str(tmp_path / f"code {evil}")
    _snapshot(code_dir)
    script = slurm.render(stage, python=sys.executable, code_dir=code_dir, log=slurm._job_log(stage))
    args = _run_script(script, tmp_path)
    assert not list(tmp_path.glob("pwned*")) and not (tmp_path / "x").exists()
    assert args[0] == "--kill-on-bad-exit=1" and args[2:4] == ["-m", "megadigpt"]  # (python: on PATH or absolute)
    assert args[4:] == ["eval", str(tmp_path / "m $(touch x)"), "--out", run_dir, "--imagenet", evil]
    assert (tmp_path / "pythonpath").read_text().split(":")[0] == code_dir  # the snapshot first, verbatim
    assert (tmp_path / "env").read_text() == evil
    sb = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):  # sbatch reads "..." with backslash escapes, as POSIX shlex does
            words = shlex.split(line[len("#SBATCH "):])
            assert len(words) == 1 or words[0].startswith("--comment"), line
            k, _, v = words[0].partition("=")
            sb[k] = v
    assert sb["--output"] == run_dir.replace("%", "%%") + "/slurm/%j.out"
    assert sb["--job-name"] == "j;`id`#" and sb["--partition"] == "gpu#a" and sb["--account"] == "acct'x"


def _chain(tmp_path, stage=None, slurm_opts=None, run_root=None):
    spec = {"run_root": run_root or str(tmp_path / "root"), "slurm": {"gpus_per_node": 0, **(slurm_opts or {})},
            "stages": [{"name": "ev", "command": "eval", "model": str(tmp_path / "model"),
                        "args": ["--imagenet", str(tmp_path / "imgs")], **(stage or {})}]}
    path = tmp_path / "chain.json"  # JSON is YAML: the control characters arrive exactly
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("where,what", [
    ("run_dir", "run directory"), ("run_root", "run root"), ("env", "env EVIL_ENV"), ("arg", "argument"),
    ("job_name", "job"), ("sbatch", "sbatch option"), ("model", "argument"),
])
@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x1b"])
def test_control_characters_are_refused_in_one_line(where, what, char, tmp_path, capsys):
    bad = f"x{char}touch {tmp_path}/pwned"
    stage, opts, root = {}, {}, None
    if where == "run_dir":
        stage["run_dir"] = str(tmp_path / bad)
    elif where == "run_root":
        root = str(tmp_path / bad)
    elif where == "env":
        opts["env"] = {"EVIL_ENV": bad}
    elif where == "arg":
        stage["args"] = ["--imagenet", bad]
    elif where == "job_name":
        opts["job_name"] = bad
    elif where == "sbatch":
        opts["sbatch"] = ["--comment=" + bad]
    else:
        stage["model"] = str(tmp_path / bad)
    chain = _chain(tmp_path, stage, opts, root)
    before = sorted(tmp_path.rglob("*"))
    code, out, err = _cli(["submit", "--dry-run", chain], capsys)
    assert code == 2 and "#!/bin/bash" not in out, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and "warning:" not in ln]
    assert len(lines) == 1 and lines[0].startswith("megadigpt: error: "), err
    assert what in lines[0] or "one non-empty word" in lines[0] or "sbatch option" in lines[0], lines[0]
    assert sorted(tmp_path.rglob("*")) == before and not list(tmp_path.glob("pwned*"))


def test_dry_run_of_hostile_values_renders_a_safe_script(tmp_path, capsys):
    evil = EVIL.format(d=tmp_path)
    chain = _chain(tmp_path, {"run_dir": str(tmp_path / evil), "args": ["--imagenet", evil]},
                   {"env": {"EVIL_ENV": evil}, "partition": "p#1"})
    code, out, err = _cli(["submit", "--dry-run", chain], capsys)
    assert code == 0, err
    script = out[out.index("#!/bin/bash"):]
    _snapshot(tmp_path / "root" / "code" / "<hash>")  # (a dry run names the snapshot it would take)
    args = _run_script(script, tmp_path)
    assert not list(tmp_path.glob("pwned*"))
    assert args[args.index("--out") + 1] == str(tmp_path / evil) and args[-1] == evil
    assert (tmp_path / "env").read_text() == evil

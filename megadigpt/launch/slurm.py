"""SLURM: sbatch scripts from configs, job chains, and the requeue after SLURM's warning signal.

One script shape serves every stage (``render``): one task per GPU via ``srun`` (each task finds its rank, world
size and local rank in ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``, see ``distributed/env.py``),
the rendezvous on the first node of the allocation (its ``NodeAddr``; no ssh, no pdsh), ``--signal=USR1@S`` and
``--requeue``. On SIGUSR1 every rank finishes its step and checkpoints; rank 0 then asks SLURM to requeue the job
(``requeue_after_signal``), and the requeued job resumes from the run directory. SIGTERM (``scancel``, the time
limit itself, preemption) checkpoints too but never requeues: stopping a job must stay possible.

``megadigpt submit`` (``submit``) validates a stage (its config, its batch geometry on the requested world size,
its paths) before anything is queued, snapshots the code into the run directory (``snapshot.py``), writes the
script there and submits it. The script runs the site's set-up lines (``setup:`` of the chain and the stage,
``--setup``: ``module load``, conda or venv activation), puts the snapshot on ``PYTHONPATH`` and launches ``srun
python -m megadigpt <command> ...``, as a user would write it. A chain YAML (``slurm/chains/``) submits several
stages, each ``afterok`` on the one before, with ``--kill-on-invalid-dep=yes`` so a failed stage cancels the rest
instead of leaving them pending.
The scripts in ``slurm/*.sbatch`` are this module's ``TEMPLATES``, rendered (``python -m megadigpt.launch.slurm
--templates slurm/``; a test keeps them in step)."""

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Dict, List, Optional


from ..config import ConfigError, suggest, missing_path, preview_paths
from ..commands import SUBMITTABLE, build_parser, finetune_overrides, overrides_of, pretrain_overrides
from ..safe_fs import open_append, write_atomic
from ..train.runtime import requeue_after_signal  # noqa: F401 - re-exported (cli's exit path lives in commands)

COMMANDS = SUBMITTABLE  # pretrain, finetune, segment, clip, probe, eval
TRAINING = ("pretrain", "finetune", "segment", "clip")  # the stages with a run directory (resumable)
_PKG = Path(__file__).resolve().parent.parent
# setup.py installs the top-level slurm/ as megadigpt/slurm; a source checkout has it beside the package
SLURM_DIR = next((d for d in (_PKG / "slurm", _PKG.parent / "slurm") if d.is_dir()), _PKG.parent / "slurm")
# run in the batch shell before srun: the python the set-up left on PATH imports the snapshot, not another copy
_CHECK_SNAPSHOT = ('import os, sys, megadigpt; f = os.path.realpath(megadigpt.__file__); sys.exit(0 if f.startswith('
                   'os.path.realpath(sys.argv[1]) + os.sep) else "megadigpt: python imports " + f + ", not the code '
                   'snapshot " + sys.argv[1] + " (python < 3.11 puts the working directory first: submit from '
                   'another folder)")')
EXIT_CODES = "0 done, 2 bad input, 3 diverged, 75 checkpointed on a signal"


# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (man sbatch); --mem: a size, unit K/M/G/T
_TIME = re.compile(r"(?i)unlimited|infinite|\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")
_MEM = re.compile(r"(?i)\d+[KMGT]?B?")


@dataclass
class SlurmOptions:
    """sbatch resources of one stage. YAML keys are these names; command-line flags the same with dashes."""

    nodes: int = 1
    gpus_per_node: int = 8  # 0: a CPU partition (no --gpus-per-node line, tasks run on the CPU)
    ntasks_per_node: Optional[int] = None  # default: one task per GPU (1 without GPUs)
    cpus_per_task: Optional[int] = None  # data-loading workers + 1 is a good start; SLURM's default is 1
    mem: Optional[str] = None  # e.g. "0": all of each node's memory
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    reservation: Optional[str] = None
    exclusive: bool = False
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit (SLURM may send it up to 60 s earlier)
    requeue: bool = True  # on that signal: checkpoint, requeue, resume
    job_name: Optional[str] = None
    sbatch: List[str] = field(default_factory=list)  # more #SBATCH options, verbatim: ["--mail-type=END"]
    env: Dict[str, str] = field(default_factory=dict)  # exported before srun: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...
    # shell lines run before the launch line (module load, conda activate, source venv/bin/activate); in a chain
    # `setup:` of the chain, then of the stage, then --setup of the command line. None given: the python that ran
    # `megadigpt submit` is put first on PATH
    setup: List[str] = field(default_factory=list)

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or (self.gpus_per_node if self.gpus_per_node > 0 else 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def check(self, where: str = "slurm"):
        from typing import get_type_hints

        from ..config import coerce

        if isinstance(self.time, int) and not isinstance(self.time, bool):
            raise ConfigError(f"{where}: time {self.time} is a number: quote the time limit, e.g. \"48:00:00\" (YAML "
                              f"reads an unquoted 48:00:00 as seconds)")
        for f in fields(self):  # YAML chains may hold any type: a wrong one is an error, not a traceback later
            if f.name not in ("sbatch", "env", "setup"):
                setattr(self, f.name, coerce(getattr(self, f.name), get_type_hints(SlurmOptions)[f.name],
                                              f"{where}: {f.name}"))
        if not _TIME.fullmatch(self.time):
            raise ConfigError(f"{where}: time {self.time!r} is not a SLURM time limit (minutes, MM:SS, HH:MM:SS, "
                              f"D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED), e.g. 48:00:00")
        if self.mem is not None and not _MEM.fullmatch(self.mem):
            raise ConfigError(f"{where}: mem {self.mem!r} is not a SLURM memory size (a number with an optional "
                              f"K, M, G or T suffix; 0 = all of the node's)")
        for k in ("partition", "account", "qos", "constraint", "reservation", "job_name"):
            v = getattr(self, k)
            if v is not None and (not v or any(c.isspace() for c in v)):
                raise ConfigError(f"{where}: {k} {v!r} must be one non-empty word (no spaces or newlines)")
        if not isinstance(self.sbatch, list) or not isinstance(self.env, dict):
            raise ConfigError(f"{where}: sbatch is a list of options and env a mapping")
        for opt in self.sbatch:  # each becomes one `#SBATCH` line of the script
            if not isinstance(opt, str) or not opt.startswith("-") or "\n" in opt or "\r" in opt:
                raise ConfigError(f"{where}: sbatch option {opt!r} must be one option line starting with - "
                                  f"(e.g. --mail-type=END)")
        for k in self.env:
            if not isinstance(k, str) or not k.isidentifier():
                raise ConfigError(f"{where}: env name {k!r} is not a shell variable name")
        self.setup = setup_lines(self.setup, where)
        if self.nodes < 1 or self.tasks_per_node < 1 or self.gpus_per_node < 0:
            raise ConfigError(f"{where}: nodes and tasks per node must be >= 1 and gpus_per_node >= 0")
        if self.gpus_per_node and self.ntasks_per_node and self.ntasks_per_node != self.gpus_per_node:
            raise ConfigError(f"{where}: one task per GPU: ntasks_per_node {self.ntasks_per_node} != gpus_per_node "
                              f"{self.gpus_per_node}")
        if self.signal_seconds < 0:
            raise ConfigError(f"{where}: signal_seconds must be >= 0")
        if self.requeue and not self.signal_seconds:
            raise ConfigError(f"{where}: requeue needs the warning signal (signal_seconds > 0)")
        return self


def setup_lines(value, where: str) -> List[str]:
    """A ``setup:`` value: shell lines (a single string is one line), each one line of text (no NUL, newline or
    other control character: it goes into the script as it is)."""
    from ..config import check_text

    if value is None:
        return []
    lines = [value] if isinstance(value, str) else value
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise ConfigError(f"{where}: setup is a list of shell lines (strings), e.g. [\"module load cuda/12.4\", "
                          f"\"source ~/venvs/megadigpt/bin/activate\"]")
    for line in lines:
        check_text(line, f"{where}: setup line")
    return list(lines)


# What each kind of stage reserves unless the chain, the stage or the command line says otherwise. eval and probe
# run once over their sets, are not resumable, and get no warning signal; eval scores one model: one GPU.
STAGE_DEFAULTS = {
    "eval": dict(gpus_per_node=1, time="02:00:00", signal_seconds=0, requeue=False),
    "probe": dict(time="08:00:00", signal_seconds=0, requeue=False),
}


def stage_defaults(command: str) -> SlurmOptions:
    return replace(SlurmOptions(), **STAGE_DEFAULTS.get(command, {}))


def slurm_options(values: Optional[dict], base: Optional[SlurmOptions] = None, where: str = "slurm") -> SlurmOptions:
    """``base`` updated with ``values`` (a YAML mapping); unknown keys are errors."""
    base = base or SlurmOptions()
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of sbatch options")
    names = [f.name for f in fields(SlurmOptions) if f.name != "setup"]
    for k in values:
        if k == "setup":
            raise ConfigError(f"{where}.setup: setup is a key of the chain or of the stage, beside slurm: (not "
                              f"inside it)")
        if k not in names:
            raise ConfigError(f"unknown key {where}.{k}{suggest(k, names)}; known: {', '.join(names)}")
    return replace(base, **values)


# ============================================================================ stages


@dataclass
class Stage:
    name: str
    command: str  # pretrain | finetune | segment | clip | probe | eval
    args: List[str]  # the command's own arguments, as `megadigpt <command>` takes them
    run_dir: str  # where the stage writes (its --run-dir, or --out for probe / eval): absolute
    slurm: SlurmOptions
    pending: List[str] = field(default_factory=list)  # inputs an earlier stage of the chain will write


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def parse_stage_args(command: str, args: List[str]):
    """The command's arguments as ``megadigpt <command>`` would read them (overrides may follow options)."""
    if command not in COMMANDS:
        raise ConfigError(f"cannot submit {command!r}; choose from {', '.join(COMMANDS)}")
    parser = _subparser(command)
    ns, extra = parser.parse_known_args(args)  # a bad one raises cli.ArgumentError: one line naming the option
    stray = [a for a in extra if not ("=" in a and "." in a.split("=", 1)[0] and not a.startswith("-"))]
    if stray:
        raise ConfigError(f"megadigpt {command}: unrecognized arguments: {' '.join(stray)} (options of `megadigpt "
                          f"submit` go before the command)")
    if hasattr(ns, "overrides"):
        ns.overrides = list(ns.overrides) + extra
    return ns


def _with_option(args: List[str], option: str, value: str) -> List[str]:
    """``args`` with ``option value`` set (replacing any ``option x`` / ``option=x`` already there)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == option:
            skip = True
            continue
        if a.startswith(option + "="):
            continue
        out.append(a)
    return [option, value] + out


def stage_outputs(command: str, ns) -> Optional[str]:
    """Where the stage writes: --run-dir (pretrain, finetune, segment, clip: else the config's train.run_dir) or
    --out."""
    if command in ("probe", "eval"):
        return ns.out
    if ns.run_dir:
        return ns.run_dir
    for o in reversed(ns.overrides):
        if o.startswith("train.run_dir="):
            return o.split("=", 1)[1]
    return None


def validate_stage(stage: Stage) -> dict:
    """Every check that needs no GPU, no weights and no data decoding, for the stage's world size and device, as
    the job will run it. Returns a summary. Raises ConfigError."""
    from ..config import FinetuneRunConfig, load_config

    ns = parse_stage_args(stage.command, stage.args)
    o = stage.slurm
    o.check(f"stage {stage.name}")
    def pending(p) -> bool:  # written by an earlier stage of the chain
        return p is not None and any(Path(p) == Path(q) or Path(q) in Path(p).parents for q in stage.pending)

    summary = {"world_size": o.world_size}

    def device(cfg):
        return cfg.train.device if cfg.train.device != "auto" else ("cuda" if o.gpus_per_node > 0 else "cpu")

    if stage.command == "pretrain":
        from ..train.pretrain import plan_run

        cfg = load_config(ns.config, pretrain_overrides(ns))
        plan = plan_run(cfg, o.world_size, device(cfg), init_from_pending=pending(cfg.train.init_from))
        summary.update(accum=plan.accum, workers=cfg.data.num_workers)
    elif stage.command == "finetune":
        from ..train.finetune import plan_finetune

        cfg = load_config(ns.config, finetune_overrides(ns), root=FinetuneRunConfig)
        plan = plan_finetune(cfg, o.world_size, device_type=device(cfg),
                             init_from_pending=pending(cfg.train.init_from))
        summary.update(accum=plan.accum, workers=cfg.data.num_workers)
    elif stage.command == "segment":
        from ..segment_config import load_segment_config
        from ..train.segment import plan_segment

        cfg = load_segment_config(ns.config, overrides_of(ns))
        plan = plan_segment(cfg, o.world_size, device_type=device(cfg), init_from_pending=pending(cfg.train.init_from))
        summary.update(accum=plan.accum, workers=cfg.data.num_workers)
    elif stage.command == "clip":
        from ..clip_config import load_clip_config
        from ..train.clip import plan_clip

        cfg = load_clip_config(ns.config, overrides_of(ns))
        plan = plan_clip(cfg, o.world_size, device_type=device(cfg), init_from_pending=pending(cfg.train.init_from))
        summary.update(accum=plan.accum, workers=cfg.data.num_workers)
    elif stage.command == "probe":
        from ..train.finetune import plan_finetune

        if not ns.weights and not ns.random_init:
            raise ConfigError(f"stage {stage.name}: probe needs the weights to probe (or --random-init)")
        from ..train.probe import check_labelled_sources

        cfg = load_config(ns.config, finetune_overrides(ns), root=FinetuneRunConfig)
        check_labelled_sources(cfg)
        cfg.train.init_from = ns.weights
        cfg.train.run_dir = stage.run_dir  # (probe writes only to --out)
        cfg.train.global_batch = cfg.train.micro_batch * o.world_size
        cfg.finetune.mixup = cfg.finetune.cutmix = 0.0
        plan_finetune(cfg, o.world_size, device_type=device(cfg), init_from_pending=pending(ns.weights))
        summary.update(workers=cfg.data.num_workers)
    else:  # eval
        if not pending(ns.model) and not Path(ns.model).exists():
            missing_path(f"stage {stage.name}: the model to evaluate is not found: {ns.model}")
        sets = [(k, getattr(ns, k)) for k in ("imagenet", "real", "v2", "a", "r", "sketch", "c") if getattr(ns, k)]
        sets += [("set", str(v).partition("=")[2] or str(v)) for v in getattr(ns, "sets", None) or []]  # NAME=SOURCE
        sets += [("pairs", str(v).partition("=")[2] or str(v)) for v in getattr(ns, "pairs", None) or []]
        if not sets:
            raise ConfigError(f"stage {stage.name}: eval needs at least one set (--set NAME=SOURCE, --imagenet, "
                              f"--v2, ..., --pairs NAME=SOURCE)")
        from ..data.remote import expand_urls, is_remote

        for k, src in sets:  # a local source must be there; remote ones and ImageNet-C templates are read by the job
            first = (expand_urls(src) or [src])[0]
            if not is_remote(first) and "{corruption}" not in src and not Path(first).exists():
                missing_path(f"stage {stage.name}: --{k}: source not found: {src}")
        summary.update(workers=ns.workers)
    return summary


# ============================================================================ the script

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SBATCH_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def script_text(value, what: str) -> str:
    """A value that goes into the generated script: one line, no control character (a newline would start a new
    shell line, and a ``#SBATCH`` line cannot be quoted across lines); refused in one line naming it."""
    text = str(value)
    bad = _CONTROL.search(text)
    if bad:
        from ..safe_fs import shorten

        raise ConfigError(f"{what} {shorten(text)} holds a control character ({bad.group()!r}); it cannot go into "
                          f"an sbatch script: rename it")
    return text


def sbatch_value(value, what: str) -> str:
    """The value of a ``#SBATCH --opt=value`` line, quoted for sbatch's own parser where it is not plain (sbatch
    reads "..." and '...' and backslash escapes, and an unquoted ``#`` starts a comment there); bash sees the whole
    line as a comment."""
    text = script_text(value, what)
    if _SBATCH_PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_filename(path: str) -> str:
    """A folder for ``--output``: ``%`` doubled (sbatch reads ``%j``, ``%x``, ... in file names)."""
    return str(path).replace("%", "%%")


def render(stage: Stage, python: Optional[str] = None, code_dir: Optional[str] = None, log: Optional[str] = None,
           pass_args: bool = False, note: str = "") -> str:
    """The sbatch script of a stage: the set-up lines, then ``srun python -m megadigpt <command> <args>``.
    ``python``: the interpreter ``megadigpt submit`` ran with, put first on PATH when the stage has no set-up lines
    (its folder holds ``python``: a venv or conda env; else it is named in full); ``code_dir``: the code snapshot,
    first on ``PYTHONPATH``; ``pass_args``: append ``"$@"`` (the static templates: ``sbatch script.sbatch
    key=value ...``)."""
    from ..config import check_text

    o = stage.slurm
    script_text(stage.name, "stage name")
    sb = [f"--job-name={sbatch_value(o.job_name or 'megadigpt-' + stage.name, 'job name')}", f"--nodes={o.nodes}",
          f"--ntasks-per-node={o.tasks_per_node}"]
    if o.gpus_per_node:
        sb.append(f"--gpus-per-node={o.gpus_per_node}")
    if o.cpus_per_task:
        sb.append(f"--cpus-per-task={o.cpus_per_task}")
    if o.mem is not None:
        sb.append(f"--mem={sbatch_value(o.mem, 'mem')}")
    sb.append(f"--time={sbatch_value(o.time, 'time')}")
    for k in ("partition", "account", "qos", "constraint", "reservation"):
        if getattr(o, k):
            sb.append(f"--{k}={sbatch_value(getattr(o, k), k)}")
    if o.exclusive:
        sb.append("--exclusive")
    if o.signal_seconds:
        sb.append(f"--signal=USR1@{o.signal_seconds}")  # to the tasks, not the batch shell (no "B:")
    sb.append("--requeue" if o.requeue else "--no-requeue")
    sb += ["--open-mode=append", f"--output={sbatch_value(log or 'slurm-%x-%j.out', 'the job log path')}"]
    sb += [script_text(a, "sbatch option") for a in o.sbatch]  # verbatim, one line each
    py = "python"
    setup = [check_text(line, f"stage {stage.name}: setup line") for line in o.setup]
    if setup:
        setup = ["# set-up (setup: of the chain and the stage, --setup of megadigpt submit)",
                 "set +u  # activation scripts (conda, venv, environment modules) may read unset variables",
                 *setup, "set -u"]
    elif python:
        bin_dir = Path(script_text(python, "python")).parent
        if (bin_dir / "python").exists():
            setup = [f"export PATH={shlex.quote(str(bin_dir))}${{PATH:+:$PATH}}  # the python megadigpt submit ran "
                     f"with (no setup: lines given)"]
        else:  # e.g. /usr/bin/python3 without /usr/bin/python
            py = shlex.quote(str(python))
    else:  # the static templates
        setup = ["# set-up, if the shell that runs sbatch has not done it (sbatch exports its environment):",
                 "# module load ...; source ~/venvs/megadigpt/bin/activate"]
    cmd = " ".join([py, "-m", "megadigpt", shlex.quote(script_text(stage.command, "command"))] +
                   [shlex.quote(script_text(a, f"stage {stage.name}: argument")) for a in stage.args])
    if pass_args:
        cmd += ' "$@"'
    for k in o.env:
        if not (isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)):
            raise ConfigError(f"env name {k!r} is not a shell variable name (letters, digits and _)")
    env = "".join(f"export {k}={shlex.quote(script_text(v, f'env {k}'))}\n" for k, v in o.env.items())
    if not o.requeue:
        env += "export MEGADIGPT_REQUEUE=0\n"
    env += "".join(line + "\n" for line in setup)
    # the snapshot first on the import path; PYTHONSAFEPATH (python >= 3.11): `-m` does not put the working
    # directory first, where a checkout the job was submitted from would win over the snapshot
    code = (f"# the code snapshot taken at submission\n"
            f"MEGADIGPT_CODE={shlex.quote(script_text(code_dir, 'the code snapshot folder'))}\n"
            f"export PYTHONPATH=\"$MEGADIGPT_CODE${{PYTHONPATH:+:$PYTHONPATH}}\"\n"
            f"export PYTHONSAFEPATH=1\n"
            f"{py} -c {shlex.quote(_CHECK_SNAPSHOT)} \"$MEGADIGPT_CODE\" || exit 2\n") if code_dir else ""
    head = "\n".join(f"#SBATCH {a}" for a in sb)
    return f"""#!/bin/bash
# megadigpt {stage.command} ({stage.name}){note}
{head}

set -uo pipefail
# Rank, world size and local rank: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID in each task (one per GPU).
# The rendezvous: the first node of the allocation, by the address SLURM itself uses to reach it.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE  # from the submitting shell, they would override SLURM's
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=${{MEGADIGPT_MASTER_ADDR:-$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')}}
export MASTER_PORT=${{MEGADIGPT_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}}
export SRUN_CPUS_PER_TASK=${{SLURM_CPUS_PER_TASK:-1}}  # srun >= 22.05 does not inherit --cpus-per-task
export NCCL_DEBUG=${{NCCL_DEBUG:-WARN}}  # more NCCL settings: slurm/README.md
{env}{code}
echo "megadigpt: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST: $SLURM_NTASKS tasks, \\
rendezvous $MASTER_ADDR:$MASTER_PORT, $(date -Is)"
srun --kill-on-bad-exit=1 {cmd}
rc=$?
echo "megadigpt: exit $rc at $(date -Is) ({EXIT_CODES})"
exit $rc
"""


# The scripts in slurm/: the paper's ViT-L/14 path. Data paths and weights come as key=value arguments.
# cpus_per_task: the config's data.num_workers + 1 per GPU (digpt_vitl14_merged: 10 workers)
TEMPLATES = {
    "pretrain_merged": ("pretraining on the merged ~36M-image dataset", "pretrain",
                        ["--config", "digpt_vitl14_merged"], dict(nodes=8, cpus_per_task=11, time="48:00:00")),
    "finetune_in21k": ("ImageNet-21K intermediate fine-tuning at 448 px", "finetune",
                       ["--config", "finetune_vitl14_in21k_448"], dict(nodes=4, cpus_per_task=10,
                                                                        time="48:00:00")),
    "finetune_in1k": ("ImageNet-1K fine-tuning at 448 px", "finetune", ["--config", "finetune_vitl14_in1k_448"],
                      dict(nodes=2, cpus_per_task=10, time="24:00:00")),
    "probe": ("linear probe of every block + k-NN", "probe", ["--config", "finetune_vitb16_in1k"],
              dict(nodes=1, cpus_per_task=10, time="08:00:00")),
    # one GPU: ImageNet-C's 3.75M images dominate (a ViT-L/14 at 448 px: ~2 h on one H100)
    "eval": ("ImageNet val, ReaL, V2, A, R, Sketch, C", "eval", [],
             dict(nodes=1, gpus_per_node=1, cpus_per_task=10, time="03:00:00")),
    # 8 GPUs x micro-batch 2 = the recipe's batch 16 (SyncBatchNorm across the GPUs)
    "segment_ade20k": ("ADE20K semantic segmentation, UperNet, 160k iterations at batch 16", "segment",
                       ["--config", "segment_ade20k_vitl14"], dict(nodes=1, cpus_per_task=10, time="48:00:00")),
    # 128 x 8 GPUs x micro-batch 32 = clip_vitl14_laion's 32,768 pairs per step, all contrasted with each other;
    # on fewer nodes the steps accumulate and each micro-step contrasts micro-batch x ranks pairs (said at start)
    "clip_laion": ("image-text fine-tuning on LAION with an OpenCLIP text tower (zero-shot)", "clip",
                   ["--config", "clip_vitl14_laion"], dict(nodes=128, cpus_per_task=9, time="48:00:00")),
}

_TEMPLATE_USE = {
    "pretrain": "sbatch [--nodes N] {path} data.source=/data/merged/train.jsonl target.weights=/weights/h14.bin",
    "finetune": "sbatch [--nodes N] {path} --init-from RUN --train /data/train --val /data/val",
    "probe": "sbatch {path} WEIGHTS --train /data/train --val /data/val --out DIR",
    "eval": "sbatch {path} runs/finetune_vitl14_in1k_448 --which best_ema --imagenet /data/imagenet/val --out DIR",
    "segment": "sbatch {path} --init-from RUN --train /data/ADEChallengeData2016 --val /data/ADEChallengeData2016",
    "clip": "sbatch [--nodes N] {path} --init-from RUN --train '/data/laion/{{00000..41407}}.tar' "
            "--zeroshot /data/imagenet/val text.weights=/weights/open_clip_vitl14.pt",
}


def render_template(name: str) -> str:
    title, command, args, opts = TEMPLATES[name]
    stage = Stage(name, command, args, "", slurm_options(opts, stage_defaults(command)))
    use = _TEMPLATE_USE[command].format(path=f"slurm/{name}.sbatch")
    note = (f": {title}\n# written by megadigpt/launch/slurm.py (TEMPLATES); `megadigpt submit` writes the same "
            f"script with a code snapshot.\n#   {use}\n# sbatch options on the command line override the lines below.")
    return render(stage, pass_args=True, note=note)


def write_templates(folder) -> List[Path]:
    folder = Path(folder)
    out = []
    for name in TEMPLATES:
        p = folder / f"{name}.sbatch"
        p.write_text(render_template(name))
        p.chmod(0o755)
        out.append(p)
    return out


# ============================================================================ chains


def resolve_chain_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    q = SLURM_DIR / "chains" / (name_or_path if name_or_path.endswith((".yaml", ".yml")) else name_or_path + ".yaml")
    if q.is_file():
        return q
    known = sorted(x.stem for x in (SLURM_DIR / "chains").glob("*.yaml"))
    raise ConfigError(f"chain not found: {name_or_path} (a YAML file, or one of: {', '.join(known) or 'none'})")


_STAGE_REF = re.compile(r"\{([A-Za-z0-9_-]+)\}")  # {name}: a stage name (letters, digits, - and _)
_STAGE_KEYS = ("name", "command", "config", "run_dir", "init_from", "weights", "model", "args", "setup", "slurm")
_CHAIN_KEYS = ("run_root", "setup", "slurm", "stages")


def load_chain(path, run_root: Optional[str] = None, cli_slurm: Optional[dict] = None):
    """A chain YAML -> (stages in order, the chain's root folder). ``{name}`` in a stage's strings is that earlier
    stage's run directory. A stage's sbatch options: its command's defaults (``STAGE_DEFAULTS``), then the chain's
    ``slurm:``, then its own; options given on the command line (``cli_slurm``) win over the YAML's, for every
    stage. Its set-up lines: the chain's ``setup:``, then its own, then the command line's."""
    from ..config import read_yaml

    spec = read_yaml(path, "chain")  # safe tags only; binary, empty, duplicate keys: one line
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ConfigError(f"{path}: a chain has `stages:` (a list) and optional `run_root:`, `setup:`, `slurm:`")
    for k in spec:
        if k not in _CHAIN_KEYS:
            raise ConfigError(f"{path}: unknown key {k}{suggest(k, _CHAIN_KEYS)}; known: {', '.join(_CHAIN_KEYS)}")
    root = Path(run_root or spec.get("run_root") or "runs/" + Path(path).stem).resolve()
    slurm_options(spec.get("slurm"), where="slurm")  # its keys checked once, before any stage
    chain_setup = setup_lines(spec.get("setup"), f"{path}: setup")
    cli = dict(cli_slurm or {})
    cli_setup = cli.pop("setup", None) or []
    stages, dirs = [], {}
    for i, st in enumerate(spec["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(st, dict):
            raise ConfigError(f"{where} must be a mapping")
        for k in st:
            if k not in _STAGE_KEYS:
                raise ConfigError(f"{where}: unknown key {k}{suggest(k, _STAGE_KEYS)}; known: {', '.join(_STAGE_KEYS)}")
        name, command = st.get("name"), st.get("command")
        if not name or not str(name).replace("_", "").replace("-", "").isalnum() or name in dirs:
            raise ConfigError(f"{where}: each stage needs a unique name (letters, digits, - and _), got {name!r}")
        if command not in COMMANDS:
            raise ConfigError(f"{where}: command must be one of {', '.join(COMMANDS)}, got {command!r}")

        def expand(v, what):
            """``{name}`` -> that earlier stage's run directory; a brace set (``{00000..41407}``, ``{a,b}``) is left
            as it is, for the command to expand; ``{{`` and ``}}`` stand for single braces."""
            def ref(m):
                if m.group(1) not in dirs:
                    raise ConfigError(f"{where}: {what} refers to {{{m.group(1)}}}, which is not an earlier stage "
                                      f"(earlier: {', '.join(dirs) or 'none'})")
                return dirs[m.group(1)]

            parts = re.split(r"(\{\{|\}\})", str(v))  # escaped braces are not references
            return "".join({"{{": "{", "}}": "}"}.get(p) or _STAGE_REF.sub(ref, p) for p in parts)

        run_dir = str(Path(expand(st.get("run_dir", root / name), "run_dir")).resolve())
        args = [expand(a, "args") for a in (st.get("args") or [])]
        if not isinstance(st.get("args") or [], list):
            raise ConfigError(f"{where}: args is a list")
        if st.get("config"):
            args = _with_option(args, "--config", expand(st["config"], "config"))
        if command in TRAINING:
            args = _with_option(args, "--run-dir", run_dir)
            if st.get("init_from"):
                val = expand(st["init_from"], "init_from")
                args = (_with_option(args, "--init-from", val) if command != "pretrain"
                        else args + [f"train.init_from={val}"])
        else:
            args = _with_option(args, "--out", run_dir)
            first = st.get("weights") if command == "probe" else st.get("model")
            if first:
                args = [expand(first, "weights" if command == "probe" else "model")] + args
        for k, ok in (("init_from", TRAINING), ("weights", ("probe",)),
                      ("model", ("eval",))):
            if st.get(k) and command not in ok:
                raise ConfigError(f"{where}: {k} is for {' / '.join(ok)} stages")
        opts = slurm_options(spec.get("slurm"), stage_defaults(command), where="slurm")
        opts = slurm_options(st.get("slurm"), opts, where=f"{where}.slurm")
        opts = replace(opts, **cli, setup=chain_setup + setup_lines(st.get("setup"), f"{where}: setup") + cli_setup)
        stages.append(Stage(name, command, args, run_dir, opts, list(dirs.values())))
        dirs[name] = run_dir
    return stages, root


def single_stage(command: str, args: List[str], cli_slurm: dict) -> Stage:
    """``megadigpt submit <command> <args>``: the stage writes to its --run-dir / --out (pretrain, finetune, segment
    and clip: else the config's train.run_dir), made absolute."""
    from ..config import FinetuneRunConfig, load_config

    ns = parse_stage_args(command, args)
    out = stage_outputs(command, ns)
    if out is None and command == "pretrain":
        out = load_config(ns.config, pretrain_overrides(ns)).train.run_dir
    elif out is None and command == "finetune":
        out = load_config(ns.config, finetune_overrides(ns), root=FinetuneRunConfig).train.run_dir
    elif out is None and command == "segment":
        from ..segment_config import load_segment_config

        out = load_segment_config(ns.config, overrides_of(ns)).train.run_dir
    elif out is None and command == "clip":
        from ..clip_config import load_clip_config

        out = load_clip_config(ns.config, overrides_of(ns)).train.run_dir
    if out is None:
        raise ConfigError(f"megadigpt submit {command}: give --out (the job's results, logs and code snapshot go "
                          f"there)")
    run_dir = str(Path(out).resolve())
    opt = "--out" if command in ("probe", "eval") else "--run-dir"
    return Stage(command, command, _with_option(args, opt, run_dir), run_dir,
                 replace(stage_defaults(command), **cli_slurm))


def chain_from(stages: List[Stage], first: str) -> List[Stage]:
    """The stages from ``first`` on; the earlier ones must have run (their outputs are then ordinary inputs)."""
    names = [s.name for s in stages]
    if first not in names:
        raise ConfigError(f"--from {first}: no such stage (stages: {', '.join(names)})")
    i = names.index(first)
    for done in stages[:i]:
        if not Path(done.run_dir).exists():
            raise ConfigError(f"--from {first}: the earlier stage {done.name} has no output at {done.run_dir}")
    rest = stages[i:]
    queued = {st.run_dir for st in rest}
    for st in rest:
        st.pending = [d for d in st.pending if d in queued]
    return rest


# ============================================================================ submission


class SubmitError(RuntimeError):
    pass


def _sbatch(script: Path, after: List[str]) -> str:
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: run `megadigpt submit` on a SLURM login node (or use --dry-run)")
    cmd = ["sbatch", "--parsable"]
    if after:
        cmd += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    p = subprocess.run(cmd + [str(script)], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise SubmitError(f"sbatch {script} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip().split(";")[0]


def _cancel(job_ids: List[str]):
    if job_ids and shutil.which("scancel"):
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)


def _job_log(stage: Stage) -> str:
    """The job's ``--output``: ``<run_dir>/slurm/%j.out`` (a ``%`` of the run directory doubled)."""
    return sbatch_filename(Path(stage.run_dir) / "slurm") + "/%j.out"


def _new_dirs(path: Path) -> Optional[Path]:
    """The topmost folder of ``path`` that does not exist yet (what a check that mkdirs would create)."""
    top = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        top = p
    return top


def submit(stages: List[Stage], root: Path, dry_run: bool = False, after: Optional[str] = None,
           chain: Optional[Path] = None, out=None) -> List[dict]:
    """Validate every stage, snapshot the code into ``root/code``, write each stage's script to
    ``<run_dir>/slurm/job.sbatch`` and submit them in order, each ``afterok`` on the one before (the first on
    ``after``, a job id, if given); a chain's YAML is kept as ``root/chain.yaml``. Nothing is queued unless every stage validates; if a later sbatch fails, the
    stages already queued are cancelled."""
    from .snapshot import snapshot

    out = out or sys.stdout  # (looked up now, not when the module was imported: a redirected stdout counts)
    root = Path(root).resolve()
    script_text(root, "run root")
    for s in stages:  # every value each script will hold, checked before anything is validated, made or queued
        script_text(s.run_dir, f"stage {s.name}: run directory")
        render(s, python=sys.executable, code_dir=str(root / "code" / ("0" * 12)), log=_job_log(s))
    created = [d for d in {_new_dirs(Path(s.run_dir)) for s in stages} | {_new_dirs(root)} if d]
    warnings: List[str] = []
    try:
        if dry_run:  # a preview: inputs missing on this machine are warnings (the cluster mounts them), the rest errors
            with preview_paths() as warnings:
                summaries = [validate_stage(s) for s in stages]
        else:
            summaries = [validate_stage(s) for s in stages]
    finally:
        if dry_run:  # the checks may create run directories; a dry run leaves nothing behind
            for d in created:
                if d.is_dir() and not any(p.is_file() for p in d.rglob("*")):
                    shutil.rmtree(d)
    for w in warnings:
        print(f"megadigpt submit: warning: {w} (not on this machine; the job needs it where it runs)",
              file=sys.stderr)
    for s, summ in zip(stages, summaries):
        need = (summ.get("workers") or 0) + 1
        if s.slurm.cpus_per_task and s.slurm.cpus_per_task < need:
            print(f"megadigpt submit: note: stage {s.name}: cpus_per_task {s.slurm.cpus_per_task} < data loading "
                  f"workers + 1 ({need})", file=sys.stderr)
    snap = snapshot(root, dry_run=dry_run)
    if chain and not dry_run:  # (a fresh file renamed into place: never written through a planted link)
        write_atomic(root / "chain.yaml", Path(chain).read_bytes(), what="chain copy")
    code_dir = snap["path"]
    python = sys.executable
    records, queued = [], []
    prev = after
    try:
        for s, summ in zip(stages, summaries):
            log_dir = Path(s.run_dir) / "slurm"
            script = render(s, python=python, code_dir=code_dir, log=_job_log(s),
                            note=f"\n# written by `megadigpt submit` at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            dep = [prev] if prev else []
            rec = {"stage": s.name, "command": s.command, "run_dir": s.run_dir, "nodes": s.slurm.nodes,
                   "tasks": s.slurm.world_size, "after": dep, "script": str(log_dir / "job.sbatch")}
            if dry_run:
                dep_txt = f" --dependency=afterok:{dep[0]} --kill-on-invalid-dep=yes" if dep else ""
                print(f"# ---- stage {s.name}: sbatch{dep_txt} {log_dir / 'job.sbatch'}\n{script}", file=out)
                prev = f"<job of {s.name}>"
                records.append(rec)
                continue
            log_dir.mkdir(parents=True, exist_ok=True)  # a missing --output folder fails a job silently
            path = write_atomic(log_dir / "job.sbatch", script, what="job script", mode=0o755)
            job = _sbatch(path, dep)
            queued.append(job)
            rec.update(job_id=job, submitted=time.strftime("%Y-%m-%dT%H:%M:%S%z"), code=code_dir)
            with open_append(log_dir / "jobs.jsonl", what="job record") as f:
                f.write(json.dumps(rec) + "\n")
            records.append(rec)
            prev = job
    except SubmitError:
        _cancel(queued)
        raise
    if not dry_run:
        with open_append(root / "submissions.jsonl", what="submission record") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": snap,
                                "jobs": records, "argv": sys.argv}) + "\n")
        for r in records:
            print(f"{r['stage']:<12} job {r['job_id']:<10} {r['nodes']} node(s), {r['tasks']} tasks"
                  f"{'  after ' + r['after'][0] if r['after'] else ''}  -> {r['run_dir']}", file=out)
        print(f"code snapshot: {code_dir}{' (unchanged)' if snap.get('reused') else ''}; logs: <run_dir>/slurm/"
              f"<job id>.out", file=out)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description="write the sbatch templates (slurm/*.sbatch)")
    p.add_argument("--templates", required=True, help="the folder to write them to")
    a = p.parse_args(argv)
    for path in write_templates(a.templates):
        print(path)


if __name__ == "__main__":
    main()

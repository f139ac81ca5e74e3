"""The table of ``megadigpt`` commands: every command's arguments (:func:`build_parser`), the argument types and
the helpers that turn parsed arguments into config overrides, and :func:`run`, the one-line errors and exit codes
around a command. Below everything that reads a ``megadigpt`` command line: the CLI (``megadigpt/cli.py``, which
adds what each command runs), ``submit`` (``launch/slurm.py``), ``plan``/``bench`` (``perf/``) and ``python -m
megadigpt.train.segment``. Nothing here imports torch."""

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .config import ConfigError

DESCRIPTION = "``megadigpt <command>``: the one entry point for users, launchers and SLURM scripts."


def rank0() -> bool:
    """Whether this process is rank 0 (from the launcher's environment; no process group needed)."""
    from .distributed.env import discover

    return discover().rank == 0


def fail(msg: str) -> int:
    """Print ``msg`` as one ``megadigpt: error:`` line (rank 0 only) and return the exit status 2."""
    if rank0():  # always one line: a message from a library may carry newlines
        print(f"megadigpt: error: {' '.join(str(msg).splitlines())}", file=sys.stderr)
    return 2


class ArgumentError(ConfigError):
    """A bad command line, raised (not printed) so that it becomes the one ``megadigpt: error:`` line like every
    other bad input, also where a command line is parsed inside another command (``submit``)."""


class _Help(argparse.HelpFormatter):
    """``--help`` shows each option's default (where it has one worth showing: not None, not an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS)
                or isinstance(action, argparse._VersionAction)):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error of every other bad input: ``megadigpt: error: <command>: ...``, exit 2,
    no usage block (``--help`` still prints it). Subparsers inherit the class, and the help formatter that
    shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message):
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        raise ArgumentError(f"{where}{' '.join(message.split())}")


def _bounded(conv, lo, strict, what):
    def parse(text):
        try:
            v = conv(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v != v or abs(v) == float("inf") or (v <= lo if strict else v < lo):  # (v != v: NaN)
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    parse.__name__ = what  # argparse names the type in some messages
    return parse


POS_INT = _bounded(int, 0, True, "a positive integer")
NONNEG_INT = _bounded(int, 0, False, "an integer >= 0")
POS_FLOAT = _bounded(float, 0, True, "a positive number")
NONNEG_FLOAT = _bounded(float, 0, False, "a number >= 0")


def _at_least(n):
    return _bounded(int, n, False, f"an integer >= {n}")


def pretrain_overrides(args):
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    if getattr(args, "allow_schedule_change", False):
        overrides.append("train.allow_schedule_change=true")
    return overrides


# the shortcut flags of the training commands and the keys they set (a flag a command lacks is skipped)
SHORTCUTS = (("train", "data.train"), ("val", "data.val"), ("zeroshot", "data.zeroshot"), ("run_dir", "train.run_dir"),
             ("init_from", "train.init_from"), ("knn_layers", "probe.knn_layers"))


def overrides_of(args) -> List[str]:
    """The overrides a fine-tuning, probe, eval, segment or clip command line means: its ``section.key=value``
    words, then its shortcut flags (:data:`SHORTCUTS`) and ``--allow-schedule-change``."""
    overrides = list(args.overrides)
    for flag, key in SHORTCUTS:
        v = getattr(args, flag, None)
        if v:
            overrides.append(f"{key}={v}")
    if getattr(args, "allow_schedule_change", False):
        overrides.append("train.allow_schedule_change=true")
    return overrides


finetune_overrides = overrides_of  # (the name cli and launch/slurm use for fine-tuning's)


def parse_csv(text, conv=str, what="--values", positive=False):
    try:
        out = [conv(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} takes comma-separated integers, got {text!r}") from None
    if positive and not all(v > 0 for v in out):
        raise ConfigError(f"{what} takes positive integers, got {text!r}")
    return out


def parse_onoff(v: str) -> bool:
    if v not in ("on", "off"):
        raise ConfigError(f"expected on or off, got {v!r}")
    return v == "on"


def parse_models(text, img_size=None, what="--models"):
    """``vit_base/16,vit_large/14`` (patch optional: 16) -> [(arch, patch)]. A malformed item, an unknown
    architecture, or a patch that does not divide ``img_size`` (when given) is one line."""
    from .model.vit import VIT_SIZES

    items = [v.strip() for v in str(text).split(",")]
    if not any(items):
        raise ConfigError(f"{what} is empty; write arch/patch, e.g. vit_large/14")
    out = []
    for item in items:
        if not item:
            raise ConfigError(f"{what} {text!r} has an empty item; write arch/patch separated by commas, e.g. "
                              f"vit_base/16,vit_large/14")
        arch, _, patch = item.partition("/")
        arch, patch = arch.strip(), patch.strip()
        if not arch or item.count("/") > 1 or (patch and not re.fullmatch(r"[0-9]{1,4}", patch)) or \
                (patch and int(patch) < 1):
            raise ConfigError(f"model {item!r}: write arch/patch with a positive patch size, e.g. vit_large/14")
        arch = arch if arch.startswith("vit_") else f"vit_{arch}"
        if arch not in VIT_SIZES:
            raise ConfigError(f"unknown model {arch!r} ({what} {item!r}): model.arch must be one of "
                              f"{', '.join(VIT_SIZES)}")
        p = int(patch or 16)
        if img_size is not None and (p > img_size or img_size % p):
            raise ConfigError(f"model {item!r}: patch {p} does not divide the image size {img_size} (model.img_size)"
                              f"; choose a patch that divides it")
        out.append((arch, p))
    return out


def is_plan_json(path) -> bool:
    """A ``plan --json`` file (a list of plan rows): a later plan may replace it without --force."""
    import json

    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and {"arch", "patch", "stage", "total_gib"} <= set(r)
                                          for r in rows)


def _remote_args(p) -> None:
    """--cache-dir / --io-timeout / --io-retries: how a command without a config reads remote shards (what
    ``data.cache_dir``, ``data.io_timeout_s`` and ``data.io_retries`` are for training)."""
    p.add_argument("--cache-dir", default=None, help="local copies of remote shards (default: $MEGADIGPT_CACHE or "
                                                     "~/.cache/megadigpt/shards)")
    # the defaults of megadigpt.data.remote (TIMEOUT_S, RETRIES; not imported here: the package imports torch)
    p.add_argument("--io-timeout", type=POS_FLOAT, default=60.0,
                   help="seconds without progress before a remote read is retried")
    p.add_argument("--io-retries", type=NONNEG_INT, default=3, help="retries of a remote shard")


OVERRIDES_HELP = ("config overrides, after or between the options: train.max_steps=100 data.num_workers=4 (every key: "
                  "docs/config.md, megadigpt show-config; quote values the shell would expand: "
                  "data.source='dir/{000000..000009}.tar')")


def add_segment_parser(sub) -> argparse.ArgumentParser:
    """``megadigpt segment``'s subparser (``build_parser`` and ``python -m megadigpt.train.segment``)."""
    sg = sub.add_parser("segment", help="semantic segmentation transfer: UperNet on the encoder, ADE20K protocol "
                                        "(resumes automatically from its run directory)")
    sg.add_argument("--config", default="segment_ade20k_vitb16", help="a YAML file or a built-in segmentation config")
    sg.add_argument("--train", default=None, help="shortcut for data.train=...")
    sg.add_argument("--val", default=None, help="shortcut for data.val=...")
    sg.add_argument("--init-from", dest="init_from", default=None, help="shortcut for train.init_from=...")
    return add_run_arguments(sg)


def add_run_arguments(parser) -> argparse.ArgumentParser:
    """What every training command takes last: ``--run-dir``, ``--allow-schedule-change``, the deepspeed
    launcher's ``--local_rank`` (hidden) and the ``section.key=value`` overrides."""
    parser.add_argument("--run-dir", default=None, help="shortcut for train.run_dir=...")
    parser.add_argument("--allow-schedule-change", action="store_true",
                        help="resume with another lr schedule (max_steps, lr, warm-up); recorded in metrics.jsonl")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    return parser


SUBMITTABLE = ("pretrain", "finetune", "segment", "clip", "probe", "eval")  # the commands `megadigpt submit` queues
RESERVE_GIB = 4.0  # megadigpt.perf.memory.RESERVE_GIB (not imported here: it would load torch for every command)


def build_parser(handlers: Optional[Dict[str, Callable]] = None) -> argparse.ArgumentParser:
    """Every command and its arguments. ``handlers``: what each command runs, by the name of its function
    (``cmd_pretrain``: see megadigpt/cli.py); without them the parser only reads command lines (``fn`` is
    None), as ``submit`` does."""
    from . import __version__

    h = handlers or {}

    p = Parser(prog="megadigpt", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"megadigpt {__version__}")
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    pt = sub.add_parser("pretrain", help="D-iGPT pretraining (resumes automatically from its run directory)")
    pt.add_argument("--config", default="demo", help="a YAML file or a built-in config name (default: demo)")
    pt.add_argument("--data", default=None, help="shortcut for data.source=...: shards, a folder, or 'demo'")
    pt.add_argument("--run-dir", default=None, help="shortcut for train.run_dir=...")
    pt.add_argument("--allow-schedule-change", action="store_true",
                    help="resume with another lr schedule (max_steps, epochs, lr, warm-up); recorded in metrics.jsonl")
    pt.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    pt.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    pt.set_defaults(fn=h.get("cmd_pretrain"))

    ft = sub.add_parser("finetune", help="classification fine-tuning (resumes automatically from its run directory)")
    ft.add_argument("--config", default="finetune_vitb16_in1k", help="a YAML file or a built-in fine-tuning config")
    ft.add_argument("--train", default=None, help="shortcut for data.train=...")
    ft.add_argument("--val", default=None, help="shortcut for data.val=...")
    ft.add_argument("--init-from", dest="init_from", default=None, help="shortcut for train.init_from=...")
    ft.add_argument("--run-dir", default=None, help="shortcut for train.run_dir=...")
    ft.add_argument("--allow-schedule-change", action="store_true",
                    help="resume with another lr schedule (max_steps, epochs, lr, warm-up); recorded in metrics.jsonl")
    ft.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ft.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    ft.set_defaults(fn=h.get("cmd_finetune"))

    add_segment_parser(sub).set_defaults(fn=h.get("cmd_segment"))  # ADE20K-style semantic segmentation (UperNet)

    cl = sub.add_parser("clip", help="image-text contrastive fine-tuning of the encoder with an OpenCLIP text tower "
                                     "(the paper's zero-shot stage; resumes automatically from its run directory)")
    cl.add_argument("--config", default="clip_vitl14_laion", help="a YAML file or a built-in clip config")
    cl.add_argument("--train", default=None, help="shortcut for data.train=...: image-text shards (<key>.jpg + <key>.txt)")
    cl.add_argument("--val", default=None, help="shortcut for data.val=...: held-out pairs for retrieval R@1/5/10")
    cl.add_argument("--zeroshot", default=None, help="shortcut for data.zeroshot=...: a labelled set with class names")
    cl.add_argument("--init-from", dest="init_from", default=None, help="shortcut for train.init_from=...: the image "
                                                                        "tower's encoder")
    add_run_arguments(cl).set_defaults(fn=h.get("cmd_clip"))
    pr = sub.add_parser("probe", help="linear probe of every block (best block reported) and k-NN")
    pr.add_argument("weights", nargs="?", default=None, help="a pretraining run/checkpoint, a timm folder, a "
                                                             ".safetensors or a reference .pth")
    pr.add_argument("--random-init", action="store_true", help="probe a randomly initialised model (a baseline)")
    pr.add_argument("--config", default="finetune_vitb16_in1k", help="model/data/probe settings (a fine-tuning config)")
    pr.add_argument("--train", default=None, help="labelled images the heads train on (data.train)")
    pr.add_argument("--val", default=None, help="labelled images they are scored on (data.val)")
    pr.add_argument("--out", required=True, help="folder for results.json / results.md")
    pr.add_argument("--force", action="store_true", help="replace results files megadigpt did not write")
    pr.add_argument("--knn-layers", default=None, help="shortcut for probe.knn_layers=...")
    pr.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    pr.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    pr.set_defaults(fn=h.get("cmd_probe"))

    ev = sub.add_parser("eval", help="top-1/top-5 of a fine-tuned classifier, or zero-shot and retrieval of a clip "
                                     "model, on any labelled set (--set NAME=SOURCE) and ImageNet val, ReaL, V2, A, R, "
                                     "Sketch, C (mCE)")
    ev.add_argument("model", help="a fine-tuning or clip run directory (its best/) or an exported classifier or "
                                  "clip folder")
    ev.add_argument("--which", default="best", help="in a run directory: best | last | best_ema | last_ema")
    src = "a source: class folders, shards, an index folder, a sample list, or URLs (https://, s3://, pipe:)"
    for name, what in (("imagenet", "ImageNet-1K val, 1000 synset classes"),
                       ("real", "ReaL: the ImageNet val images (original file names or shard keys)"),
                       ("v2", "ImageNet-V2: classes named 0..999"), ("a", "ImageNet-A: 200 synset classes"),
                       ("r", "ImageNet-R: 200 synset classes"), ("sketch", "ImageNet-Sketch: 1000 synset classes")):
        ev.add_argument(f"--{name}", default=None, help=f"{what}; {src}")
    ev.add_argument("--c", default=None, help="ImageNet-C: a <corruption>/<severity>/ tree of sources, or a template "
                                              "with {corruption} and {severity} (e.g. https://host/c/{corruption}/"
                                              "{severity}/{000000..000009}.tar)")
    ev.add_argument("--set", dest="sets", action="append", default=None, metavar="NAME=SOURCE",
                    help="any labelled set, scored top-1/top-5 under its own NAME (repeatable), e.g. "
                         "cifar10=data/cifar10/test-{000000..000001}.tar; " + src + "; its classes (classes.txt "
                         "beside the shards, or class folders) must be the model's head: as many and, where both "
                         "have names, the same names in the same order")
    ev.add_argument("--pairs", action="append", default=None, metavar="NAME=SOURCE",
                    help="image-text models: held-out pairs (.jpg + .txt, as megadigpt clip reads them) scored by "
                         "image->text and text->image R@1/5/10 under NAME (repeatable); " + src)
    ev.add_argument("--templates", default=None, choices=["openai", "simple"],
                    help="image-text models: zero-shot prompts, open_clip's 80 openai or 18 simple templates of each "
                         "class name (default: the clip run's clip.templates)")
    ev.add_argument("--real-labels", default=None, help="real.json (default: timm's bundled copy)")
    ev.add_argument("--out", default=None, help="folder for eval.json / eval.md")
    ev.add_argument("--force", action="store_true", help="replace eval files megadigpt did not write")
    ev.add_argument("--batch", type=POS_INT, default=64, help="images per forward pass, per GPU")
    ev.add_argument("--limit", type=POS_INT, default=None, help="at most this many images per set (a quick look)")
    ev.add_argument("--loader", default="auto", choices=["auto", "dali", "torch"],
                    help="image decoding: NVIDIA DALI or torch DataLoader workers (auto: DALI where it is installed)")
    ev.add_argument("--workers", type=NONNEG_INT, default=4, help="data-loading workers (DALI threads) per GPU")
    _remote_args(ev)
    ev.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ev.set_defaults(fn=h.get("cmd_eval"))

    sc = sub.add_parser("show-config", help="print the resolved config (any tree: pretraining, fine-tuning, "
                                             "segmentation); --list names the built-in configs")
    sc.add_argument("--config", default="demo", help="a built-in config's name or a YAML path (default: demo)")
    sc.add_argument("--list", action="store_true", help="name the built-in configs, one line each, by tree")
    sc.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    sc.set_defaults(fn=h.get("cmd_show_config"))

    cv = sub.add_parser("convert", help="DeepSpeed checkpoint -> timm / reference D-iGPT / fp32, and back")
    cv.add_argument("input", help="a run dir, a checkpoint dir, a megadigpt .safetensors, or a reference .pth")
    cv.add_argument("--to", required=True, choices=["timm", "reference", "fp32"],
                    help="timm: a folder timm loads (local-dir:); reference: the D-iGPT reference code's .pth; fp32: "
                         "one .safetensors of the consolidated weights")
    cv.add_argument("--out", required=True, help="timm: a folder (not named like a file, x.safetensors); reference: "
                                                 "a .pth; fp32: a .safetensors (never inside a run's checkpoints/, "
                                                 "never the input)")
    cv.add_argument("--force", action="store_true", help="replace existing files megadigpt did not write")
    cv.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    cv.add_argument("--num-heads", type=POS_INT, default=None, help="timm: heads (default: from the run or the width)")
    cv.add_argument("--segment-grid", type=_at_least(2), default=2, help="reference: the segment grid (its mask buffer)")
    cv.add_argument("--no-final-norm", action="store_true",
                    help="timm: no fc_norm after the mean-pooling (model(x) is then the probe's features)")
    cv.set_defaults(fn=h.get("cmd_convert"))

    data = sub.add_parser("data", help="dataset tooling: validate, build shards, index shards, merge, ImageNet-21K "
                                       "labels")
    dsub = data.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("validate", help="decode every sample; write clean.jsonl and bad.jsonl (and clean shards)")
    v.add_argument("source", help="shards, an image folder, or a sample list (.jsonl)")
    v.add_argument("--out", required=True, help="folder for clean.jsonl / bad.jsonl")
    v.add_argument("--workers", type=POS_INT, default=os.cpu_count() or 1, help="decoding processes")
    v.add_argument("--shards", default=None, help="also write clean shards to this folder")
    v.add_argument("--shard-size", type=POS_INT, default=10000, help="samples per clean shard")
    _remote_args(v)
    v.set_defaults(fn=h.get("cmd_data"))
    b = dsub.add_parser("build", help="write webdataset shards + DALI indexes + manifest.json + the sample index "
                                      "<out>/index (restartable)")
    b.add_argument("source", help="an image folder, a file list (.txt: path [label]), shards, or a sample list")
    b.add_argument("--out", required=True, help="the folder for the shards, their DALI indexes and manifest.json")
    b.add_argument("--shard-size", type=POS_INT, default=10000, help="samples per shard")
    b.add_argument("--prefix", default="shard", help="shard file names: <prefix>-000000.tar, ...")
    _remote_args(b)
    b.set_defaults(fn=h.get("cmd_data"))
    ix = dsub.add_parser("index", help="scan tar shards written elsewhere (e.g. img2dataset's) into a sample index "
                                       "folder, in parallel; <shards>/index is used automatically")
    ix.add_argument("source", nargs="+", help="shards: a folder, a pattern such as 'dir/{00000..01023}.tar', or URLs")
    ix.add_argument("--out", required=True, help="the index folder (written atomically; an old index is replaced)")
    ix.add_argument("--workers", type=POS_INT, default=os.cpu_count() or 1, help="scanning processes")
    _remote_args(ix)
    ix.set_defaults(fn=h.get("cmd_data"))
    mg = dsub.add_parser("merge", help="merge sources by weight into a sample index folder, or a sample list "
                                       "(.jsonl) for small merges (see docs/data.md)")
    mg.add_argument("spec", help="YAML: sources [{name, source, weight, expected_count}], total, "
                                 "exclude_duplicates_of")
    mg.add_argument("--out", required=True, help="the merged index folder (or a .jsonl sample list)")
    mg.add_argument("--seed", type=NONNEG_INT, default=0, help="the seed of the weighted sampling")
    _remote_args(mg)
    mg.set_defaults(fn=h.get("cmd_data"))
    lab = dsub.add_parser("in21k-labels", help="ImageNet-21K class indices from the synset folders present")
    lab.add_argument("root", help="folder of nXXXXXXXX synset folders")
    lab.add_argument("--variant", choices=["fall11", "winter21"], required=True,
                     help="the ImageNet-21K release: fall11 (21841 classes) or winter21 (19167)")
    lab.add_argument("--out", required=True, help="the JSON file of class indices")
    lab.add_argument("--force", action="store_true", help="replace an existing file megadigpt did not write")
    lab.set_defaults(fn=h.get("cmd_data"))

    sm = sub.add_parser("submit", help="SLURM: validate, snapshot the code, write the sbatch script into the run "
                                       "directory and submit it; or a chain of stages (afterok)",
                        description=f"megadigpt submit [options] {'|'.join(SUBMITTABLE)} <that command's "
                                    f"arguments>, or megadigpt submit [options] <chain.yaml | built-in chain>. "
                                    f"Options given here override the chain's for every stage; --setup lines run "
                                    f"after the chain's. The job runs `srun python -m megadigpt <command> ...` "
                                    f"with the code snapshot on PYTHONPATH.")
    sm.add_argument("--dry-run", action="store_true", help="print the scripts and sbatch commands; submit nothing")
    sm.add_argument("--after", default=None, help="a job id the first stage waits for (afterok)")
    sm.add_argument("--from", dest="from_stage", default=None, help="chain: start at this stage")
    sm.add_argument("--run-root", default=None, help="chain: the folder of the stages' run directories")
    sm.add_argument("--nodes", type=POS_INT, default=None, help="nodes per stage (default 1)")
    sm.add_argument("--gpus-per-node", dest="gpus_per_node", type=NONNEG_INT, default=None,
                    help="GPUs per node, one task each (default 8; eval 1); 0 on a CPU partition")
    sm.add_argument("--ntasks-per-node", dest="ntasks_per_node", type=POS_INT, default=None,
                    help="tasks per node (default: one per GPU; 1 without GPUs)")
    sm.add_argument("--cpus-per-task", dest="cpus_per_task", type=POS_INT, default=None,
                    help="CPUs per task: data.num_workers + 1 is a good start (SLURM's default is 1)")
    sm.add_argument("--mem", default=None, help="memory per node, e.g. 200G; 0: all of it")
    sm.add_argument("--time", default=None, help="the time limit, e.g. 48:00:00 (default 24:00:00; eval 02:00:00, "
                                                 "probe 08:00:00)")
    for k in ("partition", "account", "qos", "constraint", "reservation"):
        sm.add_argument(f"--{k}", default=None, help=f"sbatch --{k}")
    sm.add_argument("--exclusive", action="store_true", default=None, help="whole nodes (sbatch --exclusive)")
    sm.add_argument("--signal-seconds", dest="signal_seconds", type=NONNEG_INT, default=None,
                    help="SIGUSR1 this long before the time limit: checkpoint, requeue, resume (default 300)")
    sm.add_argument("--no-requeue", action="store_true", help="checkpoint on the signal but do not requeue")
    sm.add_argument("--job-name", dest="job_name", default=None, help="the job's name (default: megadigpt-<stage>)")
    sm.add_argument("--sbatch", action="append", default=None, metavar="OPTION",
                    help="one more sbatch option, verbatim (repeatable): --sbatch=--mail-type=END")
    sm.add_argument("--env", action="append", default=None, metavar="KEY=VALUE",
                    help="exported before srun (repeatable): --env NCCL_SOCKET_IFNAME=ib0")
    sm.add_argument("--setup", action="append", default=None, metavar="LINE",
                    help="a shell line run before the launch line (repeatable, in order): --setup 'module load "
                         "cuda/12.4' --setup 'source ~/venvs/megadigpt/bin/activate' (none: the python running "
                         "submit is put first on PATH)")
    sm.add_argument("what", metavar="|".join(SUBMITTABLE) + "|CHAIN",
                    help=f"{' | '.join(SUBMITTABLE)}, or a chain YAML / built-in chain name")
    sm.add_argument("rest", nargs=argparse.REMAINDER, metavar="ARGS", help="the command's arguments")
    sm.set_defaults(fn=h.get("cmd_submit"))

    pl = sub.add_parser("plan", help="per-GPU memory of ViT-B..ViT-e under ZeRO-1/2/3, +- activation checkpointing "
                                     "and CPU offload; the micro-batch that fits")
    pl.add_argument("--config", default="digpt_vitl14_merged", help="teacher, decoder, global batch, ... from here; a "
                                                                   "segmentation or clip config plans that step")
    pl.add_argument("--models", default=None, help="e.g. vit_base/16,vit_large/14 (default: B, L, H, g, e at the "
                                                   "config's patch)")
    pl.add_argument("--gpus", type=POS_INT, default=8, help="data-parallel ranks (GPUs in all)")
    pl.add_argument("--gpu-mem", dest="gpu_mem", type=POS_FLOAT, default=80.0, help="GiB per GPU")
    pl.add_argument("--zero", default="1,2,3", help="ZeRO stages to plan, comma-separated: 1,2,3")
    pl.add_argument("--ckpt", default="off,on", help="activation checkpointing: off,on")
    pl.add_argument("--offload", default="off,on", help="optimizer CPU offload: off,on")
    pl.add_argument("--micro-batch", dest="micro_batch", type=POS_INT, default=None, help="default: the config's")
    pl.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="the student's training precision (train.precision)")
    pl.add_argument("--teacher-dtype", dest="teacher_dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="the frozen teacher's dtype (target.dtype)")
    pl.add_argument("--reserve", type=NONNEG_FLOAT, default=RESERVE_GIB,
                    help=f"GiB per GPU outside torch's tensors (CUDA context, NCCL communicators, DALI pools, "
                         f"allocator slack; default {RESERVE_GIB:g}, see docs/benchmarks.md)")
    pl.add_argument("--classes", type=POS_INT, default=None,
                    help="discrete targets: plan with this many token ids (instead of target.tokenizer's, e.g. "
                         "before it is fit)")
    pl.add_argument("--json", default=None, help="also write the rows as JSON")
    pl.add_argument("--force", action="store_true", help="replace an existing --json file megadigpt did not write")
    pl.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    pl.set_defaults(fn=h.get("cmd_plan"))

    be = sub.add_parser("bench", help="images/s, step-time breakdown, peak memory and MFU over a grid of "
                                      "configurations, beside a reference-style baseline")
    be.add_argument("--config", default=None, help="base config (decoder, data settings; default: built-in); a "
                                                   "segmentation (segment_ade20k_vitb16) or clip config (clip_cifar10) "
                                                   "measures that step")
    be.add_argument("--models", default="vit_base/16", help="comma-separated arch/patch")
    be.add_argument("--img-size", dest="img_size", type=POS_INT, default=None,
                    help="default 224; with a segmentation --config: the crop, default its model.crop_size; with a "
                         "clip --config: its model.img_size")
    be.add_argument("--teacher", default="efficientnet_lite0",
                    help="efficientnet_lite0 | pixels | open_clip:<arch> | timm:<name> (random weights), comma list")
    be.add_argument("--zero", default="1", help="ZeRO stages, comma-separated: 1,3")
    be.add_argument("--ckpt", default="off", help="activation checkpointing: off,on")
    be.add_argument("--attention", default="sdpa", help="sdpa,flex,eager")
    be.add_argument("--micro-batch", dest="micro_batch", default="32",
                    help="images per GPU per micro-step, comma-separated: 16,32")
    be.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32, comma list")
    be.add_argument("--compile", default="off",
                    help="torch.compile of each block and of the teacher (as train.compile): off,on")
    be.add_argument("--data", default="synthetic", help="synthetic | torch | dali (the last two read --data-source)")
    be.add_argument("--data-source", dest="data_source", default=None, help="shards or an image folder")
    be.add_argument("--ranks", type=POS_INT, default=1, help="processes (GPUs) per case")
    be.add_argument("--steps", type=POS_INT, default=10, help="timed optimizer steps per case")
    be.add_argument("--rounds", type=POS_INT, default=3, help="rounds: every case once per round, interleaved "
                                                              "(A B A B ...); rows give the median and spread")
    be.add_argument("--warmup", type=POS_INT, default=3,
                    help="untimed applied steps first (an fp16 run's overflow-skipped steps do not count)")
    be.add_argument("--no-baseline", dest="no_baseline", action="store_true", help="skip the reference-style rows")
    be.add_argument("--timeout", type=POS_FLOAT, default=3600.0, help="seconds per case")
    be.add_argument("--out", required=True, help="folder for bench.json, bench.md, bench.png and per-case logs "
                                                 "(new, empty, or an earlier bench's)")
    be.add_argument("--force", action="store_true", help="write into a folder that holds other files")
    be.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    be.set_defaults(fn=h.get("cmd_bench"))

    tk = sub.add_parser("tokenizer", help="discrete targets: fit a k-means codebook (iGPT palette, DiGIT tokens)")
    tsub = tk.add_subparsers(dest="tokenizer_command", required=True)
    tf = tsub.add_parser("fit", help="k-means over the config's target tokens (or RGB pixels) on a sample of its "
                                     "training data; saves centroids + provenance")
    tf.add_argument("--config", required=True, help="the pretraining config whose target is tokenized")
    tf.add_argument("--data", default=None, help="shortcut for data.source=...")
    tf.add_argument("--out", default=None, help="tokenizer file (default: the config's target.tokenizer)")
    tf.add_argument("--k", type=_at_least(2), default=None, help="clusters (default 512 for pixels, else 8192)")
    tf.add_argument("--images", type=POS_INT, default=10000, help="images sampled from the training data")
    tf.add_argument("--tokens-per-image", type=NONNEG_INT, default=32, help="tokens drawn per image (0 = all)")
    tf.add_argument("--iters", type=POS_INT, default=30, help="Lloyd iterations at most")
    tf.add_argument("--seed", type=NONNEG_INT, default=0, help="sample, augmentation and k-means++ seed")
    tf.add_argument("--batch", type=POS_INT, default=64, help="images per teacher forward")
    tf.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where the teacher and k-means run (auto: CUDA when there is a GPU)")
    tf.add_argument("--force", action="store_true", help="replace an existing tokenizer file")
    tf.add_argument("--progress", default="auto", choices=["auto", "on", "off"],
                    help="progress bars (auto: when stderr is a terminal)")
    tf.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    tf.set_defaults(fn=h.get("cmd_tokenizer_fit"))

    cr = sub.add_parser("config-reference", help="print the config reference (markdown)")
    cr.set_defaults(fn=h.get("cmd_config_reference"))
    rp = sub.add_parser("report", help="PNG plots of one or more runs, overlaid (one per metric: losses, lr "
                                       "schedule, grad norm, images/s, step time, MFU, memory, k-NN / validation "
                                       "top-1, per-block probe), report.json and a markdown summary")
    rp.add_argument("run_dir", nargs="+", help="run directories (their metrics.jsonl and config.yaml); several are "
                                               "overlaid, the legend naming each directory")
    rp.add_argument("--out", default=None, help="folder for the plots, report.json and summary.md (default for one "
                                                "run: <run_dir>/report; required for several)")
    rp.add_argument("--probe", default=None, action="append",
                    help="a `megadigpt probe --out` folder: also plot top-1 per block (repeatable)")
    rp.add_argument("--smoothing", type=float, default=0.6,
                    help="EMA weight of the smoothed line, as TensorBoard's slider: 0 (raw only) to <1 (default: 0.6)")
    rp.add_argument("--force", action="store_true", help="replace plots or summary.md that megadigpt did not write")
    rp.set_defaults(fn=h.get("cmd_report"))
    return p


def _check_argument_text(args) -> None:
    """No argument holds a control character (a newline in a run directory becomes its own line in a generated
    script; an escape sequence rewrites the terminal), and no local path has an over-long name: one line each,
    before any command starts."""
    from .config import check_path_text, check_text

    for name, value in vars(args).items():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, str):
                what = "override" if name == "overrides" else f"argument {name.replace('_', '-')}"
                check_text(v, what) if "://" in v or name == "overrides" else check_path_text(v, what)


def run(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse ``argv`` with ``parser`` and run the command's ``fn``, with the one-line errors and the exit
    codes: 0 done, 2 bad input, 3 diverged (rolled back), 75 checkpointed on a signal (resume me)."""
    from .train.runtime import Checkpointed, TrainingDiverged

    try:
        args, extra = parser.parse_known_args(argv)
        # overrides may follow options (``probe W --out D model.img_size=448``): argparse leaves those over
        stray = [a for a in extra if not ("=" in a and "." in a.split("=", 1)[0] and not a.startswith("-"))]
        if stray or (extra and not hasattr(args, "overrides")):
            parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    except ArgumentError as e:
        return fail(str(e))
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        _check_argument_text(args)
        return args.fn(args)
    except ConfigError as e:
        code = fail(str(e))
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            # raised on every rank at once (a locked run dir, a full disk): leave at once too, so that a launcher
            # that stops the other ranks when one exits finds them gone, not halfway through interpreter shutdown
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except (Checkpointed, TrainingDiverged) as e:
        if rank0():
            print(f"megadigpt: {e}", file=sys.stderr)
            if isinstance(e, Checkpointed):
                from .train.runtime import requeue_after_signal

                note = requeue_after_signal(e.signal)
                if note:
                    print(f"megadigpt: {note}", file=sys.stderr)
        return e.exit_code

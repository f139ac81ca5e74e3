"""Throughput, FLOPs and MFU, and the metric sinks: metrics.jsonl, TensorBoard, Weights & Biases, a progress bar
(or, without a terminal, one line per log step with the time, step/total and ETA: what a SLURM log shows), and the
line a run ends with. One name per number in every sink (:func:`metric_tag`); MFU a fraction where machines read
it, a percentage where people do (:func:`show`); W&B run the way its users run it, its credentials checked before
anything heavy (:func:`wandb_preflight`).

FLOPs are counted, not estimated: ``torch.utils.flop_counter`` over one image through the student and through the
teacher, both built on the meta device (nothing is computed). On the meta device ``F.scaled_dot_product_attention``
runs its math decomposition, whose matmuls the counter sees, and ``nn.MultiheadAttention`` (OpenCLIP) takes its
slow path; on a real CPU or GPU in eval/no_grad the MHA fast path (``_native_multi_head_attention``) and CPU's
fused SDPA kernel are invisible to the counter, so counting on real tensors leaves out attention (and, for MHA, the
q/k/v and output projections). Model FLOPs per image = 3 x student forward (forward + backward, whether or not
activations are recomputed) [+ 1 x teacher forward for the total].

MFU divides achieved FLOP/s by the device's peak: ``train.peak_tflops`` if given; for known GPUs the dense (no
sparsity) 16-bit tensor-core peak of NVIDIA's datasheet (:func:`gpu_peak`): bf16 where the GPU has bf16 tensor
cores, fp16 on V100 and T4, which have none (MFU there is against the fp16 peak, the fastest the matmuls can run;
precision ``auto`` trains in fp16 on them). MFU is always against the 16-bit peak, also for an fp32 run (the
usual convention: it says how far the run is from the hardware, not from its own dtype). On a CPU: a measured
fp32 matmul rate (labelled as measured).
"""

import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..safe_fs import check_no_links, open_append, read_regular, shorten, write_atomic
from ..sizing import count_flops  # noqa: F401 - re-exported (train/pretrain.py, perf/bench.py, tests)

# Dense 16-bit tensor-core peaks (TFLOP/s per GPU, without 2:4 sparsity) from NVIDIA's datasheets. Matched in
# this order against torch.cuda.get_device_name(), case-insensitively, every word of a key present: the specific
# variants first (an H100 PCIe is not an H100 SXM; "A100" must not match "A10").
GPU_PEAKS = (
    # (words in the device name, label, 16-bit dtype of the peak, TFLOP/s)
    (("H100", "PCIe"), "H100 PCIe", "bf16", 756.0),
    (("H100", "NVL"), "H100 NVL", "bf16", 835.0),
    (("H200", "NVL"), "H200 NVL", "bf16", 835.0),
    (("GH200",), "GH200", "bf16", 989.0),
    (("H200",), "H200 SXM", "bf16", 989.0),
    (("H100",), "H100 SXM", "bf16", 989.0),  # "NVIDIA H100 80GB HBM3"
    (("H800",), "H800 SXM", "bf16", 989.0),
    (("A100",), "A100", "bf16", 312.0),  # SXM and PCIe alike
    (("A800",), "A800", "bf16", 312.0),
    (("L40S",), "L40S", "bf16", 362.0),
    (("L40",), "L40", "bf16", 181.0),
    (("L4",), "L4", "bf16", 121.0),
    (("A10G",), "A10G", "bf16", 70.0),
    (("A10",), "A10", "bf16", 125.0),
    (("V100", "PCIe"), "V100 PCIe", "fp16", 112.0),  # Volta: no bf16 at all
    (("V100S",), "V100S", "fp16", 130.0),
    (("V100",), "V100 SXM2", "fp16", 125.0),
    (("T4",), "T4", "fp16", 65.0),
)


def gpu_peak(name: str):
    """(TFLOP/s, label, dtype) of the dense 16-bit tensor-core peak for a CUDA device name, or None if unknown."""
    import re

    words = set(re.split(r"[^0-9A-Z]+", name.upper()))
    for keys, label, dtype, tflops in GPU_PEAKS:
        if all(k.upper() in words for k in keys):
            return tflops, label, dtype
    return None


def teacher_flops(cfg, classes: Optional[int] = None) -> Optional[float]:
    """Forward FLOPs per image of the configured teacher, counted on its meta-device twin (random, unallocated
    weights: the same architecture) so that attention is in the count; 0 for the pixel target."""
    from ..sizing import meta_teacher

    teacher, spec = meta_teacher(cfg.target, cfg.model, classes)
    if cfg.target.kind == "pixels" and not spec.classes:
        return 0.0
    return count_flops(teacher, torch.zeros(1, 3, spec.image_size, spec.image_size, device="meta"))


def peak_tflops(device: torch.device, override: Optional[float]):
    """(TFLOP/s per device, how it was obtained)."""
    if override:
        return override, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        hit = gpu_peak(name)
        if hit:
            return hit[0], f"{hit[1]} {hit[2]} dense (datasheet)"
        return None, f"unknown GPU {name!r}: set train.peak_tflops"
    a = torch.randn(1024, 1024)
    a @ a
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        a @ a
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0) / 1e12, "measured CPU fp32 matmul"


# ============================================================================ metric names and their display
# One name per number in every sink. metrics.jsonl keeps its flat keys (scripts read them); TensorBoard and W&B show
# each key under a namespace chosen by the key alone, so a key has the same name wherever it is logged and whichever
# record carries it: ``val/<key>`` for evaluation results (``val_*``: fine-tuning's and segmentation's validation,
# ``knn_*``: pretraining's k-NN monitor, ``zeroshot_*``: zero-shot classification), ``eval/<key>`` for ``eval_*``,
# ``train/<key>`` for everything else.
# The leaf is the metrics.jsonl key itself: ``val/val_top1`` is ``val_top1`` in metrics.jsonl.
NAMESPACES = (("val_", "val"), ("knn_", "val"), ("zeroshot_", "val"), ("eval_", "eval"))
LOSS_KEYS = ("loss", "train_loss")  # the training loss: pretraining's gen + dis, a transfer task's
# the keys a log line without a terminal shows (when logged), in this order
LINE_KEYS = ("gen_loss", "dis_loss", "loss", "train_loss", "lr", "grad_norm", "images_per_s", "mfu_student",
             "mfu_total", "knn_top1", "val_top1", "val_top5", "val_ema_top1", "val_mIoU", "val_ema_mIoU")


def metric_tag(key: str) -> str:
    """The TensorBoard and W&B name of a metrics.jsonl key (see the rule above)."""
    for prefix, space in NAMESPACES:
        if key.startswith(prefix):
            return f"{space}/{key}"
    return f"train/{key}"


def show(key: str, value) -> str:
    """A value as people read it: MFU as a percentage (metrics.jsonl, TensorBoard and W&B keep the fraction)."""
    if key.startswith("mfu"):
        return f"{100 * value:.3g}%"
    return f"{value:.4g}"


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A config as TensorBoard's HParams takes it: ``section.key`` -> a number, string or bool (lists as JSON
    text; unset keys left out)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif v is None:
            continue
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out


class MetricsSink:
    """Rank 0 writes; other ranks hold a no-op sink.

    ``wandb``: None, or the W&B run's settings (:func:`wandb_preflight`: ``mode``, ``project``, ``entity``,
    ``group``, ``tags``, ``name``, what the config sets; W&B's environment decides the rest). ``config``: the
    resolved config, W&B's run config and TensorBoard's HParams. ``loss_key`` / ``val_metric``: the metrics.jsonl
    keys of the training loss and of the task's validation number (None: none), shown by the progress bar. The W&B
    run id is kept in ``<run_dir>/wandb_id.txt``, so a resumed run continues the same W&B run
    (``resume="allow"``)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress: str, total_steps: int,
                 start_step: int, wandb: Optional[dict] = None, config: Optional[dict] = None,
                 loss_key: Optional[str] = None, val_metric: Optional[str] = None):
        self.enabled = enabled
        self.jsonl = self.tb = self.bar = self.wb = None
        self.total, self.start_step = total_steps, start_step
        self.loss_key, self.val_metric = loss_key, val_metric
        self.shown = {}  # the bar's fields: the latest training line's and the latest validation number
        self.best_val = None  # (the best val_metric this process logged, its step): the summary line's
        self.t0 = time.monotonic()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # never appended through a planted link; a line torn by kill -9 is ended first, so the next record is whole
        self.jsonl = open_append(run_dir / "metrics.jsonl", root=run_dir, what="metrics log")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            check_no_links(run_dir / "tensorboard", run_dir, "TensorBoard folder")
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            if config is not None:
                self.hparams(config)
        if wandb is not None:
            self.wb = start_wandb(run_dir, **{"config": config, **wandb})
        if progress == "on" or (progress == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def hparams(self, config: dict):
        """The resolved config in TensorBoard's HParams (and as text), once per start; the HParams table's metric
        columns are the training loss and the validation number."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {metric_tag(k): 0.0 for k in (self.loss_key, self.val_metric) if k}
        for summary in hparams(flat_config(config), metrics):
            self.tb.file_writer.add_summary(summary)
        self.tb.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", self.start_step)

    def event(self, **kw):
        if self.enabled:
            self.jsonl.write(json.dumps({"time": time.time(), **kw}) + "\n")

    def eta(self, step: int) -> str:
        """Time left at the rate of the steps this process ran (``?`` before the first)."""
        done = step - self.start_step
        if done <= 0:
            return "?"
        left = (time.monotonic() - self.t0) / done * max(0, self.total - step)
        return format_duration(left)

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tagged = {metric_tag(k): v for k, v in numbers.items()}
        if self.val_metric in numbers and (self.best_val is None or numbers[self.val_metric] > self.best_val[0]):
            self.best_val = (numbers[self.val_metric], step)
        if self.tb is not None:
            for tag, v in tagged.items():
                self.tb.add_scalar(tag, v, step)
        if self.wb is not None:
            self.wb.log(tagged, step=step)
        if self.bar is not None:
            self.show_on_bar(numbers)
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            pct = f" ({100 * step / self.total:.0f}%)" if self.total else ""
            print(f"{stamp} step {step}/{self.total}{pct} eta {self.eta(step)} " +
                  " ".join(f"{k}={show(k, numbers[k])}" for k in LINE_KEYS if k in numbers), flush=True)

    def show_on_bar(self, numbers: dict):
        """The bar's fields: loss, lr, the latest validation number (where the task has one), images/s, MFU."""
        loss = next((k for k in ((self.loss_key,) if self.loss_key else LOSS_KEYS) if k in numbers), None)
        fields = [("loss", loss), ("lr", "lr"), (self.val_metric, self.val_metric), ("img/s", "images_per_s"),
                  ("mfu", "mfu_total" if "mfu_total" in numbers else "mfu_student")]
        for label, key in fields:
            if label and key in numbers:
                self.shown[label] = show(key, numbers[key])
        order = [label for label, _ in fields if label in self.shown]
        self.bar.set_postfix({label: self.shown[label] for label in order})

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self, failed: bool = False):
        """Closes every sink (``failed``: the run ended on an error, which W&B records as the run's exit code)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish(exit_code=1 if failed else 0)
        self.jsonl.close()


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + f"{h}:{m:02d}:{s:02d}"


def summary_line(task: str, step: int, total: int, history: list, loss_key: Optional[str],
                 val_metric: Optional[str], best: Optional[tuple], seconds: float, run_dir: Path) -> str:
    """The line a run ends with: its steps, final loss (from ``history``, the training lines), the best
    validation number (``best``: (value, step), or None), MFU, time, and where its outputs are."""
    def last(keys: Iterable[str]):
        for _, rec in reversed(history):
            for k in keys:
                if rec.get(k) is not None:
                    return k, rec[k]
        return None, None

    parts = [f"step {step}/{total}"]
    key, loss = last((loss_key,) if loss_key else LOSS_KEYS)
    if loss is not None:
        parts.append(f"final {key} {show(key, loss)}")
    if val_metric and best is not None:
        parts.append(f"best {val_metric} {show(val_metric, best[0])} (step {best[1]})")
    key, mfu = last(("mfu_total", "mfu_student"))
    if mfu is not None:
        parts.append(f"MFU {show(key, mfu)}")
    parts.append(f"time {format_duration(seconds)}")
    outputs = [n + "/" if (Path(run_dir) / n).is_dir() else n
               for n in ("best", "last", "checkpoints", "metrics.jsonl", "tensorboard", "wandb")
               if (Path(run_dir) / n).exists()]
    where = f"outputs in {run_dir}" + (f" ({', '.join(outputs)})" if outputs else "")
    return f"{task} done: " + ", ".join(parts) + f"; {where}"


# ============================================================================ Weights & Biases
# W&B is run the way its users run it: what the config sets explicitly (train.wandb_*) is passed to wandb.init,
# which lets it win over the environment, like any wandb.init argument; everything else is left to W&B's own
# environment and settings files (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR, WANDB_RUN_GROUP, WANDB_TAGS,
# WANDB_NAME, `wandb offline`, ...). megadigpt's own defaults apply only where W&B's environment says nothing:
# the project ``megadigpt``, the run directory's name as the run name, files under the run directory.
# WANDB_MODE=disabled switches W&B off whatever the config says (the switch CI jobs use).
WANDB_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline",
               "run": "online", "shared": "online"}


def wandb_settings(cfg) -> dict:
    """The W&B settings a config sets explicitly (unset keys left out): ``mode``, ``project``, ``entity``,
    ``group``, ``tags`` (a list; a string is split at commas), ``name``."""
    t = cfg.train
    tags = t.wandb_tags
    if isinstance(tags, str):
        tags = [x.strip() for x in tags.split(",") if x.strip()]
    out = {"mode": t.wandb_mode, "project": t.wandb_project, "entity": t.wandb_entity, "group": t.wandb_group,
           "tags": tags, "name": t.wandb_name}
    return {k: v for k, v in out.items() if v is not None}


def _wandb_system_settings():
    """W&B's settings from its settings files (``wandb offline``, ``wandb login --host``) and its environment, read
    as ``wandb.init`` reads them, without starting anything; None where this wandb has no such API."""
    try:
        import wandb

        s = wandb.Settings()
        s.update_from_system_settings()
        s.update_from_env_vars(dict(os.environ))
        return s
    except Exception:  # (an older or newer wandb; a bad value is said by resolve_wandb_mode)
        return None


def resolve_wandb_mode(explicit: Optional[str] = None, system=None) -> str:
    """online | offline | disabled: WANDB_MODE=disabled always; else the config's ``train.wandb_mode``; else W&B's
    (WANDB_MODE, ``wandb offline``); else online. A WANDB_MODE W&B does not know is one line (ConfigError)."""
    from ..config import ConfigError

    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode and env_mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={shorten(env_mode)} is not a W&B mode (online, offline or disabled)")
    if env_mode == "disabled":
        return "disabled"
    if explicit:
        return WANDB_MODES[explicit]
    mode = getattr(system, "mode", None) or env_mode or "online"
    return WANDB_MODES.get(mode, "online")


def wandb_credentials(system=None) -> Optional[str]:
    """Where W&B will find an API key without asking (read locally, no network): ``WANDB_API_KEY``,
    ``WANDB_IDENTITY_TOKEN_FILE``, an ``api_key`` in W&B's settings files, or a netrc entry for the W&B host
    (``wandb login`` writes ``~/.netrc``; ``NETRC`` names another file). None where there is none. A netrc entry
    W&B would refuse is one line (ConfigError)."""
    from ..config import ConfigError

    key = os.environ.get("WANDB_API_KEY")
    if key:
        try:
            from wandb.sdk.lib.wbauth import check_api_key  # the format W&B checks at wandb.init (no network)
        except ImportError:
            check_api_key = None
        problem = check_api_key(key) if check_api_key is not None else None
        if problem:
            raise ConfigError(f"WANDB_API_KEY: {' '.join(str(problem).split())}")
        return "WANDB_API_KEY"
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    if getattr(system, "api_key", None):
        return "W&B settings file"
    base_url = getattr(system, "base_url", None) or os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth  # W&B's own reading: its hosts, NETRC, ~/.netrc, ~/_netrc
    except ImportError:
        read_netrc_auth = None
    if read_netrc_auth is not None:
        try:
            return "netrc" if read_netrc_auth(host=base_url) else None
        except Exception as e:  # a key W&B would refuse at wandb.init, after the engine is built
            raise ConfigError(f"W&B credentials in netrc: {' '.join(str(e).split())}") from None
    import netrc
    from urllib.parse import urlsplit

    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entries = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError):
        return None
    hosts = {urlsplit(base_url).netloc, "api.wandb.ai"}
    return "netrc" if any((entries.authenticators(h) or (None, None, None))[2] for h in hosts) else None


def wandb_preflight(cfg) -> Optional[dict]:
    """Before anything heavy (the harness calls it right after the task's checks, on every rank): the W&B run's
    settings for :class:`MetricsSink` (the config's explicit ones and the resolved mode), or None where W&B is off
    (``train.wandb=false``, WANDB_MODE=disabled, ``train.wandb_mode=disabled``). Refused in one line
    (ConfigError): no wandb package, a WANDB_MODE W&B does not know, an online run without credentials (W&B would
    otherwise ask at a prompt nobody sees, or fail after the engine is built)."""
    from ..config import ConfigError

    if not cfg.train.wandb:
        return None
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("train.wandb=true needs the wandb package (pip install wandb, or megadigpt[wandb])") from None
    settings = wandb_settings(cfg)
    system = _wandb_system_settings()
    mode = resolve_wandb_mode(settings.get("mode"), system)
    if mode == "disabled":
        return None
    if mode == "online" and not wandb_credentials(system):
        raise ConfigError("train.wandb=true logs to W&B online, and no W&B credentials were found (no WANDB_API_KEY, "
                          "no `wandb login` entry in ~/.netrc); log in, or set WANDB_MODE=offline (`wandb sync` "
                          "later) or WANDB_MODE=disabled")
    return {**settings, "mode": mode}


def start_wandb(run_dir: Path, mode: Optional[str] = None, project: Optional[str] = None,
                entity: Optional[str] = None, group: Optional[str] = None, tags: Optional[list] = None,
                name: Optional[str] = None, config: Optional[dict] = None):
    """A W&B run for this run directory (the real library), or None where W&B is disabled. Arguments left None are
    W&B's to decide (its environment), with megadigpt's defaults where that says nothing (project ``megadigpt``,
    the run directory's name, files under ``<run_dir>/wandb``; offline runs there are for ``wandb sync``). Console
    capture is on (``console="auto"``, unless WANDB_CONSOLE says otherwise). The id is kept in the run directory
    (``WANDB_RUN_ID`` names it for a new run): a resume continues the same W&B run."""
    try:
        import wandb
    except ImportError:
        from ..config import ConfigError

        raise ConfigError("train.wandb needs the wandb package (pip install wandb, or megadigpt[wandb])") from None
    mode = resolve_wandb_mode(mode, None if mode else _wandb_system_settings())
    if mode == "disabled":
        return None
    env = os.environ
    id_file = Path(run_dir) / "wandb_id.txt"
    check_no_links(Path(run_dir) / "wandb", run_dir, "W&B folder")
    raw = read_regular(id_file, limit=4096, root=run_dir, what="W&B run id file")
    run_id = raw.decode(errors="replace").strip() if raw else None
    if run_id and not re.fullmatch(r"[a-z0-9]{1,64}", run_id):
        from ..config import ConfigError

        raise ConfigError(f"{id_file} holds {shorten(run_id)}, not a W&B run id (lowercase letters and digits); "
                          f"remove the file to start a new W&B run")
    if not run_id:
        wanted = env.get("WANDB_RUN_ID", "").strip()
        run_id = wanted if re.fullmatch(r"[a-z0-9]{1,64}", wanted) else secrets.token_hex(4)  # W&B: 8 characters
        write_atomic(id_file, run_id + "\n", root=run_dir, what="W&B run id file")
    kwargs = {"id": run_id, "resume": "allow", "mode": mode, "config": config or {}}
    for key, value in (("entity", entity), ("group", group), ("tags", tags)):
        if value is not None:
            kwargs[key] = list(value) if key == "tags" else value
    kwargs["project"] = project or (None if env.get("WANDB_PROJECT") else "megadigpt")
    kwargs["name"] = name or (None if env.get("WANDB_NAME") else Path(run_dir).resolve().name)
    if not env.get("WANDB_DIR"):
        kwargs["dir"] = str(run_dir)
    if not env.get("WANDB_CONSOLE"):
        kwargs["settings"] = wandb.Settings(console="auto")
    return wandb.init(**kwargs)


def read_metrics(path) -> dict:
    """{step: last record of that step} from a metrics.jsonl (a resumed run re-logs the steps it redid)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by kill -9 (the resumed run starts its records on a fresh line)
            continue
        if isinstance(rec, dict) and "step" in rec and "gen_loss" in rec:
            out[rec["step"]] = rec
    return out

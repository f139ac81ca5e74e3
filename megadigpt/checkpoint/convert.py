"""``megadigpt convert``: take a run anywhere.

- ``--to timm``: the encoder as a timm ``VisionTransformer`` in timm's hub layout: ``model.safetensors``,
  ``config.json`` (architecture, model_args, pretrained_cfg) and a model card ``README.md``. The primary route is
  ``timm.create_model("local-dir:<folder>", pretrained=True)``: timm reads the folder's own ``config.json``
  (``timm/models/_hub.py: load_model_config_from_path``), so ``timm.data.resolve_data_config({}, model=model)``
  gives the preprocessing the encoder was trained with. :func:`load_timm` is the by-name route
  (``create_model(architecture, pretrained=True, pretrained_cfg=<the export's>, **model_args)``), with the same
  ``pretrained_cfg``. Never use ``pretrained_cfg_overlay=dict(file=...)`` on a timm name: it keeps timm's stock
  config for that name (mean/std 0.5, crop 0.9 for the standard ViTs). Layout choices: CLS is first (timm's order;
  the pretraining appended it last, which changes nothing for full attention); ``pos_embed`` is the fixed sin-cos
  table, CLS slot zero, exported as timm's learnable parameter.

  Pooling: the export pools as megadigpt measures its numbers, ``global_pool='avg'`` (the mean of the patch tokens,
  CLS left out), never timm's default CLS token. The probe (:func:`megadigpt.train.probe.pooled_block_features`)
  and the k-NN monitor score that mean of the last block's patch tokens, un-normalised; fine-tuning (the paper's
  head, ``ClassifierConfig.global_pool``) puts ``fc_norm`` (a LayerNorm) and ``head`` on it. So ``fc_norm`` is
  exported at its initial (1, 0) values (pretraining has no final norm: these are the values a fine-tune starts
  from): ``create_model(..., num_classes=N)`` builds the fine-tuning model, ``forward_head(pre_logits=True)``
  gives that head's input, and the card gives the probe's features as ``forward_features(x)[:,
  num_prefix_tokens:].mean(1)`` (``forward_features`` is the raw trunk: with ``avg`` pooling timm's ``norm`` is
  an Identity). ``final_norm=False`` (``--no-final-norm``) exports no ``fc_norm``: ``model(x)`` is then the
  probe's features themselves. Fine-tuning exports keep the run's own ``model.global_pool``.

  ``pretrained_cfg`` holds what the weights were trained with: ``input_size`` (the weights' own grid x patch),
  ``mean``/``std``/``interpolation`` from the run's ``config.yaml`` (``data.*``; megadigpt's defaults, said so in
  the card, when the input carries no config), ``crop_pct`` (pretraining has no evaluation crop: the fine-tuning /
  k-NN default, ``FinetuneDataConfig.crop_pct``; fine-tuning exports: the run's ``data.crop_pct``). Only
  :class:`timm.models.PretrainedCfg` fields go there (timm builds that dataclass from it and refuses others);
  megadigpt's own record (model name, step, configs, metrics) is the top-level ``megadigpt`` key, which timm
  ignores.

  Names. timm's ``local-dir:`` needs ``architecture`` to be a registered entry point (``_factory.py``:
  ``is_model``), and timm's own re-export (``save_config_for_hf``, used by ``push_to_hf_hub``) writes
  ``pretrained_cfg["architecture"]`` back as that entry point, so neither may hold a made-up name. So:
  ``architecture`` is timm's standard name only where timm's entry point, with its own defaults, builds exactly
  this network (checked by building both on the meta device: every parameter shape and the head count); any other
  geometry uses :data:`GENERIC_BUILDER` purely as a constructor, with every size in ``model_args`` (timm merges
  them over the entry point's defaults). The model's name is ``megadigpt_vit_d<depth>_w<width>_h<heads>_p<patch>
  _s<image>`` (``_m<mlp ratio>`` when not 4, ``_cls<N>`` for a classifier): top-level ``model_name``,
  ``pretrained_cfg["tag"]`` (timm's field for what the weights are), ``description``, and the card's title, which
  says what ``architecture`` means when it is only the builder. Every export is checked when written: timm's
  builder, given ``config.json`` alone, makes a model whose parameter names and shapes are the file's.

  The model card (:func:`model_card`, plain string formatting: nothing in it is evaluated) gives the architecture
  and parameter count, the preprocessing, the pretraining (config.yaml, checkpoint step, teacher, data source:
  URLs without credentials or query strings, local paths reduced to their base names, :func:`_public`), the
  precision the run resolved (its start event in ``metrics.jsonl``, not ``auto``), the metrics with their names
  and the step they were measured at, how to load it and get the features the numbers were measured on, the
  D-iGPT citation, and a licence in its front matter (:func:`card_license`: the package's declared licence;
  megadigpt declares none, which the card says).
  Fine-tuning exports (:func:`megadigpt.train.finetune.export_classifier`) are the same kind of folder.

  Files follow the umask (0644 under 022), as ``open()`` would make them: safetensors >= 0.8 writes through a
  temporary file that is always 0600 (safetensors/safetensors#782), so every file an export writes is chmod-ed to
  ``0o666 & ~umask`` (``--to fp32`` and ``--to reference`` too).
- ``--to reference``: the authors' D-iGPT layout, ``{'model': state_dict}`` with their key names, mapped by what
  each module does in their ``forward`` (their ``ar_enc_norm``/``ar_enc2dec`` feed the discriminative decoder,
  ``kd_*`` the generative one: see ``_MEMORY``), so the export is our network inside their code and ``--from
  reference`` builds exactly theirs.
- ``--to fp32``: the whole model (encoder + decoders) consolidated in fp32, safetensors.
- ``--from reference``: a released reference checkpoint -> a megadigpt state dict (safetensors) for
  ``train.init_from`` (continue pretraining) or fine-tuning.

Inputs: a run directory or a checkpoint directory (DeepSpeed, any ZeRO stage and world size; the newest complete
tag unless ``--tag``), a megadigpt safetensors file, or a reference ``.pth``. Files are loaded safely
(safetensors, or ``torch.load(weights_only=True)`` with DeepSpeed's few types allowed, DeepSpeed's own loads
included: :mod:`megadigpt.checkpoint.safe_load`).
"""

import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import torch

from ..config import ConfigError, check_output
from ..safe_fs import check_path_text, shorten, write_atomic

# ------------------------------------------------------------------------------------------- outputs that never destroy
# Every command that writes what the user names (``--out``, ``--json``) goes through :func:`guard_output` before
# any heavy work: never into a run's ``checkpoints/`` folder, never over its own input (not even with --force:
# resolved paths and hard links compared), never over an existing file megadigpt did not write unless --force.
# What megadigpt wrote into a folder is recorded in that folder's :data:`OUTPUT_MARKER` (name, size, mtime_ns of
# each file): a file whose size or mtime changed since (edited by someone) is no longer megadigpt's. Files are
# replaced atomically (a temporary in the same folder renamed over the name).

OUTPUT_MARKER = ".megadigpt-output.json"
SAFETENSORS_SIGNATURE = {"megadigpt": "convert --to fp32"}  # in an fp32 export's safetensors metadata


def _abs(p) -> Path:
    return Path(os.path.abspath(os.fspath(p)))


def _real(p) -> Path:
    return Path(os.path.realpath(os.fspath(p)))


def checkpoints_folder_of(path) -> Optional[Path]:
    """The run's ``checkpoints/`` folder that ``path`` is or lies inside (as written, and with links resolved),
    or None. A folder named ``checkpoints`` counts when it holds ``latest`` or a ``step_*`` tag, or sits beside
    the run's ``config.yaml`` / ``metrics.jsonl``."""
    from .ds_checkpoint import TAG_RE

    for cand in (_abs(path), _real(path)):
        for d in (cand, *cand.parents):
            if d.name != "checkpoints" or not d.is_dir():
                continue
            try:
                tags = any(TAG_RE.match(c.name) for c in d.iterdir())
            except OSError:
                tags = False
            if tags or (d / "latest").exists() or (d.parent / "config.yaml").is_file() or \
                    (d.parent / "metrics.jsonl").is_file():
                return d
    return None


def same_file(a, b) -> bool:
    """``a`` and ``b`` name the same file or folder: equal once links are resolved, or one inode (a hard link)."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _read_output_marker(folder: Path) -> Optional[dict]:
    """{name: record} of the files megadigpt wrote in ``folder``; None when it holds no (readable) record."""
    from ..safe_fs import read_regular

    try:
        raw = read_regular(folder / OUTPUT_MARKER, limit=1 << 20, what="output record")
        rec = json.loads(raw) if raw else None
    except (ConfigError, OSError, ValueError):
        return None
    files = rec.get("files") if isinstance(rec, dict) else None
    return files if isinstance(files, dict) else None


def written_by_megadigpt(path) -> bool:
    """``path`` is a regular file that megadigpt wrote (its folder's record lists it with this size and mtime),
    unchanged since."""
    p = Path(path)
    try:
        st = os.lstat(p)
    except OSError:
        return False
    import stat as _stat

    if not _stat.S_ISREG(st.st_mode):
        return False
    ent = (_read_output_marker(p.parent) or {}).get(p.name)
    return isinstance(ent, dict) and ent.get("size") == st.st_size and ent.get("mtime_ns") == st.st_mtime_ns


def record_outputs(folder, names: Iterable[str], command: str = "") -> None:
    """Note ``names`` (files just written in ``folder``) in the folder's :data:`OUTPUT_MARKER`."""
    from .. import __version__

    folder = Path(folder)
    files = _read_output_marker(folder) or {}
    for n in names:
        try:
            st = os.lstat(folder / n)
        except OSError:
            continue
        files[n] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "by": f"megadigpt {command}".strip()}
    rec = {"written_by": f"megadigpt {__version__}", "note": "files megadigpt wrote here (it replaces these, and "
           "only these, without --force while unchanged)", "files": dict(sorted(files.items()))}
    write_atomic(folder / OUTPUT_MARKER, json.dumps(rec, indent=1) + "\n", what="output record")


def write_output(path, data, command: str = "") -> Path:
    """A small output file (text or bytes) written atomically and recorded as megadigpt's."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, data, what="output")
    record_outputs(p.parent, [p.name], command)
    return p


def _safetensors_metadata(path) -> Optional[dict]:
    """The ``__metadata__`` of a safetensors file from its header alone (no tensors read); None if unreadable."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 << 20:
                return None
            head = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    meta = head.get("__metadata__") if isinstance(head, dict) else None
    return meta if isinstance(meta, dict) else {}


def _is_fp32_export(path) -> bool:
    meta = _safetensors_metadata(path) or {}
    return all(meta.get(k) == v for k, v in SAFETENSORS_SIGNATURE.items())


REFERENCE_SIGNATURE = "megadigpt convert --to reference"  # a top-level "megadigpt" entry of the saved dict


def _is_reference_export(path) -> bool:
    """A ``convert --to reference`` file, from its pickle's bytes alone (the zip's ``data.pkl``; nothing loaded)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((i for i in z.infolist() if i.filename.endswith("/data.pkl")), None)
            if pkl is None or pkl.file_size > 64 << 20:
                return False
            return REFERENCE_SIGNATURE.encode() in z.read(pkl)
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _names(names, limit=6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# Names that say "a file": an output folder named like this (``--out x.safetensors`` for a timm folder) is a slip
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pkl", ".npz", ".npy", ".onnx", ".h5", ".json",
                 ".jsonl", ".yaml", ".yml", ".md", ".txt", ".csv", ".tar", ".gz", ".tgz", ".zip", ".png", ".jpg",
                 ".html")


def check_output_name(text: str, kind: str, what: str = "--out", files: Iterable[str] = ()) -> None:
    """Refuse (one line) an output named as the other kind: a folder output (``kind`` "dir") whose name ends like a
    file (:data:`FILE_SUFFIXES`) and is not an existing folder, or a file output named with a trailing ``/``."""
    text = str(text)
    name = Path(text)
    if kind == "dir" and name.suffix.lower() in FILE_SUFFIXES and not name.is_dir():
        files = list(files)
        inside = f" ({_names(files)})" if files else ""
        raise ConfigError(f"{what} {shorten(text)} names a {name.suffix} file, but this writes a folder{inside}: "
                          f"give a folder, e.g. {shorten(str(name.with_suffix('')))}")
    if kind == "file" and text.endswith(("/", os.sep)):
        raise ConfigError(f"{what} {shorten(text)} names a folder (it ends with /), but this writes one file: give "
                          f"the file's path")


def guard_output(path, kind: str, what: str = "--out", *, force: bool = False, inputs: Iterable = (),
                 files: Iterable[str] = (), whole_folder: bool = False,
                 own: Optional[Callable[[Path], bool]] = None) -> Path:
    """Refuse (one line) an output before any work: ``kind`` "file" or "dir" (``files``: the names written into
    the folder). Never inside a run's ``checkpoints/``; never ``inputs`` themselves (resolved, hard links too),
    whatever ``force``; without ``force``, never over an existing file megadigpt did not write (its folder's
    record, or ``own(path)``: a signature in the file), and with ``whole_folder`` (an export folder) only into a
    new, empty, or megadigpt-written folder."""
    text = check_path_text(path, what)
    p = check_output(text, kind, what)
    files = list(files)
    check_output_name(text, kind, what, files)
    ck = checkpoints_folder_of(p)
    if ck is not None:
        raise ConfigError(f"{what} {shorten(text)} is inside the run's checkpoint folder {ck}; megadigpt never "
                          f"writes there (the run could no longer resume): choose a path outside it")
    files = list(files)
    targets = [p] + [p / n for n in files]
    for src in inputs:
        if src is None or not os.path.exists(src):
            continue
        for t in targets:
            if same_file(t, src):
                raise ConfigError(f"{what} {shorten(text)} would overwrite {'its input ' + str(src) if t == p else t}"
                                  f", which this command reads; choose another path (--force does not change this)")
    if force:
        return p
    own = own or (lambda _p: False)
    if kind == "file":
        if os.path.lexists(p) and not (written_by_megadigpt(p) or own(p)):
            raise ConfigError(f"{what} {shorten(text)} exists and megadigpt did not write it; pass --force to "
                              f"replace it, or choose another path")
        return p
    if not p.is_dir():
        return p
    marker = _read_output_marker(p)
    try:
        present = [c.name for c in p.iterdir() if c.name != OUTPUT_MARKER]
    except OSError as e:
        raise ConfigError(f"{what} {shorten(text)}: cannot list the folder ({e.strerror})") from None
    if whole_folder and present and marker is None:
        replaced = [n for n in files if n in present]
        raise ConfigError(f"{what} {shorten(text)} is a folder with files megadigpt did not write "
                          f"({_names(present)}); " + (f"writing would replace {_names(replaced)}" if replaced else
                                                      f"writing would add {_names(files)} to them") +
                          ": pass --force, or choose a new or empty folder")
    foreign = [n for n in files if os.path.lexists(p / n) and not (written_by_megadigpt(p / n) or own(p / n))]
    if foreign:
        raise ConfigError(f"{what} {shorten(text)}: writing would replace {_names(foreign)}, which megadigpt did "
                          f"not write (or which changed since); pass --force to replace, or choose another folder")
    return p


def _replace_with(path, write: Callable[[Path], None]) -> Path:
    """Write a (large) file through ``write(temporary)`` and rename it over ``path`` (:func:`safe_fs.replace_via`),
    the temporary given the mode ``open()`` would (:func:`follow_umask`)."""
    from ..safe_fs import replace_via

    def write_then_mode(tmp: Path) -> None:
        write(tmp)
        follow_umask(tmp)

    return replace_via(path, write_then_mode)


TIMM_FILES = ("model.safetensors", "config.json", "README.md")


def convert_inputs(src) -> list:
    """What ``convert`` reads of ``src``: the input itself, and beside a run or checkpoint its config, metrics and
    class names (an output may never replace them)."""
    out = [src]
    for d in (Path(src), *list(_abs(src).parents)[:3]):
        out += [d / "config.yaml", d / "metrics.jsonl", d / "label_names.json"]
    return out


def guard_convert_output(src, to: str, out, force: bool = False) -> Path:
    """``convert``'s output check (before anything is loaded)."""
    if to == "timm":
        return guard_output(out, "dir", "--out", force=force, inputs=convert_inputs(src), files=TIMM_FILES,
                            whole_folder=True)
    return guard_output(out, "file", "--out", force=force, inputs=convert_inputs(src),
                        own=_is_fp32_export if to in ("fp32", "megadigpt") else _is_reference_export)

# ------------------------------------------------------------------------------------------- reading


def _is_ds_dir(p: Path) -> bool:
    return p.is_dir() and (any(p.glob("*model_states.pt")) or (p / "checkpoints").is_dir() or (p / "latest").is_file())


def _resolve_tag(p: Path, tag: Optional[str]):
    """``(checkpoints folder, tag)`` of a run directory, one tag's folder or a checkpoints folder."""
    from . import ds_checkpoint as dc

    if (p / "checkpoints").is_dir():  # a run directory
        return p / "checkpoints", tag or dc.latest_tag(p)
    if any(p.glob("*model_states.pt")):  # one tag's folder
        return p.parent, p.name
    return p, tag or dc.latest_tag(p.parent)  # a checkpoints folder


def checkpoint_step(src, tag: Optional[str] = None) -> Optional[int]:
    """The optimizer step of the checkpoint :func:`load_any` reads from ``src`` (its marker's, else its tag's
    name); None for a file."""
    from . import ds_checkpoint as dc

    p = Path(src)
    if not _is_ds_dir(p):
        return None
    ckdir, tag = _resolve_tag(p, tag)
    if not tag:
        return None
    marker = dc.read_marker(ckdir.parent, tag) or {}
    if isinstance(marker.get("step"), int):
        return marker["step"]
    m = dc.TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def _run_log(src) -> Optional[Path]:
    """The ``metrics.jsonl`` of the run that ``src`` is (inside of), or None."""
    for d in (Path(src), *list(Path(src).resolve().parents)[:3]):
        f = d / "metrics.jsonl"
        if f.is_file():
            return f
        if (d / "config.yaml").is_file():  # the run directory, without a log
            return None
    return None


def _log_records(log: Optional[Path]):
    """The JSON objects of a ``metrics.jsonl`` (a damaged line is skipped: a card is informative, the weights are
    what matters)."""
    if log is None:
        return
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            yield rec


def _run_metrics(src, step: Optional[int]) -> dict:
    """From the run's ``metrics.jsonl``, at or before ``step``: the last logged training losses and k-NN monitor
    result, each with the step it was logged at (``<name>_step``), and the best k-NN top-1 (``best_knn_top1``)."""
    found = {}
    for rec in _log_records(_run_log(src)):
        if "event" in rec or (step is not None and rec["step"] > step):
            continue
        for k in ("gen_loss", "dis_loss", "knn_top1", "knn_top5"):
            if isinstance(rec.get(k), (int, float)):
                found[k] = rec[k]
                found[f"{k}_step"] = rec["step"]
        if isinstance(rec.get("knn_top1"), (int, float)) and rec["knn_top1"] >= found.get("best_knn_top1", -1.0):
            found["best_knn_top1"], found["best_knn_top1_step"] = rec["knn_top1"], rec["step"]
    return found


def resolved_precision(src, step: Optional[int] = None) -> Optional[str]:
    """The precision the run actually trained in (``train.precision: auto`` resolved): the last ``start`` /
    ``resume`` event at or before ``step`` in its ``metrics.jsonl``; None where not logged."""
    found = None
    for rec in _log_records(_run_log(src)):
        if rec.get("event") in ("start", "resume") and (step is None or rec["step"] <= step) and \
                isinstance(rec.get("precision"), str):
            found = rec["precision"]
    return found


def _precision_text(configured, resolved: Optional[str]) -> Optional[str]:
    """What a card says: the resolved precision; ``auto`` only with a note that the run did not record which."""
    if resolved:
        return resolved
    if configured == "auto":
        return "auto (the run's log does not say which precision it resolved to)"
    return configured


def load_deepspeed(path, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """fp32 state dict of the whole student from a DeepSpeed checkpoint (ZeRO 0-3, any world size)."""
    ckdir, tag = _resolve_tag(Path(path), tag)
    if not tag or not (ckdir / tag).is_dir():
        raise ConfigError(f"no complete checkpoint found in {path}")
    tagdir = ckdir / tag
    from . import safe_load

    safe_load.check_folder(tagdir)  # a run directory may come from anyone: nothing in it may run
    # ZeRO-0/1/2 keep "mp_rank_00_model_states.pt" (ZeRO-3: one per rank); bf16 there may be BF16_Optimizer's
    sd = _bf16_optimizer_masters(tagdir) if (tagdir / "mp_rank_00_model_states.pt").is_file() else None
    if sd is None and any(tagdir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_load.deepspeed_loads():  # zero_to_fp32 asks for weights_only=False; it gets True
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckdir), tag=tag)
    elif sd is None:  # ZeRO-0: the full module is in the model states file
        states = safe_load.load(next(tagdir.glob("*model_states.pt")))
        sd = states.get("module") if isinstance(states, dict) else None
        if not isinstance(sd, dict):
            raise ConfigError(f"{next(tagdir.glob('*model_states.pt'))}: not a DeepSpeed model states file")
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def _bf16_optimizer_masters(tagdir: Path) -> Optional[Dict[str, torch.Tensor]]:
    """The fp32 masters of a checkpoint of DeepSpeed's ``BF16_Optimizer`` (bf16 under ZeRO-0/1 with fp32 gradient
    accumulation: the shipped ``digpt_vitb16_in1k``, ``cifar10_*``, ``segment_*``), which ``zero_to_fp32`` refuses
    ("is not a zero checkpoint"). Each rank's file holds its contiguous slice of every group's flat fp32 buffer
    and, per parameter, the fragment of it that slice holds (``param_slice_mappings``); a parameter is its
    fragments in rank order, shaped by the model states' ``param_shapes``. Persistent buffers come from the
    model states (the module's own copy). Written here because DeepSpeed's one reader of these files,
    ``ds_to_universal``, writes a second copy of the whole checkpoint (optimizer moments included) to disk just to
    read the weights back. None where the files are not BF16_Optimizer's (ZeRO-1/2's own
    optimizer, bf16 or not, names its files the same way and records its stage)."""
    from . import safe_load

    def rank_of(f: Path) -> int:
        return int(f.name.split("_rank_")[1].split("_")[0])

    files = sorted(tagdir.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=rank_of)
    if not files:
        return None
    try:  # the files come from anyone: a wrong type, shape or range is one line naming the folder
        return _bf16_masters_from(tagdir, files, rank_of, safe_load)
    except (AttributeError, TypeError, ValueError, RuntimeError, IndexError, KeyError) as e:
        raise ConfigError(f"{tagdir}: a damaged DeepSpeed bf16 optimizer checkpoint "
                          f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None


def _bf16_masters_from(tagdir: Path, files, rank_of, safe_load) -> Optional[Dict[str, torch.Tensor]]:
    first = safe_load.load(files[0]).get("optimizer_state_dict", {})
    if "zero_stage" in first:  # ZeRO-1/2's own optimizer (bf16 too): zero_to_fp32 reads it
        return None
    if [rank_of(f) for f in files] != list(range(len(files))):
        raise ConfigError(f"{tagdir}: the optimizer files of ranks {[rank_of(f) for f in files]} are not 0..n-1")
    states = safe_load.load(next(tagdir.glob("mp_rank_00_model_states.pt")))
    shapes = {}
    for group in (states.get("param_shapes") if isinstance(states, dict) else None) or []:
        shapes.update(group)
    pieces: Dict[str, list] = {}
    for i, f in enumerate(files):
        osd = first if i == 0 else safe_load.load(f).get("optimizer_state_dict", {})
        flats, maps = osd.get("single_partition_of_fp32_groups"), osd.get("param_slice_mappings")
        if not (isinstance(flats, list) and isinstance(maps, list) and len(flats) == len(maps)):
            raise ConfigError(f"{f}: not a DeepSpeed bf16 optimizer file (no fp32 partitions and their mappings)")
        for flat, mapping in zip(flats, maps):
            for name, frag in mapping.items():
                start, numel = int(frag.start), int(frag.numel)
                if not (0 <= start and 0 <= numel and start + numel <= flat.numel()):
                    raise ValueError(f"{f.name}: the fragment of {name} lies outside its partition")
                pieces.setdefault(name, []).append(flat.narrow(0, start, numel))
    sd = {}
    for name, shape in shapes.items():
        shape = tuple(int(n) for n in shape)
        flat = torch.cat(pieces[name]) if name in pieces else torch.zeros(0)
        if flat.numel() != math.prod(shape):
            raise ConfigError(f"{tagdir}: parameter {name} has {flat.numel()} fp32 values in the optimizer files, "
                              f"its shape {tuple(shape)} needs {math.prod(shape)}")
        sd[name] = flat.view(tuple(shape)).clone()
    module = states.get("module") or {}
    for name in states.get("buffer_names") or []:
        if name in module:
            sd[name] = module[name]
    return sd


def load_any(path, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A megadigpt state dict from a DeepSpeed checkpoint, a megadigpt .safetensors, or a reference .pth."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    if _is_ds_dir(p):
        return load_deepspeed(p, tag)
    if p.suffix == ".safetensors":
        sd = load_safetensors(p)
        if any(k.startswith("blocks.") for k in sd) and not any(k.startswith("encoder.") for k in sd):
            raise ConfigError(f"{path} is an encoder-only (timm) export; give the full megadigpt state")
        return sd
    return from_reference(load_reference_file(p))


def load_reference_file(path) -> Dict[str, torch.Tensor]:
    obj = _load_pth(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or "ar_token" not in sd:
        raise ConfigError(f"{path}: not a reference D-iGPT checkpoint (no 'model' with 'ar_token')")
    return sd


def load_safetensors(path) -> Dict[str, torch.Tensor]:
    """safetensors holds no code; a damaged header or file is still a one-line error naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise ConfigError(f"{path}: not a loadable safetensors file ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]})") from None


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")


def _load_pth(path):
    """A ``.pth`` (reference or MAE-style fine-tuned checkpoint), loaded safely; MAE-style ones carry their
    ``argparse.Namespace`` of training arguments, the one non-tensor type allowed beyond DeepSpeed's."""
    import argparse

    from . import safe_load

    return safe_load.load(path, extra_globals=[argparse.Namespace], deepspeed_types=False)


# ------------------------------------------------------------------------------------------- timm

def encoder_state(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if "pos_embed" not in enc or "patch_embed.proj.weight" not in enc:
        raise ConfigError("the checkpoint has no megadigpt encoder (encoder.pos_embed, encoder.patch_embed...)")
    return enc


def encoder_geometry(enc: Dict[str, torch.Tensor]) -> dict:
    w = enc["patch_embed.proj.weight"]
    depth = 1 + max(int(m.group(1)) for k in enc for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
    embed, patch = w.shape[0], w.shape[-1]
    grid = int(round((enc["pos_embed"].shape[1] - 1) ** 0.5))
    hidden = enc["blocks.0.mlp.fc1.weight"].shape[0]
    return {"embed_dim": embed, "depth": depth, "patch_size": patch, "img_size": grid * patch,
            "mlp_ratio": hidden / embed}


def timm_export(sd: Dict[str, torch.Tensor], num_heads: int, out_dir, final_norm: bool = True,
                run_config: Optional[dict] = None, step: Optional[int] = None, metrics: Optional[dict] = None,
                source: Optional[str] = None, precision: Optional[str] = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` (the model card); returns the folder.

    ``run_config``: the pretraining run's resolved ``config.yaml`` (plain dict): preprocessing, objective, teacher,
    data for ``pretrained_cfg`` and the card (None: megadigpt's defaults, and the card says they were not recorded).
    ``step``: the checkpoint's optimizer step; ``metrics``: e.g. the run's last k-NN top-1 at that step;
    ``precision``: the one the run resolved (its start event), where ``train.precision`` says ``auto``.

    Pooled as the probe and fine-tuning measure (module docstring): ``global_pool`` is fine-tuning's default
    (``avg``), and with ``final_norm`` its ``fc_norm`` at the initial (1, 0) values a fine-tune starts from."""
    from ..config import ClassifierConfig

    enc = encoder_state(sd)
    g = encoder_geometry(enc)
    if g["embed_dim"] % num_heads:
        raise ConfigError(f"width {g['embed_dim']} is not divisible by --num-heads {num_heads}")
    state = {k: v.contiguous() for k, v in enc.items()}
    pool = ClassifierConfig().global_pool  # "avg": the paper's head; the probe's mean of the patch tokens
    if final_norm:  # timm names the norm after the pooling fc_norm, the one before it (CLS pooling) norm
        norm = "fc_norm" if pool == "avg" else "norm"
        state[f"{norm}.weight"] = torch.ones(g["embed_dim"])
        state[f"{norm}.bias"] = torch.zeros(g["embed_dim"])
    model_args = {"img_size": g["img_size"], "patch_size": g["patch_size"], "embed_dim": g["embed_dim"],
                  "depth": g["depth"], "num_heads": num_heads, "mlp_ratio": g["mlp_ratio"], "qkv_bias": True,
                  "class_token": True, "global_pool": pool, "final_norm": final_norm, "num_classes": 0}
    pre, recorded = pretraining_preprocessing(run_config, g["img_size"])
    record = {"kind": "encoder", "step": step, "metrics": metrics or {}, "source": _public(source),
              "preprocessing_from": "the run's config.yaml" if recorded else "megadigpt's defaults (not recorded)",
              "pretraining": _pretraining_summary(run_config, step, precision)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_timm_folder(out, state, model_args, pre, record)
    return out


# Used only as a constructor for geometries no timm entry point has: its defaults (patch 16, width 768, depth 12,
# heads 12) are all replaced by the export's model_args, which set every size.
GENERIC_BUILDER = "vit_base_patch16_224"
_SIZE_ARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def model_name(model_args: dict) -> str:
    """The export's own name, e.g. ``megadigpt_vit_d6_w192_h3_p4_s32``: no timm entry point is named like this."""
    a = model_args
    name = f"megadigpt_vit_d{a['depth']}_w{a['embed_dim']}_h{a['num_heads']}_p{a['patch_size']}_s{a['img_size']}"
    if abs(float(a.get("mlp_ratio", 4.0)) - 4.0) > 1e-9:
        name += f"_m{float(a['mlp_ratio']):.4g}".replace(".", "p")
    if a.get("num_classes"):
        name += f"_cls{a['num_classes']}"
    return name


def _param_shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def timm_builder(model_args: dict):
    """``(architecture, standard)``: timm's own name where its entry point, with its own defaults, builds exactly
    this network (every parameter shape and the head count; built on the meta device, no memory), else
    :data:`GENERIC_BUILDER` (``standard`` False), which ``model_args`` fully override."""
    import timm

    from ..model.vit import VIT_SIZES

    a = model_args
    size = next((n for n, s in VIT_SIZES.items() if (s.embed_dim, s.depth, s.num_heads) ==
                 (a["embed_dim"], a["depth"], a["num_heads"]) and abs(s.mlp_ratio - a["mlp_ratio"]) < 1e-6), None)
    name = f"{size}_patch{a['patch_size']}_{a['img_size']}" if size else None
    if not name or not timm.is_model(name):
        return GENERIC_BUILDER, False
    rest = {k: v for k, v in a.items() if k not in _SIZE_ARGS}
    with torch.device("meta"):
        theirs, ours = timm.create_model(name, **rest), timm.create_model(name, **a)
    same = (_param_shapes(theirs) == _param_shapes(ours)
            and theirs.blocks[0].attn.num_heads == ours.blocks[0].attn.num_heads)
    return (name, True) if same else (GENERIC_BUILDER, False)


def pretraining_preprocessing(run_config: Optional[dict], img_size: int):
    """``(preprocessing, recorded)`` of a pretrained encoder: the run's ``data.mean/std/interpolation`` (the
    student's normalisation and resize), ``input_size`` from the weights, and the evaluation crop megadigpt's
    fine-tuning and k-NN use by default (pretraining has none). ``recorded`` False: no config came with the
    weights, the values are megadigpt's defaults."""
    from ..config import DataConfig, FinetuneDataConfig

    data = (run_config or {}).get("data") or {}
    dflt = DataConfig()
    pre = {"input_size": [3, img_size, img_size], "interpolation": str(data.get("interpolation", dflt.interpolation)),
           "mean": [float(v) for v in data.get("mean", dflt.mean)],
           "std": [float(v) for v in data.get("std", dflt.std)],
           "crop_pct": float(FinetuneDataConfig().crop_pct), "crop_mode": "center"}
    return pre, run_config is not None


def write_timm_folder(out: Path, state: Dict[str, torch.Tensor], model_args: dict, preprocessing: dict,
                      record: dict, label_names=None) -> dict:
    """``model.safetensors``, ``config.json`` and ``README.md`` into the (existing) folder ``out``, every file with
    the umask's mode; returns the config. Raises if timm, from the config alone, would not build this state."""
    from safetensors.torch import save_file

    arch, standard = timm_builder(model_args)
    name = model_name(model_args)
    n = int(model_args.get("num_classes") or 0)
    what = f"{n}-class classifier" if n else "encoder (no classifier head)"
    desc = (f"megadigpt D-iGPT ViT {what}: depth {model_args['depth']}, width {model_args['embed_dim']}, "
            f"{model_args['num_heads']} heads, patch {model_args['patch_size']}, {model_args['img_size']} px" +
            ("" if standard else f"; not a standard timm model: {arch} is only the builder, every size is set "
                                 f"by model_args"))
    pretrained_cfg = {**preprocessing, "fixed_input_size": True, "num_classes": n, "first_conv": "patch_embed.proj",
                      "classifier": "head", "tag": name, "description": desc, "license": card_license()[0]}
    cfg = {"architecture": arch, "model_name": name, "num_classes": n, "num_features": model_args["embed_dim"],
           "global_pool": model_args.get("global_pool", "token"), "model_args": model_args,
           "pretrained_cfg": pretrained_cfg}
    if label_names is not None:
        cfg["label_names"] = list(label_names)
    n_params = sum(v.numel() for v in state.values())
    cfg["megadigpt"] = {"model_name": name, "standard_timm_name": standard, "parameters": n_params, **record}
    _check_builds(arch, model_args, state)
    # each file replaced atomically (an existing export keeps whole files if this is killed), then recorded as
    # megadigpt's: a later export into this folder replaces them without --force while they are unchanged
    _replace_with(out / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    write_atomic(out / "config.json", json.dumps(cfg, indent=1), what="export file", mode=0o666)
    write_atomic(out / "README.md", model_card(cfg), what="export file", mode=0o666)
    follow_umask(out / "model.safetensors", out / "config.json", out / "README.md")
    record_outputs(out, TIMM_FILES, "export")
    return cfg


def _check_builds(arch: str, model_args: dict, state: Dict[str, torch.Tensor]) -> None:
    import timm

    with torch.device("meta"):
        built = _param_shapes(timm.create_model(arch, **model_args))
    mine = {k: tuple(v.shape) for k, v in state.items()}
    if built != mine:
        diff = sorted(set(built.items()) ^ set(mine.items()))[:4]
        raise RuntimeError(f"timm's {arch} with this export's model_args does not build its weights: {diff}")


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (``/proc/self/status``); elsewhere the
    usual set-and-restore, through a restrictive value so no file made meanwhile is more open than intended."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    import os

    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def follow_umask(*paths) -> None:
    """Give each file the mode ``open()`` would have: ``0o666 & ~umask`` (safetensors' writer makes 0600)."""
    import os

    mode = 0o666 & ~_umask()
    for p in paths:
        os.chmod(p, mode)


def _public(text):
    """A source for a card or config that may be published: URLs lose their credentials and query strings
    (``https://user:token@host/x?sig=...`` -> ``https://host/x``), ``pipe:`` commands all but their program, and a
    local path (absolute or relative) all but its base name, marked as cut (``/home/me/data/train-{0..9}.tar`` ->
    ``.../train-{0..9}.tar``): it says nothing to a reader elsewhere and may name a user or a site's layout."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return [_public(t) for t in text]
    from urllib.parse import urlsplit, urlunsplit

    s = str(text)
    if s.startswith("pipe:"):  # a shell command may carry a token (curl -H ...): only its program is kept
        return "pipe:" + (s[5:].split() or ["?"])[0].rsplit("/", 1)[-1] + " ..."
    if "://" not in s:
        base = s.rstrip("/" + os.sep)
        if "{" in base:  # a brace set: the name is what follows the last separator before the braces
            head, brace = base.split("{", 1)
            cut = max(head.rfind("/"), head.rfind(os.sep))
            return s if cut < 0 else ".../" + base[cut + 1:]
        if "/" in base or os.sep in base or base.startswith("~"):
            return ".../" + os.path.basename(base) if os.path.basename(base) else "..."
        return s
    u = urlsplit(s)
    return urlunsplit((u.scheme, u.hostname + (f":{u.port}" if u.port else "") if u.hostname else u.netloc, u.path,
                       "", ""))


def _pretraining_summary(run_config: Optional[dict], step: Optional[int],
                         precision: Optional[str] = None) -> Optional[dict]:
    """What a card needs from a pretraining run's config: objective, teacher, data, schedule; ``precision`` the
    resolved one (:func:`resolved_precision`), else the config's."""
    if not run_config:
        return None
    model, target = run_config.get("model") or {}, run_config.get("target") or {}
    data, train, optim = run_config.get("data") or {}, run_config.get("train") or {}, run_config.get("optim") or {}
    gb = train.get("global_batch")
    return {"objective": model.get("objective"), "arch": model.get("arch"),
            "target": {k: _public(target.get(k)) if k in ("model", "tokenizer") else target.get(k)
                       for k in ("kind", "model", "layer", "image_size", "tokenizer") if target.get(k) is not None},
            "data_source": _public(data.get("source")), "data_mode": data.get("mode"),
            "steps": step, "max_steps": train.get("max_steps"), "epochs": train.get("epochs"), "global_batch": gb,
            "images_seen": step * gb if step is not None and gb else None, "lr": optim.get("lr"),
            "blr": optim.get("blr"), "weight_decay": optim.get("weight_decay"),
            "precision": _precision_text(train.get("precision"), precision), "segment_grid": model.get("segment_grid"),
            "decoder_dim": model.get("decoder_dim"),
            "decoder_depth": model.get("decoder_depth"), "seed": train.get("seed")}


def read_run_config(run_dir) -> Optional[dict]:
    """A run directory's resolved ``config.yaml`` as plain (safe) YAML, or None; ``train.precision: auto`` replaced
    by the precision the run resolved (its start event in ``metrics.jsonl``), where logged."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(cfg, dict):
        return None
    train = cfg.get("train")
    if isinstance(train, dict) and train.get("precision") == "auto":
        train["precision"] = _precision_text("auto", resolved_precision(run_dir))
    return cfg


def pretraining_record(src) -> Optional[dict]:
    """What a fine-tune started from, cheaply (no weights read): a megadigpt timm export's own record, or a
    pretraining run's config and checkpoint step. None for anything else (a file, a reference .pth)."""
    if not src:
        return None
    p = Path(src)
    try:
        if (p / "config.json").is_file():
            meta = _read_json(p / "config.json").get("megadigpt") or {}
            if meta.get("kind") == "encoder":
                return {"model_name": meta.get("model_name"), **(meta.get("pretraining") or {})}
            return meta.get("pretraining")
        if _is_ds_dir(p):
            cfg = _run_yaml(p)
            if cfg and "target" in cfg:
                step = checkpoint_step(p)
                return _pretraining_summary(cfg, step, resolved_precision(p, step))
    except (ConfigError, OSError, AttributeError):
        return None
    return None


def finetune_record(run_config: Optional[dict], metrics: Optional[dict]) -> dict:
    """The ``megadigpt`` record of a fine-tuning export: its metrics, recipe, and the pretraining it started from."""
    rc = run_config or {}
    model, data, train = rc.get("model") or {}, rc.get("data") or {}, rc.get("train") or {}
    optim, ft = rc.get("optim") or {}, rc.get("finetune") or {}
    m = metrics or {}
    recipe = {"init_from": _public(train.get("init_from")), "train_data": _public(data.get("train")),
              "val_data": _public(data.get("val")), "steps": m.get("step"), "epoch": m.get("epoch"),
              "planned_epochs": train.get("epochs"), "global_batch": train.get("global_batch"),
              "lr": optim.get("lr"), "blr": optim.get("blr"), "layer_decay": optim.get("layer_decay"),
              "weight_decay": optim.get("weight_decay"), "drop_path": model.get("drop_path"),
              "mixup": ft.get("mixup"), "cutmix": ft.get("cutmix"), "label_smoothing": ft.get("smoothing"),
              "random_erasing": ft.get("reprob"), "auto_augment": data.get("auto_augment"),
              "ema_decay": ft.get("ema_decay"), "precision": _precision_text(train.get("precision"), None),
              "seed": train.get("seed")}
    return {"kind": "classifier", "step": m.get("step"), "metrics": dict(m),
            "preprocessing_from": "the fine-tuning run's config" if run_config else "the export's arguments",
            "finetuning": {k: v for k, v in recipe.items() if v is not None} if run_config else None,
            "pretraining": pretraining_record(train.get("init_from"))}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


_METRIC_LABELS = {"top1": "val top-1 (%)", "top5": "val top-5 (%)", "loss": "val loss",
                  "best_top1": "best val top-1 (%)", "knn_top1": "k-NN top-1 (%, the monitor)",
                  "knn_top5": "k-NN top-5 (%, the monitor)", "best_knn_top1": "best k-NN top-1 (%, the monitor)",
                  "gen_loss": "generative loss (training, last logged)",
                  "dis_loss": "discriminative loss (training, last logged)"}

# The paper megadigpt implements (../README.md): its arXiv record, cited in every card
PAPER_ARXIV = "2312.02147"
CITATION = """@article{ren2023rejuvenating,
  title   = {Rejuvenating image-GPT as Strong Visual Representation Learners},
  author  = {Ren, Sucheng and Wang, Zeyu and Zhu, Hongru and Xiao, Junfei and Yuille, Alan and Xie, Cihang},
  journal = {arXiv preprint arXiv:2312.02147},
  year    = {2023}
}"""


def card_license():
    """``(front-matter id, sentence)``: the licence megadigpt's package declares (its metadata: ``setup.py``'s
    ``license``), lower-cased as the Hugging Face ids are (``apache-2.0``, ``mit``); where it declares none (today:
    no LICENSE file, no ``license`` in setup.py), ``other`` and a sentence that says so. Either way the training
    data's and the teacher's own terms also bind the weights."""
    lic = None
    try:
        from importlib import metadata

        meta = metadata.metadata("megadigpt")
        lic = meta.get("License-Expression") or meta.get("License")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout on PYTHONPATH)
        lic = None
    terms = "the terms of the training data and of the teacher model also apply to these weights"
    if lic and lic.strip() and lic.strip().upper() not in ("UNKNOWN", "NONE"):
        return lic.strip().lower(), f"megadigpt is released under {lic.strip()}; {terms}."
    return "other", ("megadigpt declares no licence (no LICENSE file, no licence in its setup.py), so none is "
                     f"granted here: ask the weights' authors before reuse; {terms}.")


def _metric_rows(mets: dict) -> list:
    """The card's metrics table: each value with its name and the step it was measured at (``<name>_step``, or
    the export's ``step`` / ``epoch`` for a fine-tune's validation numbers); no bare ``step`` rows."""
    step, epoch = mets.get("step"), mets.get("epoch")
    at_export = f"step {step}" + (f" (epoch {_fmt(epoch)})" if epoch is not None else "") if step is not None else "-"
    rows = ["| metric | value | measured at |", "|---|---|---|"]
    for k, v in mets.items():
        if v is None or k in ("step", "epoch") or k.endswith("_step") or isinstance(v, (dict, list)):
            continue
        if f"{k}_step" in mets:
            when = f"step {mets[f'{k}_step']}"
        elif k.startswith("best_"):
            when = f"the run's best, up to step {step}" if step is not None else "the run's best"
        else:
            when = at_export
        rows.append(f"| {_METRIC_LABELS.get(k, k.replace('_', ' '))} | {_fmt(v)} | {when} |")
    return rows if len(rows) > 2 else []


def _pooling_text(args: dict, n: int) -> str:
    pool, norm = args.get("global_pool", "token"), args.get("final_norm", True)
    if pool == "avg":
        text = "the mean of the patch tokens (`global_pool='avg'`, CLS left out)"
        if not norm:
            return text + ", no norm: `model(x)` is megadigpt's probe / k-NN features"
        if n:
            return text + ", then `fc_norm` (LayerNorm) and the head: the paper's fine-tuning head"
        return (text + ", then `fc_norm` (a LayerNorm at its initial values 1, 0: where a fine-tune starts; "
                "pretraining has no final norm): the paper's fine-tuning head's input. megadigpt's probe and k-NN "
                "score the mean before the norm (see How to use)")
    return (f"`global_pool='{pool}'`" + (" after the final LayerNorm" if norm else " (no final LayerNorm: the raw "
                                                                                  "trunk)"))


def model_card(cfg: dict) -> str:
    """The folder's ``README.md``, in the layout of timm's Hugging Face cards: front matter (library, licence,
    tags with the paper's arXiv id), details, training, metrics, usage, citation, licence. Plain string formatting
    of the config's values (no template engine: nothing in a card is evaluated)."""
    meta, args, pcfg = cfg.get("megadigpt", {}), cfg["model_args"], cfg["pretrained_cfg"]
    name, arch, n = cfg["model_name"], cfg["architecture"], int(cfg.get("num_classes") or 0)
    folder = "path/to/" + name
    task = "image-classification" if n else "image-feature-extraction"
    lic_id, lic_text = card_license()
    front = ["---", "library_name: timm", f"license: {lic_id}"]
    if lic_id == "other":
        front.append("license_name: none-declared")
    lines = front + ["tags:", f"- {task}", "- timm", "- megadigpt", "- d-igpt", f"- arxiv:{PAPER_ARXIV}", "---", "",
                     f"# {name}", "",
                     (f"A {n}-class image classifier fine-tuned with megadigpt from a D-iGPT-pretrained ViT." if n
                      else "A ViT encoder pretrained with megadigpt's D-iGPT recipe (an image feature backbone: no "
                           "classifier head)."), "", "## Model details", "",
                     f"- **Model type:** {'image classification' if n else 'image feature backbone'}",
                     f"- **Parameters:** {meta.get('parameters', 0) / 1e6:.2f} M ({meta.get('parameters', 0):,})",
                     f"- **Depth:** {args['depth']} blocks", f"- **Width:** {args['embed_dim']}",
                     f"- **Heads:** {args['num_heads']}", f"- **MLP ratio:** {_fmt(float(args['mlp_ratio']))}",
                     f"- **Patch size:** {args['patch_size']}",
                     f"- **Image size:** {args['img_size']} x {args['img_size']} "
                     f"({(args['img_size'] // args['patch_size']) ** 2} patches + CLS)",
                     f"- **Pooling:** {_pooling_text(args, n)}",
                     f"- **Classes:** {n}" if n else "- **Classes:** none (features: `num_classes=0`)"]
    if meta.get("standard_timm_name"):
        lines.append(f"- **timm architecture:** `{arch}` (timm's standard model of this geometry)")
    else:
        lines.append(f"- **timm architecture:** not a standard timm model. `config.json` names `{arch}` only as "
                     f"the builder timm requires; `model_args` set every size above")
    lines += [f"- **Preprocessing** ({meta.get('preprocessing_from', 'the run config')}): input "
              f"{_fmt(pcfg['input_size'])}, mean ({_fmt(pcfg['mean'])}), std ({_fmt(pcfg['std'])}), "
              f"{pcfg['interpolation']} interpolation, crop_pct {_fmt(pcfg['crop_pct'])}"]
    if meta.get("source"):
        lines.append(f"- **Exported from:** `{_fmt(_public(meta['source']))}`")
    pre = meta.get("pretraining")
    lines += ["", "## Pretraining", ""]
    if pre:
        t = pre.get("target") or {}
        teacher = t.get("kind", "?") + (f" ({_public(t['model'])})" if t.get("model") else "") + \
            (f", layer {t['layer']}" if t.get("layer") else "") + (f", tokenizer {_public(t['tokenizer'])}"
                                                                 if t.get("tokenizer") else "")
        rows = [("Pretrained encoder", pre.get("model_name")), ("Objective", pre.get("objective")),
                ("Teacher / target", teacher),
                ("Data source", _public(pre.get("data_source"))), ("Steps", pre.get("steps")),
                ("Global batch", pre.get("global_batch")), ("Images seen", pre.get("images_seen")),
                ("Planned", f"max_steps {pre['max_steps']}" if pre.get("max_steps") else
                 (f"{_fmt(pre['epochs'])} epochs" if pre.get("epochs") is not None else None)),
                ("Learning rate", pre.get("lr") if pre.get("lr") is not None else
                 (f"blr {_fmt(pre['blr'])} per 256 images" if pre.get("blr") is not None else None)),
                ("Weight decay", pre.get("weight_decay")), ("Precision", _precision_text(pre.get("precision"), None)),
                ("Decoders", f"width {pre['decoder_dim']}, depth {pre['decoder_depth']}"
                 if pre.get("decoder_dim") else None), ("Segment grid", pre.get("segment_grid")),
                ("Seed", pre.get("seed"))]
        lines += [f"- **{k}:** {_fmt(v)}" for k, v in rows if v is not None]
    else:
        lines.append("Not recorded with these weights (no pretraining run config came with them).")
    ft = meta.get("finetuning")
    if ft:
        lines += ["", "## Fine-tuning", ""]
        lines += [f"- **{k.replace('_', ' ')}:** "
                  f"{_fmt(_public(v) if k in ('init_from', 'train_data', 'val_data') else v)}"
                  for k, v in ft.items() if v is not None]
    rows = _metric_rows({k: v for k, v in (meta.get("metrics") or {}).items() if v is not None})
    if rows:
        lines += ["", "## Metrics", ""] + rows
    lines += ["", "## How to use", "", "```python", "import timm", "import torch", "from PIL import Image", "",
              f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()',
              "cfg = timm.data.resolve_data_config({}, model=model)  # this card's preprocessing",
              "transform = timm.data.create_transform(**cfg)",
              'x = transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0)', "with torch.no_grad():"]
    c = args["embed_dim"]
    if n:
        lines += ["    probs = model(x).softmax(-1)  # (1, %d)" % n,
                  "    features = model.forward_head(model.forward_features(x), pre_logits=True)  # (1, %d): the "
                  "head's input" % c]
    elif args.get("global_pool") == "avg":
        lines += ["    tokens = model.forward_features(x)  # (1, 1 + patches, %d): the last block's tokens, CLS first"
                  % c,
                  "    features = tokens[:, model.num_prefix_tokens:].mean(1)  # (1, %d): megadigpt's probe / k-NN "
                  "features" % c]
        lines += (["    pooled = model.forward_head(tokens, pre_logits=True)  # = model(x): fc_norm(features), the "
                   "fine-tuning head's input"] if args.get("final_norm", True) else
                  ["    assert torch.allclose(model(x), features)  # no norm: model(x) is those features"])
    else:
        lines += ["    features = model.forward_features(x)  # (1, tokens, %d)" % c,
                  "    pooled = model(x)  # (1, %d)" % c]
    lines += ["```", "",
              "`pretrained=True` loads `model.safetensors` from this folder; without it timm builds random weights. "
              + ("For a new task pass `num_classes=N` (a fresh head). " if n else
                 "To fine-tune, pass `num_classes=N`: a fresh head on this pooling, the paper's fine-tuning model. ")
              + "By name, with the same preprocessing (and pooling: `model_args`):", "", "```python", "import json",
              f'cfg = json.load(open("{folder}/config.json"))',
              'model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],',
              '                          pretrained_cfg=dict(cfg["pretrained_cfg"],',
              f'                                              file="{folder}/model.safetensors"))',
              "```", "", "## Files", "", "- `model.safetensors`: the weights (timm's parameter names)",
              "- `config.json`: timm's hub config (`architecture`, `model_args`, `pretrained_cfg`) and megadigpt's "
              "record (`megadigpt`)", "- `README.md`: this card", "", "## Citation", "",
              f"D-iGPT, the method these weights were trained with (arXiv:{PAPER_ARXIV}):", "", "```bibtex",
              CITATION, "```", "", "## Licence", "", lic_text, ""]
    return "\n".join(lines)


def load_timm(folder, **kwargs):
    """The by-name route: ``timm.create_model(architecture, pretrained=True, pretrained_cfg=<the export's>,
    **model_args)``, every key matched (strict) and ``model.pretrained_cfg`` the export's own, as
    ``timm.create_model("local-dir:<folder>", pretrained=True)`` gives."""
    import timm

    folder = Path(folder)
    cfg = _read_json(folder / "config.json")
    pcfg = dict(cfg["pretrained_cfg"], file=str(folder / "model.safetensors"))
    pcfg["input_size"] = tuple(pcfg["input_size"])  # as local-dir: gives (timm's _hub._parse_model_cfg)
    if cfg.get("label_names") is not None:
        pcfg["label_names"] = cfg["label_names"]
    return timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg=pcfg,
                             **{**cfg["model_args"], **kwargs})


# ------------------------------------------------------------------------------------------- any encoder, timm layout

def load_encoder_weights(path, tag: Optional[str] = None):
    """The encoder (timm ``VisionTransformer`` names) from anything megadigpt can start a fine-tune or probe from:
    a pretraining run / checkpoint / ``.safetensors``, a timm export folder or ``.safetensors`` (a fine-tune's
    ``best``/``last`` too, head included), a fine-tuning run directory, or a reference ``.pth`` (pretraining or
    MAE-style fine-tuned). Returns ``(state_dict, info)``; ``info`` may hold ``num_heads`` and ``label_names``."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"weights not found: {path}")
    info = {}
    if p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        meta = _read_json(p / "config.json")
        info["num_heads"] = meta.get("model_args", {}).get("num_heads")
        info["label_names"] = meta.get("label_names")
        sd = load_safetensors(p / "model.safetensors")
    elif _is_ds_dir(p):
        sd = load_deepspeed(p, tag)
        info["num_heads"] = _heads_from_run(p)
        info["label_names"] = _labels_from_run(p)
    elif p.suffix == ".safetensors":
        sd = load_safetensors(p)
    elif p.is_dir():
        raise ConfigError(f"{path}: a folder with neither checkpoints (checkpoints/, or DeepSpeed shards) nor a timm "
                          f"export (config.json + model.safetensors)")
    else:
        obj = _load_pth(p)
        sd = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise ConfigError(f"{path}: not a state dict")
        if "ar_token" in sd:
            sd = from_reference(sd)
    if any(k.startswith("encoder.") for k in sd):
        sd = encoder_state(sd)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise ConfigError(f"{path}: no ViT encoder in it (need patch_embed.proj.weight, pos_embed, blocks.*; "
                          f"found e.g. {sorted(sd)[:4]})")
    return {k: v.float() for k, v in sd.items()}, info


def geometry_of(sd: Dict[str, torch.Tensor], num_heads: Optional[int]):
    from ..model.classifier import EncoderGeometry

    g = encoder_geometry(sd)
    heads = num_heads or default_heads(g["embed_dim"])
    if heads is None:
        raise ConfigError(f"width {g['embed_dim']} is not a standard ViT size: set model.num_heads")
    if g["embed_dim"] % heads:
        raise ConfigError(f"width {g['embed_dim']} is not divisible by {heads} heads")
    return EncoderGeometry(g["embed_dim"], g["depth"], heads, g["mlp_ratio"], g["patch_size"]), g["img_size"]


# ------------------------------------------------------------------------------------------- reference layout

# Mapped by ROLE, not by name (spec §4, "Naming trap"): the reference's ``forward_encoder`` returns
# ``(x_kd, x_ar, ...)`` and ``forward`` unpacks ``latent_ar, latent_kd, ...``, so the weights it names
# ``ar_enc_norm``/``ar_enc2dec`` build the memory of the discriminative decoder (``kd_blocks``) and
# ``kd_enc_norm``/``kd_enc2dec`` that of the generative one (``ar_blocks``). The decoders themselves (``*_token``,
# ``*_blocks``, ``*_norm``, ``*_pred``) are used under their own names: ar = generative, kd = discriminative.
_DECODER = {"gen": "ar", "dis": "kd"}  # megadigpt decoder -> the reference's decoder prefix
_MEMORY = {"gen": "kd", "dis": "ar"}  # megadigpt decoder -> the prefix of the reference taps that feed it
_SLOTS = {"enc": r"(?:patch_embed|blocks)\..+|cls_token|pos_embed", "wb": r"weight|bias", "i": r"\d+", "rest": r".+"}
# (megadigpt name, reference name); {slots} match the same text on both sides
_PAIRS = [("encoder.{enc}", "{enc}")]
for _o, _r in _DECODER.items():
    _PAIRS += [(f"{_o}_taps.proj.{{wb}}", f"{_MEMORY[_o]}_enc2dec.{{wb}}"),
               (f"{_o}_decoder.query_token", f"{_r}_token"), (f"{_o}_decoder.norm.{{wb}}", f"{_r}_norm.{{wb}}"),
               (f"{_o}_decoder.head.{{wb}}", f"{_r}_pred.{{wb}}")]
    for _a, _b in (("norm1", "norm1"), ("self_attn", "attn1"), ("norm_cross_q", "norm2_1"),
                   ("norm_cross_kv", "norm2_2"), ("cross_attn", "attn2"), ("norm2", "norm2"), ("mlp", "mlp")):
        _PAIRS.append((f"{_o}_decoder.blocks.{{i}}.{_a}.{{rest}}", f"{_r}_blocks.{{i}}.{_b}.{{rest}}"))


def _pattern(template: str) -> str:
    return re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m.group(1)}>{_SLOTS[m.group(1)]})", re.escape(template))


def _translate(key: str, to_reference: bool) -> Optional[str]:
    """One parameter name from the megadigpt layout to the reference's, or back (None: no such name)."""
    for ours, ref in _PAIRS:
        src, dst = (ours, ref) if to_reference else (ref, ours)
        m = re.fullmatch(_pattern(src), key)
        if m:
            return dst.format(**m.groupdict())
    return None


def to_reference(sd: Dict[str, torch.Tensor], segment_grid: int = 2) -> dict:
    from ..model.masks import SegmentLayout
    from ..model.pos_embed import sincos_2d

    if "gen_taps.proj.weight" not in sd or "dis_taps.proj.weight" not in sd:
        raise ConfigError("the reference layout holds both decoders; this model was pretrained with another "
                          "model.objective (dis_only / distill): convert --to timm or fp32 instead")
    embed = sd["encoder.cls_token"].shape[-1]
    num_taps = sd["gen_taps.proj.weight"].shape[1] // embed
    out = {}
    for k, v in sd.items():
        if k.startswith(("gen_taps.norm.", "dis_taps.norm.")):
            ref = _MEMORY[k[:3]]
            for i in range(num_taps):  # the reference repeats one LayerNorm module num_taps times
                out[f"{ref}_enc_norm.{i}." + k.split(".")[-1]] = v.clone()
            continue
        rk = _translate(k, to_reference=True)
        if rk is None:
            raise ConfigError(f"no reference name for parameter {k!r}")
        out[rk] = v
    g = encoder_geometry(encoder_state(sd))
    grid = g["img_size"] // g["patch_size"]
    dec_dim = sd["gen_decoder.query_token"].shape[-1]
    out["decoder_pos_embed"] = sincos_2d(dec_dim, grid)[None]
    lay = SegmentLayout(grid, segment_grid)
    out["mask"] = torch.zeros(lay.seq_len, lay.seq_len).masked_fill(~lay.mask(), float("-inf"))
    return {"model": out}


def from_reference(ref_sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for ref in ("ar", "kd"):
        norms = sorted(k for k in ref_sd if k.startswith(f"{ref}_enc_norm."))
        ws = [ref_sd[k] for k in norms if k.endswith("weight")]
        if not ws or any(not torch.equal(ws[0], w) for w in ws):
            raise ConfigError(f"reference {ref}_enc_norm.* are not one shared LayerNorm")
    ours_keys = {}
    for k, v in ref_sd.items():
        if k in ("decoder_pos_embed", "mask"):
            continue
        m = re.match(r"(ar|kd)_enc_norm\.0\.(weight|bias)$", k)
        if m:
            ours = next(o for o, r in _MEMORY.items() if r == m.group(1))  # by role, not by name
            ours_keys[f"{ours}_taps.norm.{m.group(2)}"] = v
            continue
        if "_enc_norm." in k:
            continue
        ours = _translate(k, to_reference=False)
        if ours is None:
            raise ConfigError(f"unknown key in the reference checkpoint: {k!r}")
        ours_keys[ours] = v
    out.update(ours_keys)
    return {k: v.float() for k, v in out.items()}


# ------------------------------------------------------------------------------------------- writing

def save_state(sd: Dict[str, torch.Tensor], path) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    state = {}
    for k, v in tqdm(sd.items(), desc="convert", unit="tensor", disable=len(sd) < 200):
        state[k] = v.contiguous()
    # the signature in the metadata lets a later convert replace this file without --force
    _replace_with(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", **SAFETENSORS_SIGNATURE}))


def default_heads(embed_dim: int) -> Optional[int]:
    from ..model.vit import VIT_SIZES

    return next((s.num_heads for s in VIT_SIZES.values() if s.embed_dim == embed_dim), None)


def convert(src, to: str, out, tag: Optional[str] = None, num_heads: Optional[int] = None,
            segment_grid: int = 2, final_norm: bool = True, force: bool = False):
    """``force``: replace existing files megadigpt did not write (never the input, never a checkpoint folder)."""
    if to not in ("timm", "reference", "fp32", "megadigpt"):
        raise ConfigError(f"--to must be timm, reference or fp32, got {to!r}")
    guard_convert_output(src, to, out, force)  # before anything is loaded
    sd = load_any(src, tag)
    if to == "timm":
        embed = encoder_geometry(encoder_state(sd))["embed_dim"]
        heads = num_heads or _heads_from_run(src) or default_heads(embed)
        if heads is None:
            raise ConfigError(f"width {embed} is not a standard ViT size: give --num-heads")
        run_cfg = _run_yaml(src)
        if run_cfg is not None and "target" not in run_cfg:
            run_cfg = None  # not a pretraining run's config
        step = checkpoint_step(src, tag)
        return timm_export(sd, heads, out, final_norm=final_norm, run_config=run_cfg, step=step,
                           metrics=_run_metrics(src, step) if step is not None else {}, source=str(src),
                           precision=resolved_precision(src, step) if step is not None else None)
    if to == "reference":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        ref = dict(to_reference(sd, segment_grid), megadigpt=REFERENCE_SIGNATURE)  # (their loader reads "model")
        return _replace_with(out, lambda tmp: torch.save(ref, tmp))
    if to in ("fp32", "megadigpt"):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_state(sd, out)
        return Path(out)
    raise ConfigError(f"--to must be timm, reference or fp32, got {to!r}")


def _run_yaml(src) -> Optional[dict]:
    """The resolved config.yaml of the run that ``src`` is (inside of), as plain YAML (pretraining or fine-tuning)."""
    import yaml

    for d in (Path(src), *list(Path(src).resolve().parents)[:3]):
        cfg = d / "config.yaml"
        if cfg.is_file():
            try:
                return yaml.safe_load(cfg.read_text()) or {}
            except yaml.YAMLError:
                return None
    return None


def _heads_from_run(src) -> Optional[int]:
    """The head count from the run's config.yaml, when the input is (inside) a run directory."""
    from ..model.vit import VIT_SIZES

    model = (_run_yaml(src) or {}).get("model", {})
    if model.get("num_heads"):
        return int(model["num_heads"])
    size = VIT_SIZES.get(model.get("arch"))
    return size.num_heads if size else None


def _labels_from_run(src) -> Optional[list]:
    for d in (Path(src), *list(Path(src).resolve().parents)[:3]):
        f = d / "label_names.json"
        if f.is_file():
            names = _read_json(f)
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise ConfigError(f"{f}: not a JSON list of class names")
            return names
    return None

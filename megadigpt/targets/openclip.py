"""OpenCLIP vision towers (the reference teacher is ViT-H-14): last-layer tokens after ``ln_post`` and ``proj``.

Only the image tower is ever built. ``open_clip.create_model`` builds the whole CLIP model, text tower included,
in fp32 on the CPU and then reads the whole weights file into a second copy: about 7.9 GB of host memory per rank
for ViT-H-14 (issue 27), of which the teacher keeps 1.3 GB (its image tower in bf16). Here the tower is built on
the meta device (nothing allocated), the ``visual.*`` tensors of the weights file (memory-mapped: the text tower's
bytes are never read) are assigned into it, each cast to the teacher's dtype and moved to the device on its own. A
random teacher (``target.random_weights``: benchmarks, tests) is built directly on the device in the teacher's
dtype by the tower's own constructor. The outputs equal the whole-model build's bit for bit (same modules, same
weights: ``tests/test_targets.py``)."""

import contextlib
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from ..config import ConfigError
from .base import CLIP_MEAN, CLIP_STD, Target, TargetSpec


def _vision_cfg(name: str):
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown open_clip model {name!r} (see open_clip.list_models())")
    return cfg


def describe(tcfg, size: int) -> TargetSpec:
    if not tcfg.model:
        raise ConfigError("target.model must name an open_clip architecture, e.g. ViT-H-14")
    cfg = _vision_cfg(tcfg.model)
    v = cfg["vision_cfg"]
    if "timm_model_name" in v or v.get("attentional_pool") or isinstance(v.get("layers"), (list, tuple)):
        raise ConfigError(f"open_clip model {tcfg.model!r} is not a plain ViT tower; use target.kind=timm for it")
    patch = v["patch_size"]
    if size % patch:
        raise ConfigError(f"open_clip {tcfg.model} has patch {patch}; target image_size {size} is not divisible")
    return TargetSpec(size, size // patch, cfg["embed_dim"], True, CLIP_MEAN, CLIP_STD)


@contextlib.contextmanager
def quiet_random_init():
    """open_clip warns on the root logger for every model built without weights; where that is intended (a random
    teacher by target.random_weights, which the start event records, or the planner's meta build) say nothing."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters created inside get ``dtype``: a random tower is initialised in the teacher's dtype, never in
    fp32 first (that would hold both copies at once)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def vision_tower(name: str, image_size: int, device=None, dtype: Optional[torch.dtype] = None):
    """The image tower of open_clip model ``name`` at ``image_size``, built as ``create_model`` builds it (the same
    config, ``quick_gelu`` and ``cast_dtype=None``, i.e. the modules of an fp32 build, so the forward is the same
    code) but without the text tower. On ``device`` ("meta": nothing allocated) with parameters created in
    ``dtype`` (default: torch's default dtype). With the same seed and fp32 on the CPU its random weights equal
    ``create_model``'s, which builds the image tower first."""
    from open_clip.model import _build_vision_tower

    cfg = _vision_cfg(name)
    vision_cfg = dict(cfg["vision_cfg"], image_size=image_size)  # create_model's force_image_size
    with quiet_random_init(), torch.device(device or "cpu"), _default_dtype(dtype or torch.get_default_dtype()):
        return _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False),
                                   cast_dtype=None)


def weights_file(tcfg) -> str:
    """The local file of ``target.weights``: the path itself, or the file a pretrained tag resolves to (open_clip's
    download cache, fetched on first use as ``create_model`` would)."""
    from .weights import is_file_ref

    if is_file_ref(tcfg.weights):
        return tcfg.weights
    import open_clip

    path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(tcfg.model, tcfg.weights))
    if not path:
        raise ConfigError(f"open_clip {tcfg.model}: pretrained tag {tcfg.weights!r} names no weights file")
    return path


def _strip_module(keys):
    """open_clip's load_state_dict drops a leading ``module.`` (weights saved from DistributedDataParallel)."""
    keys = list(keys)
    return 7 if keys and keys[0].startswith("module") else 0


def read_visual_state(path: str, convert=None) -> dict:
    """The image tower's tensors of a CLIP weights file, keys without ``visual.``, read as safely as
    ``weights.probe_file`` opens the file (safetensors, or ``torch.load(weights_only=True)``: no code runs), each
    passed through ``convert(key, tensor)`` as soon as it is read (to the device and dtype: the host never holds
    all of them as copies).

    Memory-mapped: a safetensors file reads only the image tower's entries; a torch zip file is mapped whole and
    only the pages of the tensors used are ever read (file-backed pages, shared by every rank of a node through the
    page cache and released with the mapping). A legacy (non-zip) torch file cannot be mapped and is read whole."""
    convert = convert or (lambda k, v: v)
    if Path(path).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            cut = _strip_module(keys)
            return {k[cut + 7:]: convert(k[cut + 7:], f.get_tensor(k)) for k in keys if k[cut:].startswith("visual.")}
    sd = _torch_state(path)
    cut = _strip_module(sd)
    return {k[cut + 7:]: convert(k[cut + 7:], v) for k, v in sd.items() if k[cut:].startswith("visual.")}


def read_text_state(path: str) -> dict:
    """The text tower's tensors of a CLIP weights file (every key but ``visual.*``, ``module.`` dropped), read as
    :func:`read_visual_state` reads the image tower's (no code runs). For ``megadigpt clip``."""
    if Path(path).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            cut = _strip_module(keys)
            return {k[cut:]: f.get_tensor(k) for k in keys if not k[cut:].startswith("visual.")}
    sd = _torch_state(path)
    cut = _strip_module(sd)
    return {k[cut:]: v for k, v in sd.items() if not k[cut:].startswith("visual.")}


def _torch_state(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped (as in weights.probe_file)
        if "mmap" not in str(e):
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj  # as open_clip unwraps it
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state dict, found a {type(sd).__name__}")
    return sd


def visual_file_bytes(path: str) -> int:
    """Bytes of the image tower's tensors in a CLIP weights file, from its header (safetensors) or its mapped
    tensors' sizes (torch zip): nothing is read."""
    if Path(path).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            cut = _strip_module(keys)
            total = 0
            for k in keys:
                if k[cut:].startswith("visual."):
                    s = f.get_slice(k)
                    total += torch.Size(s.get_shape()).numel() * _SAFETENSORS_BYTES[s.get_dtype()]
            return total
    sd = _torch_state(path)
    cut = _strip_module(sd)
    return sum(v.nbytes for k, v in sd.items() if k[cut:].startswith("visual."))


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}


def load_vision_tower(name: str, image_size: int, path: str, device=None, dtype=torch.float32):
    """The image tower of ``name`` with the weights of the CLIP weights file ``path``, in ``dtype`` on ``device``:
    built on meta, each tensor cast and moved on its own as it is read, then assigned (never an fp32 copy of the
    whole tower on the host beside the file's). Strict: a missing or misshapen image-tower tensor is an error
    (text-tower tensors are not read, so a file holding only ``visual.*`` loads too)."""
    from open_clip.model import resize_pos_embed

    device = torch.device(device or "cpu")
    tower = vision_tower(name, image_size, device="meta")

    def cast(v):
        out = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        # on the CPU in the file's dtype ``to`` returns the memory-mapped tensor itself: copy it, so that the teacher
        # never reads a file rewritten in place during the run (other bytes than the sha256 recorded, or SIGBUS)
        return out.clone() if out.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() else out

    # the position grid is resized in the file's dtype first (weights trained at another resolution), exactly as
    # create_model's load_checkpoint does, then cast like the rest
    state = read_visual_state(path, lambda k, v: v if k == "positional_embedding" else cast(v))
    if "positional_embedding" in state:
        full = {"visual.positional_embedding": state["positional_embedding"]}
        resize_pos_embed(full, SimpleNamespace(visual=tower))
        state["positional_embedding"] = cast(full["visual.positional_embedding"])
    if not state:
        raise ValueError("the file holds no image-tower (visual.*) tensors")
    try:
        tower.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # torch's first line says only "Error(s) in loading": the one-line error keeps why
        raise ValueError(" ".join(str(e).split("\n", 1)[-1].split())) from None
    left = [n for n, t in [*tower.named_parameters(), *tower.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer is not in any weights file: it would stay unallocated
        raise ValueError(f"open_clip {name}: no weights for {', '.join(left[:5])}")
    return tower


def host_build_bytes(tcfg, tower_params: int, param_bytes: int = 4) -> int:
    """Host memory per rank while the teacher is built for a GPU: a random tower is built on the device (none);
    from weights, the image tower's tensors in the file (mapped, read once, each copied to the device on its own):
    their bytes in the file when it is here, else ``tower_params`` x ``param_bytes`` (OpenCLIP publishes fp32)."""
    if tcfg.random_weights or not tcfg.weights:
        return 0
    from .weights import is_file_ref

    if is_file_ref(tcfg.weights) and Path(tcfg.weights).is_file():
        try:
            return visual_file_bytes(tcfg.weights)
        except Exception:  # noqa: BLE001 - the plan does not judge the file (describe_target does)
            pass
    return tower_params * param_bytes


class OpenCLIPTarget(Target):
    def __init__(self, spec, tcfg, device=None, dtype=torch.float32):
        super().__init__()
        # a file path or a pretrained tag; random weights only with target.random_weights (checked in describe)
        if tcfg.random_weights:
            self.visual = vision_tower(tcfg.model, spec.image_size, device=device, dtype=dtype)
        else:
            self.visual = load_vision_tower(tcfg.model, spec.image_size, weights_file(tcfg), device, dtype)
        self.spec = spec
        if getattr(self.visual, "proj", None) is None:
            raise ConfigError(f"open_clip model {tcfg.model!r} has no projection on its vision tower")

    @torch.no_grad()
    def forward(self, images):
        v = self.visual
        x = v.ln_post(v.transformer(v._embeds(images))) @ v.proj
        return x[:, 1:], x[:, 0]

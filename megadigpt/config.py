"""The typed config tree. A YAML file fills it section by section; ``key=value`` overrides follow. Unknown or
misspelled keys are an error (with a suggestion), never silently ignored.

Every field's comment is its documentation; README's config reference is generated from the same tree
(``megadigpt config-reference``).
"""

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A problem with the user's config or inputs, reported in one line before any heavy initialisation."""


@dataclass
class ModelConfig:
    arch: str = "vit_base"  # vit_tiny|vit_small|vit_base|vit_large|vit_huge|vit_giant|vit_gigantic|vit_e
    patch_size: int = 16  # 14 or 16 for the paper's models; any divisor of img_size works
    img_size: int = 224  # student input resolution (square)
    embed_dim: Optional[int] = None  # override the arch's width
    depth: Optional[int] = None  # override the arch's depth
    num_heads: Optional[int] = None  # override the arch's heads
    mlp_ratio: Optional[float] = None  # override the arch's MLP ratio
    segment_grid: int = 2  # segments per side: 2 -> 4 quadrant segments, the first 3 encoded (spec §1)
    taps: Optional[List[int]] = None  # 1-indexed encoder blocks feeding the decoders; default: 4 over the upper half
    decoder_dim: int = 1024  # width of both decoders
    decoder_depth: int = 2  # blocks per decoder
    decoder_heads: int = 32  # heads per decoder block
    decoder_mlp_ratio: float = 4.0
    drop_path: float = 0.0  # stochastic depth of the encoder (0 in the reference; 0.1 for EVA-02-L style)
    attention: str = "sdpa"  # sdpa (CPU+GPU) | flex (CUDA fused, block-sparse) | eager (reference arithmetic)
    objective: str = "digpt"  # digpt (Gen + Dis) | dis_only (ablation) | distill (no decoder, full attention)

    def resolved_size(self):
        from .model.vit import VIT_SIZES, ViTSize

        base = VIT_SIZES[self.arch]
        return ViTSize(self.embed_dim or base.embed_dim, self.depth or base.depth, self.num_heads or base.num_heads,
                       self.mlp_ratio or base.mlp_ratio)

    def resolved_taps(self) -> List[int]:
        from .model.vit import default_taps

        return list(self.taps) if self.taps else default_taps(self.resolved_size().depth)


@dataclass
class TargetConfig:
    kind: str = "efficientnet_lite0"  # open_clip | timm | efficientnet_lite0 | pixels
    model: Optional[str] = None  # open_clip arch (e.g. ViT-H-14) or timm model name
    weights: Optional[str] = None  # local weights file; for open_clip also a pretrained tag (e.g. laion2b_s32b_b79k)
    image_size: Optional[int] = None  # teacher input resolution; default: the student's img_size
    layer: Optional[str] = None  # which tokens (default first): efficientnet_lite0 stride16 (112-d) | stride32 (1280-d); timm final | a block index with the final norm (-3 = third from last, DiGIT); pixels norm (per-patch normalised) | rgb (colours, the palette's space); open_clip final. stride16 with another kind means its default (configs saved by earlier versions)
    patch_size: Optional[int] = None  # pixels only: patch of the pixel target; default the student's patch (1 with layer=rgb: every pixel a token)
    tokenizer: Optional[str] = None  # k-means codebook file (`megadigpt tokenizer fit`): each token becomes its nearest centroid's index and the decoders are trained with cross-entropy instead of cosine
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16


@dataclass
class DataConfig:
    source: Union[str, List[str]] = "demo"  # demo | image folder | .tar shards (file, dir, glob or {a..b})
    loader: str = "auto"  # auto (DALI where installed, else torch) | dali | torch
    crop_scale: Tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale range
    crop_ratio: Tuple[float, float] = (0.75, 1.3333333333333333)  # RandomResizedCrop aspect range
    interpolation: str = "bicubic"  # bicubic | bilinear
    hflip: bool = True
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)  # student normalisation (ImageNet)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = 2  # per rank: DataLoader workers (torch) or DALI CPU threads


@dataclass
class OptimConfig:
    lr: Optional[float] = None  # absolute peak lr; default blr * global_batch / 256
    blr: float = 1.5e-4  # base lr per 256 images
    min_lr: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05  # not applied to 1-D parameters and biases
    warmup_epochs: float = 40.0
    warmup_steps: Optional[int] = None  # overrides warmup_epochs
    grad_clip: float = 0.0  # global-norm clipping; 0 = off (the reference clips nothing)


@dataclass
class TrainConfig:
    run_dir: str = "runs/digpt"  # checkpoints, metrics.jsonl, TensorBoard, the resolved config
    epochs: float = 300.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs
    global_batch: int = 4096  # images per optimizer step, all ranks and accumulation together
    micro_batch: int = 64  # images per rank per forward; accumulation = global / (micro * world)
    seed: int = 0
    init_from: Optional[str] = None  # start from these weights: a megadigpt .safetensors, a run/checkpoint dir, or a reference D-iGPT .pth
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    zero_stage: int = 3  # 0 | 1 | 2 | 3
    ds_config: Optional[str] = None  # DeepSpeed JSON template; default ds_configs/zero<stage>.json
    activation_checkpointing: bool = False  # recompute encoder blocks in backward
    ckpt_every: int = 1000  # optimizer steps between checkpoints (and always at the end)
    ckpt_every_minutes: float = 30.0  # also checkpoint when this much time passed since the last (0 = off)
    ckpt_keep: int = 3  # complete checkpoints kept (older ones deleted); 0 = keep all
    nan_tolerance: int = 3  # consecutive non-finite steps skipped before rolling back and stopping
    log_every: int = 10  # optimizer steps between metric lines
    tensorboard: bool = True
    progress: str = "auto"  # auto (a bar when stderr is a terminal) | on | off
    peak_tflops: Optional[float] = None  # per-device peak for MFU; default: known GPUs, or a measured CPU matmul
    probe_every: int = 0  # optimizer steps between k-NN monitors of the encoder (0 = off; knn_top1 in metrics)
    probe_train: Optional[str] = None  # labelled images the k-NN monitor's memory bank is built from
    probe_val: Optional[str] = None  # labelled images the k-NN monitor classifies


# ============================================================================ fine-tuning, probing, evaluation
# ``megadigpt finetune`` / ``probe`` / ``eval`` read this tree (sections model, data, optim, train, finetune, probe).


@dataclass
class ClassifierConfig:
    arch: str = "auto"  # auto: the geometry of train.init_from's weights; or vit_tiny..vit_e for a fresh model
    patch_size: Optional[int] = None  # default: from the weights (or 16)
    img_size: int = 224  # fine-tuning resolution; position embeddings are interpolated (bicubic) from the weights'
    embed_dim: Optional[int] = None  # override the arch's width
    depth: Optional[int] = None  # override the arch's depth
    num_heads: Optional[int] = None  # default: the pretraining run's, the export's, or the standard size's
    mlp_ratio: Optional[float] = None  # override the arch's MLP ratio
    drop_path: float = 0.1  # stochastic depth (spec §7: 0.1 for B, 0.15 for the L IN-21K stage)
    global_pool: str = "avg"  # avg (mean of patch tokens + fc_norm, the paper's head) | token (CLS + final norm)
    num_classes: Optional[int] = None  # default: 1 + the largest label of data.train


@dataclass
class FinetuneDataConfig:
    train: Optional[Union[str, List[str]]] = None  # labelled training images: shards with .cls, class folders, .jsonl
    val: Optional[Union[str, List[str]]] = None  # labelled evaluation images (evaluated every finetune.eval_every epochs)
    loader: str = "auto"  # auto (DALI where installed, else torch) | dali | torch
    crop_scale: Tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale range
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy (DALI: rand_augment n=2 m=9); none = off
    crop_pct: float = 0.875  # eval: resize the shorter side to img_size / crop_pct, then centre crop
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = 4  # per rank: DataLoader workers (torch) or DALI CPU threads


@dataclass
class FinetuneOptimConfig(OptimConfig):
    blr: float = 1e-3  # base lr per 256 images (MAE/D-iGPT fine-tuning)
    min_lr: float = 1e-6
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 5.0
    layer_decay: float = 0.75  # layer-wise lr decay: block i gets layer_decay ** (depth + 1 - (i + 1)) of the lr


@dataclass
class FinetuneTrainConfig(TrainConfig):
    run_dir: str = "runs/finetune"  # checkpoints, best/ and last/ timm exports, metrics.jsonl
    epochs: float = 100.0
    global_batch: int = 1024
    zero_stage: int = 1  # 1 (optimizer state sharded) or 3 (parameters too, for L and larger at 448 px)
    ckpt_every: int = 10 ** 9  # optimizer steps between checkpoints; fine-tuning also checkpoints every epoch
    init_from: Optional[str] = None  # pretrained encoder: a megadigpt run/checkpoint/.safetensors, a timm export folder or .safetensors, a reference D-iGPT .pth; none = random init


@dataclass
class FinetuneConfig:
    smoothing: float = 0.1  # label smoothing
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    reprob: float = 0.25  # random erasing probability (per image, after normalisation)
    remode: str = "pixel"  # random erasing fill: pixel | rand | const
    ema_decay: float = 0.0  # parameter EMA (0 = off; 0.9999 in the EVA-02-L IN-1K stage); evaluated and exported too
    eval_every: int = 1  # epochs between evaluations (and always after the last)
    head_init_std: float = 2e-5  # the fresh classifier's weight init (MAE)


@dataclass
class ProbeConfig:
    epochs: int = 30  # passes of the linear heads over the cached features
    batch: int = 1024  # heads' mini-batch
    lr: float = 1e-3  # AdamW lr of every head (cosine to 0)
    weight_decay: float = 1e-4  # AdamW weight decay of the heads
    layers: str = "all"  # all | last | comma-separated 1-indexed blocks to probe
    knn_k: int = 20  # k-NN neighbours (cosine similarity)
    knn_t: float = 0.07  # k-NN vote temperature: weights exp(cos / t)
    knn_layers: str = "last"  # last | all | comma-separated blocks for k-NN


@dataclass
class FinetuneRunConfig:
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------- parsing
def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value, hint, where: str):
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where}: invalid value {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if isinstance(value, (int, float)):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def _apply(section_obj, values: Dict[str, Any], section: str):
    hints = get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{section}.{key}'{_suggest(key, hints)}")
        setattr(section_obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        return p
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file or built-in config named {name_or_path!r}{_suggest(name_or_path, names)}; "
                      f"built-in: {', '.join(names)}")


def parse_overrides(items: List[str]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = yaml.safe_load(raw) if raw != "" else None
    return out


def load_config(name_or_path: Optional[str] = None, overrides: Optional[List[str]] = None, root=None):
    """``root``: the config tree's class, :class:`Config` (pretraining, the default) or :class:`FinetuneRunConfig`."""
    cfg = (root or Config)()
    layers = []
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        layers.append(raw)
    layers.append(parse_overrides(overrides or []))
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for layer in layers:  # a whole file of the other kind is named as such, before any key inside it
        if any(sec not in sections and sec in ("target", "finetune", "probe") for sec in layer):
            other = "a pretraining" if "target" in layer else "a fine-tuning"
            raise ConfigError(f"{name_or_path} is {other} config (pretraining config given to finetune/probe/eval, or "
                              f"the other way round?)")
    for layer in layers:
        for section, values in layer.items():
            if section not in sections:
                hint = _suggest(section, sections)
                if not hint and section in ("target", "finetune", "probe"):
                    hint = (" (a pretraining config given to finetune/probe/eval, or the other way round?)")
                raise ConfigError(f"unknown config section '{section}'{hint}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{section}' must be a mapping")
            _apply(sections[section], values, section)
    return cfg


def dump_config(cfg) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def reference_markdown() -> str:
    """The config reference tables for the README, from the field comments of this file."""
    import inspect
    import re

    out = []
    for title, root in (("Pretraining (`megadigpt pretrain`)", Config),
                        ("Fine-tuning, probing, evaluation (`megadigpt finetune`, `probe`, `eval`)", FinetuneRunConfig)):
        lines = [f"**{title}**", "", "| key | default | meaning |", "|---|---|---|"]
        for section in dataclasses.fields(root):
            section_cls = section.default_factory
            comments = {}
            for klass in reversed(section_cls.__mro__[:-1]):  # a subclass's comment wins
                comments.update(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(klass), flags=re.M))
            for f in dataclasses.fields(section_cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                meaning = comments.get(f.name, "").replace("|", "\\|")
                lines.append(f"| `{section.name}.{f.name}` | `{_plain(default)}` | {meaning} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)

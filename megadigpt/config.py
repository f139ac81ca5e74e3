"""The typed config tree. A YAML file fills it section by section; ``key=value`` overrides follow. Unknown or
misspelled keys are an error (with a suggestion), never silently ignored; so is a value outside its key's range
(``RULES``, checked by ``load_config`` for every command) and a config file that cannot be read as one (binary,
empty, a key given twice: ``read_yaml``).

Every field's comment is its documentation; the config reference (docs/config.md) is generated from the same tree
(``megadigpt config-reference``).
"""

import dataclasses
import difflib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A problem with the user's config or inputs, reported in one line before any heavy initialisation."""


def shorten(value, limit: int = 120) -> str:
    """``repr`` of a value cut to ``limit`` characters: messages quote values shortened (a long path, a value
    built from YAML aliases or a 10 kB override is not printed whole)."""
    try:
        text = reprlib_repr(value)
    except RecursionError:  # a self-referencing YAML alias
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 16] + f"...({len(text)} chars)"


NAME_MAX = 255  # bytes per path component on Linux file systems
PATH_MAX = 4096


def check_path_text(path, what: str = "path") -> str:
    """A path from the user: a NUL byte, a control character (newline, tab, escape) or an over-long name (a
    component over 255 bytes, a whole over 4095) is one line, before any system call sees it."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    check_text(text, what)
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) >= PATH_MAX:
        raise ConfigError(f"{what} {shorten(text)} is {len(raw)} bytes long (the limit is {PATH_MAX - 1})")
    long = next((c for c in text.split("/") if len(c.encode("utf-8", "surrogateescape")) > NAME_MAX), None)
    if long is not None:
        raise ConfigError(f"{what} {shorten(text)} has a name of {len(long.encode('utf-8', 'surrogateescape'))} "
                          f"bytes (the limit is {NAME_MAX})")
    return text


def check_text(text: str, what: str) -> str:
    """A NUL byte or a control character (a newline that would become its own line in a generated script, an
    escape sequence for the terminal) in a value is one line."""
    if "\x00" in text:
        raise ConfigError(f"{what} {shorten(text)} holds a NUL byte")
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ConfigError(f"{what} {shorten(text)} holds a control character ({bad!r})")
    return text


def reprlib_repr(value) -> str:
    """repr of strings whole (then cut by shorten), of containers bounded (reprlib: a list of 10**9 aliases is
    not walked)."""
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return repr(value)
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxstring, r.maxother = 4, 8, 8, 8, 60, 60
    return r.repr(value)


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
    attention: str = "sdpa"  # sdpa (CPU+GPU) | prefix (exact, mask-free: one SDPA per segment, flash-eligible) | flex (CUDA fused, block-sparse) | eager (reference arithmetic)
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
    random_weights: bool = False  # true: an open_clip/timm/efficientnet teacher with random weights (benchmarks, tests); otherwise a teacher without weights is an error


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
    mode: str = "auto"  # auto (stream for remote URLs, indexed otherwise) | indexed (random access, exact resume) | stream (sequential shard reads)
    cache_dir: Optional[str] = None  # indexed mode: local copies of remote shards; default $MEGADIGPT_CACHE or ~/.cache/megadigpt/shards
    shuffle_buffer: int = 2000  # stream mode: samples per DataLoader worker held and drawn from at random
    epoch_size: Optional[int] = None  # stream mode: samples per epoch where no manifest.json beside the shards counts them
    io_timeout_s: float = 60.0  # remote reads: seconds without progress before a read is abandoned and retried
    io_retries: int = 3  # remote reads: retries with backoff (0.5, 1, 2 s, ...) before a shard is skipped
    io_deadline_s: Optional[float] = None  # remote reads: the deadline (s) of one shard or small-file transfer (a try), before its size adds to it; default 5 x io_timeout_s
    io_min_rate_mb_s: float = 1.0  # remote reads: the deadline grows by 1 s per this many MB (10^6 bytes) of the declared size (or of the bytes so far where none is declared)
    max_shard_bytes: int = 64 << 30  # remote reads: a shard (or stream) declared or running longer than this many bytes (64 GiB) is a shard problem, not retried
    max_member_bytes: int = 256 << 20  # a tar image or .cls member declared larger than this many bytes (256 MiB) is a bad sample, never read into memory


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


# ============================================================================ the run section, shared
# ``train`` of every tree: the keys every training command reads (pretrain, finetune, segment: run directory,
# schedule length, batch, DeepSpeed, precision, checkpoints, logging). Each tree's ``train`` subclasses it and adds
# only keys its own commands read, so a key a command would ignore is an unknown key to it (every key of every tree
# is read somewhere: tests/test_config_keys.py).
@dataclass
class RunConfig:
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
    compile: bool = False  # torch.compile each transformer block and the teacher's forward (compiled at the first step; its time is logged)
    ckpt_every: int = 1000  # optimizer steps between checkpoints (and always at the end)
    ckpt_every_minutes: float = 30.0  # also checkpoint when this much time passed since the last (0 = off)
    ckpt_keep: int = 3  # complete checkpoints kept (older ones deleted); 0 = keep all
    allow_schedule_change: bool = False  # resume with another lr schedule (max_steps, epochs, lr, warm-up; --allow-schedule-change); recorded in metrics.jsonl
    nan_tolerance: int = 3  # consecutive non-finite steps skipped before rolling back and stopping
    log_every: int = 10  # optimizer steps between metric lines
    tensorboard: bool = True
    wandb: bool = False  # also log to Weights & Biases (pip install wandb), from rank 0; the W&B run id is kept in the run directory. W&B's environment (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR, ...) applies to every key below left unset; WANDB_MODE=disabled switches it off
    wandb_mode: Optional[str] = None  # online | offline (for `wandb sync` later) | disabled; default: $WANDB_MODE (or `wandb offline`), else online. online needs credentials ($WANDB_API_KEY or `wandb login`), checked before anything starts
    wandb_project: Optional[str] = None  # default: $WANDB_PROJECT, else megadigpt
    wandb_entity: Optional[str] = None  # the W&B user or team; default: $WANDB_ENTITY, else your W&B default entity
    wandb_group: Optional[str] = None  # groups runs in the W&B UI (a pretraining and its fine-tunes); default: $WANDB_RUN_GROUP
    wandb_tags: Optional[Union[str, List[str]]] = None  # a list, or one comma-separated string; default: $WANDB_TAGS
    wandb_name: Optional[str] = None  # the run's display name; default: $WANDB_NAME, else the run directory's name
    progress: str = "auto"  # auto (a bar when stderr is a terminal) | on | off


@dataclass
class TrainConfig(RunConfig):
    """Pretraining's ``train``: the shared run keys, MFU's peak and the k-NN monitor."""
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
    cache_dir: Optional[str] = None  # local copies of remote shards; default $MEGADIGPT_CACHE or ~/.cache/megadigpt/shards
    io_timeout_s: float = 60.0  # remote reads: seconds without progress before a read is abandoned and retried
    io_retries: int = 3  # remote reads: retries with backoff (0.5, 1, 2 s, ...) before a shard is skipped
    io_deadline_s: Optional[float] = None  # remote reads: the deadline (s) of one shard or small-file transfer (a try), before its size adds to it; default 5 x io_timeout_s
    io_min_rate_mb_s: float = 1.0  # remote reads: the deadline grows by 1 s per this many MB (10^6 bytes) of the declared size (or of the bytes so far where none is declared)
    max_shard_bytes: int = 64 << 30  # remote reads: a shard (or stream) declared or running longer than this many bytes (64 GiB) is a shard problem, not retried
    max_member_bytes: int = 256 << 20  # a tar image or .cls member declared larger than this many bytes (256 MiB) is a bad sample, never read into memory


@dataclass
class FinetuneOptimConfig(OptimConfig):
    blr: float = 1e-3  # base lr per 256 images (MAE/D-iGPT fine-tuning)
    min_lr: float = 1e-6
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 5.0
    layer_decay: float = 0.75  # layer-wise lr decay: block i gets layer_decay ** (depth + 1 - (i + 1)) of the lr


@dataclass
class FinetuneTrainConfig(RunConfig):
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
        return plain(dataclasses.asdict(self))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        return plain(dataclasses.asdict(self))


# The config trees, for show-config, config-reference and the tree a file belongs to: (title, root class, the
# sections that only this tree has). Segmentation's tree (megadigpt.segment_config) adds itself on import.
TREES: List[Tuple[str, type, Tuple[str, ...]]] = [
    ("Pretraining (`megadigpt pretrain`)", Config, ("target",)),
    ("Fine-tuning, probing, evaluation (`megadigpt finetune`, `probe`, `eval`)", FinetuneRunConfig,
     ("finetune", "probe"))]


# ---------------------------------------------------------------------------------------------- value ranges
# One rule per constrained key, beside the dataclasses: ``load_config`` checks every key of the tree against it, so
# each key is validated once, in one place, for every command (pretrain, finetune, probe, eval, plan, bench, submit,
# tokenizer fit, show-config). Cross-field checks (divisibility, world size, device) stay in plan_run /
# plan_finetune. A small in-house table rather than OmegaConf structured configs: OmegaConf validates types but not
# ranges, and its errors are multi-line; this keeps the one-line ``megadigpt: error: <key> must be ...``.
class Rule:
    """``text`` says what is allowed (in the error and the config reference); ``ok(value)`` decides. ``None`` (an
    unset optional key) always passes."""

    def __init__(self, text, ok, choices=None):
        self._text, self.ok, self.choices = text, ok, choices

    @property
    def text(self) -> str:
        return self._text() if callable(self._text) else self._text

    def check(self, where: str, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value}")
        if value is not None and not self.ok(value):
            hint = suggest(value, map(str, self.choices())) if self.choices and isinstance(value, str) else ""
            raise ConfigError(f"{where} must be {self.text}, got {shorten(plain(value))}{hint}")


def _num(v):  # a finite number: .inf and .nan are YAML floats too
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _blocks(v):
    return v in ("all", "last") or all(x.strip().isdigit() and int(x) >= 1 for x in str(v).split(","))


POSITIVE = Rule("> 0", lambda v: _num(v) and v > 0)
NON_NEGATIVE = Rule(">= 0", lambda v: _num(v) and v >= 0)
FRACTION = Rule("in [0, 1]", lambda v: _num(v) and 0 <= v <= 1)
FRACTION_BELOW_1 = Rule("in [0, 1)", lambda v: _num(v) and 0 <= v < 1)
FRACTION_ABOVE_0 = Rule("in (0, 1]", lambda v: _num(v) and 0 < v <= 1)
SEED = Rule("in [0, 2**32)", lambda v: _num(v) and 0 <= v < 2 ** 32)


def at_least(n) -> Rule:
    return Rule(f">= {n}", lambda v: _num(v) and v >= n)


def one_of(*choices) -> Rule:
    """``choices``: the allowed values, or one callable returning them (imported lazily from the module that owns
    them, so the list is written once)."""
    get = choices[0] if len(choices) == 1 and callable(choices[0]) else (lambda: choices)
    return Rule(lambda: "one of " + ", ".join(map(str, get())), lambda v: v in tuple(get()), choices=get)


def each(rule: Rule) -> Rule:
    return Rule(lambda: f"values {rule.text}", lambda v: all(rule.ok(x) for x in v))


def ordered(rule: Rule) -> Rule:
    """A (lo, hi) pair: each value obeys ``rule`` and lo <= hi."""
    return Rule(lambda: f"lo <= hi, each {rule.text}", lambda v: all(rule.ok(x) for x in v) and v[0] <= v[1])


def vit_archs():
    from .model.vit import VIT_SIZES

    return tuple(VIT_SIZES)


def _attention_backends():
    from .model.attention import BACKENDS

    return BACKENDS


def _objectives():
    from .model.digpt import OBJECTIVES

    return OBJECTIVES


BLOCKS = Rule("all, last or comma-separated block numbers >= 1", _blocks)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOADERS = ("auto", "dali", "torch")
STD = each(POSITIVE)
RULES: Dict[type, Dict[str, Rule]] = {
    ModelConfig: dict(arch=one_of(vit_archs), patch_size=POSITIVE, img_size=POSITIVE, embed_dim=POSITIVE,
                      depth=POSITIVE, num_heads=POSITIVE, mlp_ratio=POSITIVE, segment_grid=at_least(2),
                      taps=each(at_least(1)), decoder_dim=POSITIVE, decoder_depth=POSITIVE, decoder_heads=POSITIVE,
                      decoder_mlp_ratio=POSITIVE, drop_path=FRACTION_BELOW_1, attention=one_of(_attention_backends),
                      objective=one_of(_objectives)),
    TargetConfig: dict(image_size=POSITIVE, patch_size=POSITIVE, dtype=one_of(*PRECISIONS)),
    DataConfig: dict(loader=one_of(*LOADERS), crop_scale=ordered(FRACTION_ABOVE_0), crop_ratio=ordered(POSITIVE),
                     interpolation=one_of("bicubic", "bilinear"), std=STD, num_workers=NON_NEGATIVE,
                     mode=one_of("auto", "indexed", "stream"), shuffle_buffer=POSITIVE, epoch_size=POSITIVE,
                     io_timeout_s=POSITIVE, io_retries=NON_NEGATIVE, io_deadline_s=POSITIVE,
                     io_min_rate_mb_s=POSITIVE, max_shard_bytes=POSITIVE, max_member_bytes=POSITIVE),
    OptimConfig: dict(lr=POSITIVE, blr=POSITIVE, min_lr=NON_NEGATIVE, betas=each(FRACTION_BELOW_1), eps=POSITIVE,
                      weight_decay=NON_NEGATIVE, warmup_epochs=NON_NEGATIVE, warmup_steps=NON_NEGATIVE,
                      grad_clip=NON_NEGATIVE),
    RunConfig: dict(epochs=NON_NEGATIVE, max_steps=POSITIVE, global_batch=POSITIVE, micro_batch=POSITIVE, seed=SEED,
                    device=one_of("auto", "cpu", "cuda"), precision=one_of(*PRECISIONS),
                    zero_stage=one_of(0, 1, 2, 3), ckpt_every=POSITIVE, ckpt_every_minutes=NON_NEGATIVE,
                    ckpt_keep=NON_NEGATIVE, nan_tolerance=NON_NEGATIVE, log_every=POSITIVE,
                    progress=one_of("auto", "on", "off"), wandb_mode=one_of("online", "offline", "disabled")),
    TrainConfig: dict(peak_tflops=POSITIVE, probe_every=NON_NEGATIVE),
    ClassifierConfig: dict(arch=one_of(lambda: ("auto",) + vit_archs()), patch_size=POSITIVE, img_size=POSITIVE,
                           embed_dim=POSITIVE, depth=POSITIVE, num_heads=POSITIVE, mlp_ratio=POSITIVE,
                           drop_path=FRACTION_BELOW_1, global_pool=one_of("avg", "token"), num_classes=POSITIVE),
    FinetuneDataConfig: dict(loader=one_of(*LOADERS), crop_scale=ordered(FRACTION_ABOVE_0),
                             crop_pct=FRACTION_ABOVE_0, std=STD, num_workers=NON_NEGATIVE,
                             io_timeout_s=POSITIVE, io_retries=NON_NEGATIVE, io_deadline_s=POSITIVE,
                             io_min_rate_mb_s=POSITIVE, max_shard_bytes=POSITIVE, max_member_bytes=POSITIVE),
    FinetuneOptimConfig: dict(layer_decay=FRACTION_ABOVE_0),
    FinetuneConfig: dict(smoothing=FRACTION_BELOW_1, mixup=NON_NEGATIVE, cutmix=NON_NEGATIVE, mixup_prob=FRACTION,
                         mixup_switch_prob=FRACTION, reprob=FRACTION, remode=one_of("pixel", "rand", "const"),
                         ema_decay=FRACTION_BELOW_1, eval_every=POSITIVE, head_init_std=NON_NEGATIVE),
    ProbeConfig: dict(epochs=POSITIVE, batch=POSITIVE, lr=POSITIVE, weight_decay=NON_NEGATIVE, knn_k=POSITIVE,
                      knn_t=POSITIVE, layers=BLOCKS, knn_layers=BLOCKS),
}


def rules_of(section_cls) -> Dict[str, Rule]:
    """The rules of a section class, inherited ones included (a subclass's rule wins)."""
    out: Dict[str, Rule] = {}
    for klass in reversed(section_cls.__mro__):
        out.update(RULES.get(klass, {}))
    return out


# keys whose strings are local paths (or URLs, shard specs: checked for NUL and control characters only)
PATH_KEYS = {"run_dir", "cache_dir", "init_from", "ds_config", "tokenizer", "probe_train", "probe_val"}


def validate(cfg) -> None:
    """Check every constrained key of a config tree (:class:`Config` or :class:`FinetuneRunConfig`); no string
    value holds a NUL byte or a control character; path keys have no over-long names."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(v, str):
                    where = f"{section.name}.{f.name}"
                    check_path_text(v, where) if f.name in PATH_KEYS else check_text(v, where)
        for key, rule in rules_of(type(obj)).items():
            rule.check(f"{section.name}.{key}", getattr(obj, key))


def plain(x):
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------- parsing
def suggest(name: str, options) -> str:
    close = difflib.get_close_matches(str(name)[:200], list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(value, hint, where: str):
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where}: invalid value {shorten(value)}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {shorten(value)}")
        return [coerce(v, args[0], where) for v in value]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {shorten(value)}")
        return tuple(coerce(v, a, where) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {shorten(value)}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {shorten(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {shorten(value)}")
        return float(value)
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if isinstance(value, (int, float)):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {shorten(value)}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def _apply(section_obj, values: Dict[str, Any], section: str):
    hints = get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {shorten(f'{section}.{key}')}{suggest(str(key)[:200], hints)}")
        setattr(section_obj, key, coerce(value, hints[key], f"{section}.{key}"))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _no_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {shorten(key)} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)

YAML_MAX_BYTES = 16 << 20  # a config, chain or merge spec is a few kB
YAML_MAX_NODES = 100_000  # values after alias expansion (a 1 kB "billion laughs" expands to 10**9)
YAML_MAX_DEPTH = 64  # nesting of mappings and lists


def _check_yaml_size(node) -> None:
    """Bound a composed YAML document before anything is built from it: the number of values it stands for once
    aliases are expanded (counted on the node graph, where an alias is the same node object again: nothing is
    expanded) and its nesting depth. Iterative: a deep document cannot exhaust Python's stack here."""
    expanded, depth = {}, {}
    stack = [(node, False)]
    while stack:
        n, done = stack.pop()
        key = id(n)
        if key in expanded and not done:
            continue
        children = []
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        if not done:
            expanded[key] = None  # on the path (a cycle cannot be composed by PyYAML, but stay safe)
            stack.append((n, True))
            stack.extend((c, False) for c in children if id(c) not in expanded)
            continue
        expanded[key] = 1 + sum(expanded.get(id(c)) or 0 for c in children)
        depth[key] = 1 + max((depth.get(id(c), 0) for c in children), default=0)
        if expanded[key] > YAML_MAX_NODES:
            raise ConfigError(f"holds more than {YAML_MAX_NODES} values once its aliases are expanded (an alias "
                              f"bomb?)")
        if depth[key] > YAML_MAX_DEPTH:
            raise ConfigError(f"is nested more than {YAML_MAX_DEPTH} levels deep")


def load_yaml_text(text: str):
    """YAML text as megadigpt reads it: safe tags, no duplicate keys, bounded size, expansion and depth."""
    if len(text) > YAML_MAX_BYTES:
        raise ConfigError(f"is {len(text)} characters long (the limit is {YAML_MAX_BYTES})")
    loader = _StrictLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"is nested more than {YAML_MAX_DEPTH} levels deep") from None
        if node is None:
            return None
        _check_yaml_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path, what: str = "config", allow_empty: bool = False):
    """A YAML file megadigpt reads (configs, chains, merge specs): safe tags only, no duplicate keys, UTF-8 text;
    every way it can be unreadable is one ConfigError naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a YAML file")
    try:
        with os.fdopen(os.open(p, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:  # a planted FIFO cannot block
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"{what} {shorten(str(path))} is not a regular file (a device or a pipe?)")
            raw = f.read(YAML_MAX_BYTES + 1)
        if len(raw) > YAML_MAX_BYTES:
            raise ConfigError(f"{what} {shorten(str(path))} is over {YAML_MAX_BYTES} bytes; a config is a few kB")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (a binary file? byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        data = load_yaml_text(text)
    except ConfigError as e:
        raise ConfigError(f"{what} {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what} {path}: not valid YAML ({' '.join(str(getattr(e, 'problem', None) or e).split())}{where})") from None
    if data is None and not allow_empty:
        raise ConfigError(f"{what} {path} is empty")
    return data


def resolve_config_path(name_or_path: str) -> Path:
    check_path_text(name_or_path, "config")
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if p.is_dir():
            raise ConfigError(f"config {name_or_path} is a directory, not a YAML file")
        if p.exists() and not p.is_file():
            raise ConfigError(f"config {shorten(str(name_or_path))} is not a regular file (a device or a pipe?)")
        if not p.is_file():
            raise ConfigError(f"config file not found: {shorten(str(name_or_path))}")
        return p
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file or built-in config named {shorten(name_or_path)}{suggest(name_or_path, names)}; "
                      f"built-in: {', '.join(names)}")


def expanded_pattern_hint(words: List[str]) -> str:
    """The end of the bad-override line when words that are not overrides look like files: the shell expanded an
    unquoted brace pattern or glob (``--data x-{000000..000009}.tar``: the option took the first file, the rest
    landed among the overrides)."""
    files = [w for w in words if "=" not in w and (os.path.exists(w) or "://" in w or "/" in w or
                                                   re.search(r"\.(tar|jsonl|jpe?g|png|webp)$", w, re.I))]
    shapes: Dict[tuple, List[int]] = {}
    for w in files:
        m = re.fullmatch(r"(.*?)(\d+)(\D*)", w)
        if m:
            shapes.setdefault((m.group(1), len(m.group(2)), m.group(3)), []).append(int(m.group(2)))
    if shapes and max(len(v) for v in shapes.values()) >= 2:
        (pre, width, suf), nums = max(shapes.items(), key=lambda kv: len(kv[1]))
        lo, hi = max(0, min(nums) - 1), max(nums)  # (the first file of the pattern went to the option before)
        return (f"; {len(nums)} arguments look like the files of a pattern the shell expanded ({shorten(files[0], 60)}"
                f" ...): put the pattern in quotes so that megadigpt expands it, e.g. '{pre}{{{lo:0{width}d}.."
                f"{hi:0{width}d}}}{suf}'")
    if files:
        return "; if the shell expanded a pattern ({000000..000009}, *) into files, put the pattern in quotes"
    return ""


def parse_overrides(items: List[str]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {shorten(item)} is not of the form section.key=value"
                              f"{expanded_pattern_hint(items)}")
        key, raw = item.split("=", 1)
        section, name = key.split(".", 1)
        try:
            out.setdefault(section, {})[name] = load_yaml_text(raw) if raw != "" else None
        except ConfigError as e:
            raise ConfigError(f"override {shorten(item)}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {shorten(item)}: not a YAML value ({' '.join(str(getattr(e, 'problem', None) or e).split())}; quote "
                              f"strings with special characters)") from None
    return out


EXTENDS_DEPTH = 8  # a chain of configs extending each other


def config_layers(name_or_path: str, _seen: Tuple[Path, ...] = ()) -> List[Dict[str, Any]]:
    """The section mappings of a config file, base first: a file may extend another (``extends: NAME``: a built-in
    config's name, or a path, relative to the extending file's folder), whose keys it then overrides key by key
    (the OmegaConf/Hydra habit), under the same strict checks. A cycle or a chain over 8 files is one line."""
    base_dir = _seen[-1].parent if _seen else None
    candidate = name_or_path
    if base_dir is not None and not Path(name_or_path).is_absolute() and (base_dir / name_or_path).exists():
        candidate = str(base_dir / name_or_path)
    path = resolve_config_path(candidate)
    if path.resolve() in [p.resolve() for p in _seen]:
        raise ConfigError(f"config {path} extends itself (through {' -> '.join(str(p) for p in _seen)})")
    if len(_seen) >= EXTENDS_DEPTH:
        raise ConfigError(f"config {path}: more than {EXTENDS_DEPTH} configs extend each other")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    raw = dict(raw)
    base = raw.pop("extends", None)
    if base is None:
        return [raw]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: extends takes one config name or path, got {shorten(base)}")
    return config_layers(base, _seen + (path,)) + [raw]


def tree_of(layers: List[Dict[str, Any]]) -> Optional[type]:
    """The tree whose own sections a config's layers use (None: none tells; the caller tries each)."""
    seen = {s for layer in layers for s in layer}
    return next((root for _, root, own in TREES if seen & set(own)), None)


def load_config(name_or_path: Optional[str] = None, overrides: Optional[List[str]] = None, root=None):
    """``root``: the config tree's class, :class:`Config` (pretraining, the default), :class:`FinetuneRunConfig` or
    :class:`megadigpt.segment_config.SegmentRunConfig`."""
    cfg = (root or Config)()
    layers = config_layers(name_or_path) if name_or_path else []
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
                hint = suggest(section, sections)
                if not hint and section in ("target", "finetune", "probe"):
                    hint = (" (a pretraining config given to finetune/probe/eval, or the other way round?)")
                raise ConfigError(f"unknown config section {shorten(str(section))}{hint}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {shorten(str(section))} must be a mapping")
            _apply(sections[section], values, section)
    validate(cfg)
    return cfg


def check_output(path, kind: str, what: str) -> Path:
    """An output the user names (``kind``: "file" or "dir"): refused in one line when it cannot be what is asked
    for (an existing folder where a file goes, or the reverse; a path under a regular file), before any work, so
    nothing is written half-way and no folder is replaced by a file."""
    p = Path(path)
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {path} lies under {parent}, which is a file, not a folder")
            break
    if kind == "dir" and p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {path} is an existing file; it needs a folder")
    if kind == "file" and p.is_dir():
        raise ConfigError(f"{what} {path} is an existing folder; it needs a file path")
    return p


_PREVIEW: Optional[List[str]] = None  # warnings collected inside preview_paths(), else None


class preview_paths:
    """Inside ``with preview_paths() as warnings:``, an input path that does not exist on this machine (data,
    weights, a model to evaluate) is a warning collected in ``warnings`` instead of an error: ``submit --dry-run``
    previews a job for a cluster whose file systems the login machine or laptop does not mount. Every other
    check still raises."""

    def __enter__(self) -> List[str]:
        global _PREVIEW
        self._outer, _PREVIEW = _PREVIEW, []
        return _PREVIEW

    def __exit__(self, *exc):
        global _PREVIEW
        _PREVIEW = self._outer
        return False


def missing_path(message: str) -> bool:
    """An input that does not exist: raise ConfigError(message), or, inside :class:`preview_paths`, note it and
    return True (the caller skips the checks that would read it)."""
    if _PREVIEW is None:
        raise ConfigError(message)
    if message not in _PREVIEW:
        _PREVIEW.append(message)
    return True


def check_weights_file(path, what: str) -> None:
    """Cheap early check of a weights input (headers and zip directories only, no tensors read): a damaged or
    truncated .safetensors, or a torch file (.pt/.pth/.bin, a DeepSpeed checkpoint's shards of the newest tag) cut
    short, is one ConfigError naming the file, before any process group or model exists. What the loaders find
    later (wrong keys, unsafe contents) they report themselves."""
    import zipfile

    p = Path(path)
    files = [p]
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.pt"))
        for latest in (p / "latest", p / "checkpoints" / "latest"):  # a checkpoints folder or a run directory
            if latest.is_file():
                tag = latest.read_text().strip()
                files += sorted((latest.parent / tag).glob("*.pt")) if tag and "/" not in tag else []
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:  # reads the header and checks that it covers the file exactly
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
                raise ConfigError(f"{what} {f}: not a loadable safetensors file (damaged or truncated: "
                                  f"{(str(e).splitlines() or [''])[0]})") from None
        elif f.suffix in (".pt", ".pth", ".bin") and f.is_file():
            with open(f, "rb") as fh:
                legacy = fh.read(1) == b"\x80"  # torch's pre-1.6 format is a bare pickle: left to the loader
            if not legacy and not zipfile.is_zipfile(f):
                raise ConfigError(f"{what} {f}: damaged or truncated (not a complete torch archive, "
                                  f"{f.stat().st_size} bytes)")


# geometry keys whose change makes a run directory's checkpoint another network than the config builds
RESUME_KEYS = {"Config": {"model": ("patch_size", "img_size", "segment_grid", "decoder_dim", "decoder_depth",
                                     "decoder_heads", "decoder_mlp_ratio", "objective"),
                           "target": ("kind", "model", "layer")},
                "FinetuneRunConfig": {"model": ("patch_size", "img_size", "embed_dim", "depth", "num_heads",
                                                "mlp_ratio", "global_pool", "num_classes")}}


def check_resume_config(run_dir, cfg) -> None:
    """A run directory with a checkpoint is resumed only by the network it holds: its config.yaml (written at the
    run's start) and ``cfg`` must agree on every geometry key, else one ConfigError naming the first differing key
    (instead of DeepSpeed's size-mismatch traceback after the engine is built). Call only when a checkpoint
    exists."""
    saved_path = Path(run_dir) / "config.yaml"
    if saved_path.is_symlink():  # never read through a planted link (the run refuses it too, under its lock)
        raise ConfigError(f"run config {saved_path} is a symbolic link; megadigpt does not read run files through "
                          f"links it did not make")
    if not saved_path.is_file():
        return
    saved = read_yaml(saved_path, "run config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_path}: expected a mapping of sections")
    pairs = []
    for section, keys in RESUME_KEYS[type(cfg).__name__].items():
        old = saved.get(section) or {}
        pairs += [(f"{section}.{k}", old.get(k), getattr(getattr(cfg, section), k)) for k in keys]
    if isinstance(cfg, Config):  # the encoder's size, whether named by arch or by explicit overrides
        old_model = ModelConfig()
        try:
            _apply(old_model, {k: v for k, v in (saved.get("model") or {}).items()
                               if k in get_type_hints(ModelConfig)}, "model")
            old_size, old_taps = old_model.resolved_size(), old_model.resolved_taps()
        except (ConfigError, KeyError):
            old_size, old_taps = None, None
        new_size = cfg.model.resolved_size()
        if old_size is not None:
            pairs += [(f"model.{k}", getattr(old_size, k), getattr(new_size, k))
                      for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")]
            pairs.append(("model.taps", old_taps, cfg.model.resolved_taps()))
    elif cfg.model.arch != "auto" and (saved.get("model") or {}).get("arch", "auto") != "auto":
        pairs.append(("model.arch", saved["model"]["arch"], cfg.model.arch))
    for key, old, new in pairs:
        if old is not None and new is not None and plain(old) != plain(new):
            raise ConfigError(f"{run_dir} holds a checkpoint of another network: {key} was {shorten(plain(old))}, now "
                              f"{shorten(plain(new))}; use the run's settings or a new train.run_dir")


def dump_config(cfg) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def reference_markdown() -> str:
    """The config reference tables for docs/config.md, from the field comments of every tree."""
    import importlib
    import inspect
    import re

    importlib.import_module("megadigpt.segment_config")  # segmentation's tree registers itself in TREES
    importlib.import_module("megadigpt.clip_config")  # and the image-text stage's

    out = []
    for title, root, _ in TREES:
        lines = [f"**{title}**", "", "| key | default | allowed | meaning |", "|---|---|---|---|"]
        for section in dataclasses.fields(root):
            section_cls = section.default_factory
            comments = {}
            for klass in reversed(section_cls.__mro__[:-1]):  # a subclass's comment wins
                comments.update(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(klass), flags=re.M))
            rules = rules_of(section_cls)
            for f in dataclasses.fields(section_cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                meaning = comments.get(f.name, "").replace("|", "\\|")
                allowed = rules[f.name].text.replace("|", "\\|") if f.name in rules else ""
                lines.append(f"| `{section.name}.{f.name}` | `{plain(default)}` | {allowed} | {meaning} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)

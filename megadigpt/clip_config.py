"""The config tree of ``megadigpt clip`` (image-text contrastive fine-tuning, the paper's zero-shot stage, §4.3),
beside :mod:`megadigpt.config`'s trees and read by the same machinery: ``load_config(name, overrides,
root=ClipRunConfig)`` (unknown keys and out-of-range values are one-line errors), the same ``Rule`` table and resume
check.

Sections: ``model`` (the image tower: the encoder's geometry, read from ``train.init_from``'s weights, its pooling,
resolution, drop path), ``text`` (the OpenCLIP text tower: a model name of ``open_clip``'s table, its weights file
or random weights for tests, size overrides), ``data`` (image-text shards, the held-out pairs for retrieval, a
labelled set for zero-shot top-1; fine-tuning's reading keys), ``optim`` (fine-tuning's AdamW with layer decay over
the image tower), ``train`` (the shared run section), ``clip`` (loss, temperature, what each tower trains, the
zero-shot prompts and monitor).
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from . import config as _config
from . import segment_config  # noqa: F401 (its tree registers first: TREES keeps one order whatever imports first)
from .config import (FRACTION_BELOW_1, NON_NEGATIVE, POSITIVE, FinetuneDataConfig, FinetuneOptimConfig,
                     FinetuneTrainConfig, at_least, one_of, plain)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP / OpenCLIP normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipModelConfig:
    arch: str = "auto"  # auto: the geometry of train.init_from's weights; or vit_tiny..vit_e for a fresh image tower
    patch_size: Optional[int] = None  # default: from the weights (or 16)
    img_size: int = 224  # position embeddings are interpolated (bicubic) from the weights'
    embed_dim: Optional[int] = None  # override the arch's width
    depth: Optional[int] = None  # override the arch's depth
    num_heads: Optional[int] = None  # default: the pretraining run's, the export's, or the standard size's
    mlp_ratio: Optional[float] = None  # override the arch's MLP ratio
    drop_path: float = 0.0  # stochastic depth of the image tower
    global_pool: str = "avg"  # avg (mean of patch tokens + fc_norm: D-iGPT's head) | token (CLS + final norm); then a linear projection to the joint width


@dataclass
class ClipTextConfig:
    model: str = "ViT-L-14"  # an open_clip model name: its text tower (tokenizer, width, layers, context length)
    weights: Optional[str] = None  # the OpenCLIP checkpoint whose text tower starts the run (.pt/.bin/.safetensors; its visual.* weights are ignored)
    random_weights: bool = False  # a randomly initialised text tower (tests, evidence); refused together with text.weights
    embed_dim: Optional[int] = None  # the joint embedding width; default: the open_clip model's
    width: Optional[int] = None  # override the text transformer's width
    layers: Optional[int] = None  # override its depth
    heads: Optional[int] = None  # override its heads
    context_length: Optional[int] = None  # override the tokens per caption (default: the model's, 77)


@dataclass
class ClipDataConfig(FinetuneDataConfig):
    train: Optional[Union[str, List[str]]] = None  # image-text pairs: shards with <key>.jpg + <key>.txt (img2dataset), or images with a .txt beside each
    val: Optional[Union[str, List[str]]] = None  # held-out image-text pairs: image->text and text->image retrieval (R@1/5/10)
    zeroshot: Optional[Union[str, List[str]]] = None  # a labelled set (shards with .cls and classes.txt, or class folders) scored zero-shot
    loader: str = "torch"  # auto (DALI where installed, else torch) | dali (images decoded and augmented by DALI, captions read beside them; indexed mode) | torch
    crop_scale: Tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop scale range (OpenCLIP's training transform)
    auto_augment: str = "none"  # timm RandAugment policy; none = off (OpenCLIP trains without)
    crop_pct: float = 1.0  # eval: resize the shorter side to img_size / crop_pct, then centre crop (OpenCLIP: 1.0)
    mean: Tuple[float, float, float] = CLIP_MEAN
    std: Tuple[float, float, float] = CLIP_STD
    mode: str = "auto"  # data.train: auto (stream for remote URLs, indexed otherwise) | indexed (random access, exact resume) | stream (sequential shard reads, resumes without repeating a pair)
    shuffle_buffer: int = 2000  # stream mode: pairs per DataLoader worker held and drawn from at random
    epoch_size: Optional[int] = None  # stream mode: pairs per epoch where no manifest.json beside the shards counts them


@dataclass
class ClipOptimConfig(FinetuneOptimConfig):
    blr: float = 1e-4  # base lr per 256 pairs
    betas: Tuple[float, float] = (0.9, 0.98)  # OpenCLIP's
    eps: float = 1e-6  # OpenCLIP's
    weight_decay: float = 0.2  # OpenCLIP's (not on 1-D parameters, biases and the temperature)
    warmup_epochs: float = 1.0
    layer_decay: float = 0.85  # layer-wise lr decay over the image tower


@dataclass
class ClipTrainConfig(FinetuneTrainConfig):
    run_dir: str = "runs/clip"  # checkpoints, metrics.jsonl, best/ and last/ exports
    epochs: float = 10.0
    global_batch: int = 4096
    ckpt_every: int = 2000  # optimizer steps between checkpoints (and every epoch, on a signal, at the end)
    peak_tflops: Optional[float] = None  # per-device peak for MFU (`megadigpt bench`); default: known GPUs, or a measured CPU matmul


@dataclass
class ClipConfig:
    loss: str = "clip"  # clip (OpenCLIP's ClipLoss: softmax over the gathered batch) | siglip (open_clip's SigLipLoss: a sigmoid per pair, texts passed between neighbouring ranks, a learnt bias)
    local_loss: bool = True  # OpenCLIP's local loss: each rank's images against all texts (and the reverse)
    gather_with_grad: bool = True  # OpenCLIP's: gradients flow through the gathered features
    init_temperature: Optional[float] = None  # the learnable temperature's start (logit scale = 1 / temperature); default 0.07 (clip), 0.1 (siglip: SigLIP's log-scale 10)
    init_bias: float = -10.0  # siglip: the learnable logit bias's start (SigLIP's -10)
    max_logit_scale: float = 100.0  # OpenCLIP clamps the logit scale to this
    image: str = "train"  # train | freeze: the image tower (its projection always trains)
    text: str = "train"  # train | freeze: the text tower (its projection included)
    text_lr_scale: float = 1.0  # the text tower's lr relative to optim's
    templates: str = "simple"  # zero-shot prompts: simple (open_clip's SIMPLE_IMAGENET_TEMPLATES) | openai (the 80 of OPENAI_IMAGENET_TEMPLATES)
    zeroshot_every: int = 0  # optimizer steps between zero-shot monitors on data.zeroshot (0: at each epoch's end and the last step)


@dataclass
class ClipRunConfig:
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    optim: ClipOptimConfig = field(default_factory=ClipOptimConfig)
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)

    def to_dict(self) -> Dict[str, Any]:
        return plain(dataclasses.asdict(self))


_config.TREES.append(("Image-text contrastive fine-tuning (`megadigpt clip`)", ClipRunConfig, ("text", "clip")))

_config.RULES.update({
    ClipModelConfig: dict(arch=one_of(lambda: ("auto",) + _config.vit_archs()), patch_size=POSITIVE,
                          img_size=POSITIVE, embed_dim=POSITIVE, depth=POSITIVE, num_heads=POSITIVE,
                          mlp_ratio=POSITIVE, drop_path=FRACTION_BELOW_1, global_pool=one_of("avg", "token")),
    ClipTextConfig: dict(embed_dim=POSITIVE, width=POSITIVE, layers=POSITIVE, heads=POSITIVE,
                         context_length=at_least(2)),
    ClipDataConfig: dict(loader=one_of("auto", "dali", "torch"), mode=one_of("auto", "indexed", "stream"), shuffle_buffer=POSITIVE,
                         epoch_size=POSITIVE),
    ClipTrainConfig: dict(peak_tflops=POSITIVE),
    ClipConfig: dict(loss=one_of("clip", "siglip"), init_temperature=POSITIVE, max_logit_scale=POSITIVE,
                     image=one_of("train", "freeze"), text=one_of("train", "freeze"), text_lr_scale=NON_NEGATIVE,
                     templates=one_of("simple", "openai"), zeroshot_every=NON_NEGATIVE),
})
# keys whose change makes a run directory's checkpoint another network (check_resume_config)
_config.RESUME_KEYS["ClipRunConfig"] = {"model": ("patch_size", "img_size", "embed_dim", "depth", "num_heads",
                                                  "mlp_ratio", "global_pool"),
                                        "text": ("model", "embed_dim", "width", "layers", "heads", "context_length"),
                                        "clip": ("loss",)}  # siglip's model holds a logit bias


def init_logit_scale(temperature: Optional[float], loss: str = "clip") -> float:
    """The logit scale's start: log(1 / temperature); with no temperature set, CLIP's 0.07 or SigLIP's 0.1."""
    if temperature is None:
        temperature = 0.1 if loss == "siglip" else 0.07
    return math.log(1 / temperature)


def load_clip_config(name_or_path: Optional[str] = None, overrides: Optional[List[str]] = None) -> ClipRunConfig:
    return _config.load_config(name_or_path, overrides, root=ClipRunConfig)

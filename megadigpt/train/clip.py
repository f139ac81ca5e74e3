"""Image-text contrastive fine-tuning (the paper's zero-shot stage, §4.3 and Table 4: "the D-iGPT pretrained image
encoder and the OpenCLIP pretrained text encoder as our starting point ... fine-tuned on the LAION dataset"): the
task the run harness (:mod:`megadigpt.train.harness`) runs for ``megadigpt clip``.

    plan_clip (cheap: text tower named and its weights present, data, batch) -> image-text pairs listed
    -> [harness: resume state, processes, lock] -> open_clip's CLIP with the text tower of ``text.model`` and, as
    its ``visual``, megadigpt's encoder (timm's ViT from any source fine-tuning reads, avg-pool + fc_norm as
    D-iGPT's head, a linear projection to the joint width) -> [harness: DeepSpeed engine (ZeRO 0-3), resume]
    -> per micro-batch: images + tokenised captions -> both towers -> OpenCLIP's contrastive loss over the
    features gathered from every rank -> zero-shot top-1 (open_clip's class-name prompts) and retrieval R@1/5/10
    at each epoch's end or every ``clip.zeroshot_every`` steps -> ``best/`` and ``last/``

What is open_clip's and used as it is: the text tower and its tokenizer (``open_clip.create_model``,
``get_tokenizer``), the loss (``ClipLoss``: ``local_loss``, ``gather_with_grad``), the zero-shot classifier
(``build_zero_shot_classifier``) and the prompt templates (``zero_shot_metadata``). What is megadigpt's: the image
tower and its weights, the data, bad pairs, the harness (resume, signals, non-finite policy, checkpoints).

Bad pairs (an undecodable image, a caption that is missing, not UTF-8 or empty) are logged in ``bad_samples.jsonl``
and left out of the loss: where every pair of the step on every rank is valid, the loss *is* ``ClipLoss.forward``;
where some are not, the same logits (``ClipLoss.get_logits``) with the invalid pairs' rows dropped and their
columns masked out as negatives (:func:`masked_clip_loss`).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..clip_config import ClipRunConfig, init_logit_scale
from ..config import ConfigError
from . import harness
from .harness import Run, epoch_batches
from .transfer import TransferTask, check_transfer, eval_batches, publish_folder, resolve_model


@dataclass
class ClipPlan:
    world_size: int
    accum: int
    device_type: str
    precision: str
    lr: float
    loader: str = "torch"
    mode: str = "indexed"  # data.train's: indexed | stream
    urls: tuple = ()  # stream mode: the shard list
    epoch_size: Optional[int] = None  # stream mode: pairs per epoch (manifest.json, data.epoch_size; else unknown)


def open_clip_config(cfg: ClipRunConfig) -> dict:
    """open_clip's model config of ``text.model`` with the text overrides; ConfigError for an unknown name."""
    import open_clip

    t = cfg.text
    base = open_clip.get_model_config(t.model)
    if base is None:
        from ..config import suggest

        raise ConfigError(f"text.model {t.model!r} is not an open_clip model{suggest(t.model, open_clip.list_models())}")
    text_cfg = dict(base["text_cfg"])
    for k in ("width", "layers", "heads", "context_length"):
        if getattr(t, k) is not None:
            text_cfg[k] = getattr(t, k)
    return {"embed_dim": t.embed_dim or base["embed_dim"], "text_cfg": text_cfg}


def plan_clip(cfg: ClipRunConfig, world_size: Optional[int] = None, device_type: Optional[str] = None,
              init_from_pending: bool = False, need_data: bool = True) -> ClipPlan:
    """Every check that needs no weights read, no decoding and no process group."""
    from ..data import check_source

    m, d, t = cfg.model, cfg.data, cfg.text
    if m.patch_size and m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size {m.img_size} is not divisible by model.patch_size {m.patch_size}")
    open_clip_config(cfg)
    if t.weights and t.random_weights:
        raise ConfigError("text.weights and text.random_weights=true both set: choose one")
    if not t.weights and not t.random_weights:
        raise ConfigError(f"text.weights is not set: the text tower of {t.model} needs its OpenCLIP weights file "
                          f"(or text.random_weights=true for a randomly initialised tower)")
    if t.weights:
        from ..config import check_weights_file, missing_path

        if Path(t.weights).is_file():
            check_weights_file(t.weights, "text.weights")
        else:
            missing_path(f"text.weights not found: {t.weights}")  # raises, unless previewing (submit --dry-run)
    mode, urls, n_epoch = "indexed", (), None
    if need_data:
        from ..data import remote, streaming

        remote.configure_from(d)  # before any source is read: cache, timeouts, deadlines, byte caps
        if not d.train:
            raise ConfigError("data.train is not set (image-text pairs: shards with <key>.jpg + <key>.txt)")
        mode = streaming.resolve_mode(d.mode, d.train)
        if mode == "stream":  # nothing is downloaded: the shard count, the epoch size and one shard that opens
            from ..distributed import env as dist_env

            urls = tuple(streaming.stream_urls(d.train))
            streaming.check_slots(len(urls), world_size or dist_env.discover().world_size, d.num_workers)
            o, tr = cfg.optim, cfg.train
            n_epoch = streaming.epoch_size(urls, d.epoch_size, "train.epochs" if tr.max_steps is None else
                                           "optim.warmup_epochs" if o.warmup_steps is None and o.warmup_epochs
                                           else None)
            streaming.probe_shards(urls)
        for what in ("train", "val", "zeroshot") if mode == "indexed" else ("val", "zeroshot"):
            if getattr(d, what):
                check_source(getattr(d, what))
    from .common import resolve_loader

    loader = resolve_loader(d.loader)
    if mode == "stream" and d.loader == "dali":
        raise ConfigError("data.loader=dali reads image-text pairs in indexed mode; stream mode reads them with torch "
                          "DataLoader workers (data.loader=torch, or data.mode=indexed)")
    c = check_transfer(cfg, world_size, device_type, init_from_pending, need_train=False, check_data=None,
                       train_what="", val_what="", fresh="image tower")
    return ClipPlan(c.world_size, c.accum, c.device_type, c.precision, c.lr, loader="torch" if mode == "stream" else
                    loader, mode=mode, urls=urls, epoch_size=n_epoch)


class ImageTower:
    """Builds megadigpt's image tower: timm's ViT whose head is the projection to the joint width (fc_norm and a
    linear layer on the pooled tokens), as open_clip's ``visual`` is called: ``visual(images) -> features``."""

    @staticmethod
    def build(cfg: ClipRunConfig, geom, embed_dim: int, weights=None):
        import functools

        from ..model.classifier import build_classifier
        from .finetune import build_and_load

        m = cfg.model
        build = functools.partial(build_classifier, geom, m.img_size, embed_dim, m.global_pool, m.drop_path)
        model, report = build_and_load(build, weights, geom.embed_dim ** -0.5)  # CLIP's projection init
        return model, report


def build_clip(cfg: ClipRunConfig, geom, weights=None, device: str = "cpu"):
    """open_clip's CLIP with the text tower of ``text.model`` and megadigpt's image tower as ``visual`` ->
    (model, image tower load report). ``device="meta"`` (the planner): shapes only, inside
    ``torch.device("meta")``."""
    import logging

    import open_clip
    import torch

    oc = open_clip_config(cfg)
    tiny_visual = {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 32}  # replaced below
    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # "No pretrained weights loaded"
    try:
        model = open_clip.create_model(cfg.text.model, pretrained=None, vision_cfg=tiny_visual, device=device, **oc)
    finally:
        logging.getLogger().disabled = was
    model.visual, report = ImageTower.build(cfg, geom, oc["embed_dim"], weights)
    # the temperature as a 1-element tensor (open_clip's is 0-d, which DeepSpeed's broadcast cannot view as bytes)
    c = cfg.clip
    model.logit_scale = torch.nn.Parameter(torch.full((1,), init_logit_scale(c.init_temperature, c.loss)))
    model.logit_bias = torch.nn.Parameter(torch.full((1,), float(c.init_bias))) if c.loss == "siglip" else None
    if cfg.text.weights:
        load_text_weights(model, cfg.text.weights)
    return model, report


def freeze_towers(model, c) -> None:
    """``clip.image`` / ``clip.text`` = freeze: that tower's parameters stop training (the image projection, the
    temperature and SigLIP's bias always train)."""
    for name, p in model.named_parameters():
        if name.startswith("visual.") and c.image == "freeze" and not name.startswith("visual.head."):
            p.requires_grad_(False)
        if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias") and c.text == "freeze":
            p.requires_grad_(False)


def load_text_weights(model, path: str):
    """The text tower (and temperature) from an OpenCLIP checkpoint; strict over the text tower's tensors."""
    from ..targets.openclip import read_text_state

    try:
        sd = read_text_state(path)
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"text.weights {path}: not readable as an OpenCLIP checkpoint ({e})")
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    for k in ("logit_scale", "logit_bias"):  # 0-d in open_clip's checkpoints, 1-element here
        if k in sd and k in own:
            sd[k] = sd[k].reshape(own[k].shape)
    missing = sorted(set(own) - set(sd) - {"logit_bias"})
    wrong = sorted(k for k in own if k in sd and sd[k].shape != own[k].shape)
    if missing or wrong:
        raise ConfigError(f"text.weights {path} does not fit text.model's tower: missing {missing[:3]}, wrong shape "
                          f"{wrong[:3]} (check text.model and its size overrides)")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def masked_clip_loss(loss_fn, image, text, scale, valid, world: int, rank: int):
    """OpenCLIP's contrastive loss where some pairs are invalid (bad samples): ``loss_fn.get_logits`` gives the
    logits OpenCLIP computes (``local_loss``, ``gather_with_grad`` as configured); the invalid pairs' rows are
    dropped and their columns masked out as negatives. Where every pair on every rank is valid, this is
    ``loss_fn(image, text, scale)`` itself."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    valid = valid.bool()
    all_valid = valid
    if world > 1:  # (as bytes: every backend gathers those)
        parts = [torch.zeros_like(valid, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(parts, valid.to(torch.uint8).contiguous())
        all_valid = torch.cat(parts).bool()
    if bool(all_valid.all()):
        return loss_fn(image, text, scale)
    logits_i, logits_t = loss_fn.get_logits(image, text, scale)
    labels = loss_fn.get_ground_truth(image.device, logits_i.shape[0])
    rows = valid if loss_fn.local_loss else all_valid
    cols = all_valid
    neg = torch.finfo(logits_i.dtype).min
    li = logits_i.masked_fill(~cols[None, :], neg)
    lt = logits_t.masked_fill(~cols[None, :], neg)
    n = rows.sum().clamp(min=1)
    ce_i = F.cross_entropy(li, labels, reduction="none")
    ce_t = F.cross_entropy(lt, labels, reduction="none")
    return ((ce_i * rows).sum() + (ce_t * rows).sum()) / (2 * n)


def masked_siglip_loss(loss_fn, image, text, scale, bias, valid, world: int, rank: int):
    """open_clip's SigLIP loss (``SigLipLoss``: a sigmoid per image-text pair, this rank's images against every
    rank's texts, summed and divided by the local batch) where some pairs are invalid: their rows (images) and
    columns (texts) leave the sum, which is divided by this rank's valid pairs. Where every pair on every rank is
    valid, this is ``loss_fn(image, text, scale, bias)`` itself (texts passed between neighbouring ranks)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    valid = valid.bool()
    all_valid, texts = valid, text
    if world > 1:
        import torch.distributed.nn

        parts = [torch.zeros_like(valid, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(parts, valid.to(torch.uint8).contiguous())
        all_valid = torch.cat(parts).bool()
    if bool(all_valid.all()):
        return loss_fn(image, text, scale, bias)
    if world > 1:
        texts = torch.cat(torch.distributed.nn.all_gather(text.contiguous()))  # with their gradients
    b = image.shape[0]
    logits = loss_fn.get_logits(image, texts, scale, bias)
    labels = -torch.ones_like(logits)
    labels[torch.arange(b, device=logits.device), rank * b + torch.arange(b, device=logits.device)] = 1.0
    keep = valid[:, None] & all_valid[None, :]
    return -(F.logsigmoid(labels * logits) * keep).sum() / valid.sum().clamp(min=1)


def retrieval_metrics(image, text) -> dict:
    """R@1/5/10 image->text and text->image of paired, normalised features (pair i is row i of both)."""
    sim = image @ text.T
    n = sim.shape[0]
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        rank_of_true = (s > s.diag()[:, None]).sum(1)  # how many score above the true pair
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * (rank_of_true < k).float().mean().item()
    out["recall_mean"] = sum(out.values()) / len(out)
    out["pairs"] = n
    return out


def pair_retrieval(clip, samples, make_loader, batch: int, size: int, context_length: int, device, dtype, rank: int,
                   world: int) -> dict:
    """R@1/5/10 both ways over every pair of ``samples`` (:func:`retrieval_metrics`): rank ``r`` encodes the
    ``r``-th contiguous slice (``make_loader(indices)`` -> its batches), every rank the same number of batches (a
    ZeRO-3 model gathers its parameters collectively; short slices are padded with invalid rows), the normalised
    features are gathered and every rank scores all of them. Bad pairs (no caption, undecodable) are left out."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    n = len(samples)
    per = math.ceil(n / world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    batches = math.ceil(per / batch)
    feats_i, feats_t, keep = [], [], []
    was = clip.training
    clip.eval()
    it = iter(make_loader(mine))
    with torch.no_grad():
        for _ in range(batches):
            b = next(it, None)
            if b is None:
                b = {"image": torch.zeros(batch, 3, size, size), "text": torch.zeros(batch, context_length, dtype=torch.long),
                     "valid": torch.zeros(batch, dtype=torch.bool)}
            img = clip.encode_image(b["image"].to(device).to(dtype)).float()
            txt = clip.encode_text(b["text"].to(device)).float()
            feats_i.append(F.normalize(img, dim=-1))
            feats_t.append(F.normalize(txt, dim=-1))
            keep.append(b["valid"].to(device))
    clip.train(was)
    local = [torch.cat(feats_i), torch.cat(feats_t), torch.cat(keep)]
    short = batches * batch - local[0].shape[0]  # a last partial batch: every rank gathers the same row count
    if short:
        local = [torch.cat([x, x.new_zeros((short, *x.shape[1:]))]) for x in local]
    if world > 1:
        gathered = []
        for x in local:
            parts = [torch.zeros_like(x) for _ in range(world)]
            dist.all_gather(parts, x.contiguous())
            gathered.append(torch.cat(parts))
        local = gathered
    img, txt, ok = local
    out = retrieval_metrics(img[ok.bool()], txt[ok.bool()])
    out["bad_pairs"] = n - out["pairs"]
    return out


class ZeroShotHead:
    """``module(images) -> logits``: normalised image features against a zero-shot classifier (class prompts'
    mean text features, one column a class), so fine-tuning's ``evaluate`` scores it (top-1, top-5)."""

    def __init__(self, clip, classifier):
        self.clip, self.classifier = clip, classifier

    @property
    def training(self) -> bool:
        return self.clip.training

    def eval(self):
        self.clip.eval()
        return self

    def train(self, mode=True):
        self.clip.train(mode)
        return self

    def __call__(self, x):
        import torch.nn.functional as F

        return 100.0 * F.normalize(self.clip.encode_image(x).float(), dim=-1) @ self.classifier


def zero_shot_head(clip, tokenize, classnames, templates: str, device, dtype) -> ZeroShotHead:
    """open_clip's zero-shot classifier (``build_zero_shot_classifier``: each class's mean normalised prompt
    feature) of ``classnames`` x the ``templates`` (``simple`` | ``openai``), as a head ``images -> logits``."""
    import torch
    from open_clip import build_zero_shot_classifier

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        classifier = build_zero_shot_classifier(clip, tokenize, classnames, templates_of(templates),
                                                num_classes_per_batch=10, device=device).float()
    return ZeroShotHead(clip, classifier)


def templates_of(name: str):
    from open_clip import zero_shot_metadata as meta

    return meta.OPENAI_IMAGENET_TEMPLATES if name == "openai" else meta.SIMPLE_IMAGENET_TEMPLATES


class ClipTask(TransferTask):
    """Image-text contrastive fine-tuning of megadigpt's encoder with an OpenCLIP text tower."""

    name = "image-text"
    metric = "zeroshot_top1"
    stream_mode, stream_loader = False, None  # data.mode=stream: set by prepare

    # ---------------------------------------------------------------- before anything heavy
    def plan_run(self, env):
        return plan_clip(self.cfg, env.world_size)

    def prepare(self, env):
        import open_clip

        from ..checkpoint.convert import load_encoder_weights
        from ..data.sources import scan_source

        cfg = self.cfg
        d, t = cfg.data, cfg.train
        self.stream_mode = self.counts_shards = self.plan.mode == "stream"
        if self.stream_mode:  # read as it trains: no listing
            from ..data import streaming

            self.train_samples, train_problems = [], []
            self.stream_id = streaming.run_identity(self.plan.urls, env.world_size, d.num_workers, t.seed,
                                                    d.shuffle_buffer)
        else:
            from ..data.captions import caption_problem

            self.train_samples, train_problems = scan_source(d.train)
            first = self.train_samples[:16]  # images without captions at all (a pretraining set): said now
            why = [caption_problem(smp) for smp in first]
            if first and all(why):
                raise ConfigError(f"data.train: none of its first {len(first)} images has a caption ({why[0]}): "
                                  f"image-text pairs are <key>.jpg + <key>.txt in the shards (img2dataset), or a .txt "
                                  f"beside each image file")
        self.val_samples, val_problems = scan_source(d.val) if d.val else ([], [])
        self.problems = train_problems + val_problems
        self.zeroshot, self.classnames = None, None
        if d.zeroshot:
            from ..data.sources import check_class_names
            from .transfer import check_labels

            self.zeroshot, _ = scan_source(d.zeroshot)
            n = check_labels(self.zeroshot, "data.zeroshot")
            names = check_class_names(d.zeroshot, d.zeroshot, "data.zeroshot", "data.zeroshot")
            if not names or len(names) < n:
                raise ConfigError(f"data.zeroshot: zero-shot needs the class names (classes.txt beside the shards, "
                                  f"or class folders); found {len(names or [])} for {n} labels")
            self.classnames = list(names)
        if not self.zeroshot and not self.val_samples:
            self.metric = None  # nothing to choose a best by: last/ only
        elif not self.zeroshot:
            self.metric = "recall_mean"
        self.weights, info = load_encoder_weights(t.init_from) if t.init_from else (None, {})
        self.geom, _ = resolve_model(cfg, self.weights, info)
        if cfg.model.img_size % self.geom.patch_size:
            raise ConfigError(f"model.img_size {cfg.model.img_size} is not divisible by the patch size "
                              f"{self.geom.patch_size}")
        self.oc = open_clip_config(cfg)
        self.tokenizer = None  # (the harness's codebook fingerprint: none here)
        self.tokenize = open_clip.get_tokenizer(cfg.text.model, context_length=self.oc["text_cfg"]["context_length"])
        if self.stream_mode:
            return self.stream_schedule(self.plan.epoch_size)
        return self.epoch_schedule(len(self.train_samples), env.world_size, "image-text pairs")

    def stream_schedule(self, n: Optional[int]):
        """Stream mode: an epoch is ``n`` pairs (None: unknown, then the run is ``train.max_steps`` with its
        warm-up in steps, and evaluations come every ``clip.zeroshot_every`` steps and at the end)."""
        from .harness import Schedule

        t, o = self.cfg.train, self.cfg.optim
        if n is None and (t.max_steps is None or (o.warmup_steps is None and o.warmup_epochs)):
            raise ConfigError("the epoch size of this stream is unknown: give train.max_steps and optim.warmup_steps "
                              "(or data.epoch_size)")
        per_epoch = n / t.global_batch if n is not None else None
        total = t.max_steps if t.max_steps is not None else max(1, int(t.epochs * n // t.global_batch))
        warmup = o.warmup_steps if o.warmup_steps is not None else o.warmup_epochs * (per_epoch or 0)
        self.steps_per_epoch = max(1, round(per_epoch)) if per_epoch else None
        self.total, self.warmup = total, min(warmup, total)
        return Schedule(total, per_epoch, self.warmup, warmup)

    def check_resume(self, resume):
        from ..data import streaming

        # the read positions fit only the same readers over the same shards
        streaming.check_resume_mode(resume.get("stream"), self.stream_id if self.stream_mode else None)

    def client_state(self, run: Run) -> dict:
        return {"stream": self.stream_id} if self.stream_mode else {}

    def checkpoint_files(self, run: Run, tag_dir):
        if not self.stream_mode:
            return []
        from ..data import streaming

        return [streaming.write_state(tag_dir, self.stream_loader)]  # each rank's read positions, as of the
        # batches this checkpoint covers

    def resume_config(self):
        return self.geometry_config(self.geom)

    def run_config(self):
        import copy

        resolved = copy.deepcopy(self.cfg)
        resolved.model.num_heads = self.geom.num_heads
        return resolved

    # ---------------------------------------------------------------- start-up
    def build(self, run: Run):
        import torch

        from ..distributed import engine as ds_engine

        torch.manual_seed(self.cfg.train.seed)  # identical initial projection and text tower on every rank
        model, self.load_report = build_clip(self.cfg, self.geom, self.weights)
        self.weights = None
        freeze_towers(model, self.cfg.clip)
        if self.cfg.train.activation_checkpointing:
            model.visual.set_grad_checkpointing(True)
            model.set_grad_checkpointing(True)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model, ds_engine.build_ds_config(self.cfg, run.world, self.plan.precision, params=n_params)

    def build_optimizer(self, run: Run, model, ds_config):
        from ..model.classifier import param_groups_lrd
        from .optim import build_optimizer

        o, c = self.cfg.optim, self.cfg.clip
        groups = param_groups_lrd(model.visual, o.weight_decay, o.layer_decay, self.geom.depth)
        text_decay, text_plain = [], []
        for name, p in model.named_parameters():
            if name.startswith("visual.") or not p.requires_grad:
                continue
            (text_plain if p.ndim < 2 or name.endswith(".bias") or name == "logit_scale" else text_decay).append(p)
        groups += [g for g in ({"params": text_decay, "weight_decay": o.weight_decay, "lr_scale": c.text_lr_scale},
                               {"params": text_plain, "weight_decay": 0.0, "lr_scale": c.text_lr_scale})
                   if g["params"]]
        return build_optimizer(model, o, self.plan.lr, self.plan.device_type, groups, ds_config=ds_config)

    def attach(self, run: Run):
        from open_clip.loss import ClipLoss, SigLipLoss

        c = self.cfg.clip
        self.run, self.engine, self.device = run, run.engine, run.device
        if c.loss == "siglip":
            self.loss_fn = SigLipLoss(rank=run.env.rank, world_size=run.world)
        else:
            self.loss_fn = ClipLoss(local_loss=c.local_loss, gather_with_grad=c.gather_with_grad, cache_labels=False,
                                    rank=run.env.rank, world_size=run.world)
        self.max_scale = c.max_logit_scale

    def resumed(self, run: Run):
        self.resume_ema(run, 0.0)
        if self.stream_mode:
            from .. import checkpoint as ckpt
            from ..data import streaming
            from ..data.captions import PairStreamDataset

            d, t = self.cfg.data, self.cfg.train
            state = streaming.read_state(ckpt.checkpoint_dir(run.run_dir) / run.tag, run.env.rank) if run.tag else None
            if run.tag and state is None:
                raise ConfigError(f"checkpoint {run.tag} holds no stream read positions for rank {run.env.rank} "
                                  f"({streaming.STATE_FILE.format(rank=run.env.rank)})")
            dataset = PairStreamDataset(self.plan.urls, self._transform(True), self.tokenize, self.cfg.model.img_size,
                                        self.oc["text_cfg"]["context_length"], t.seed, run.env.rank, run.world,
                                        d.num_workers, d.shuffle_buffer, start=streaming.start_cursors(state))
            self.stream_loader = streaming.StreamLoader(dataset, t.micro_batch,
                                                        (self.total - run.start_step) * self.plan.accum, d.num_workers)

    def bad_sample_source(self):
        return self.train_samples, self.problems

    def started(self, run: Run):
        if self.plan.accum > 1 and run.rank0:  # the negatives are the micro-step's, not the global batch's: said
            import sys

            t = self.cfg.train
            print(f"megadigpt: warning: train.global_batch {t.global_batch} is reached by accumulating {self.plan.accum}"
                  f" micro-steps: each contrasts its {t.micro_batch * run.world} pairs (train.micro_batch x "
                  f"{run.world} ranks) with each other, not all {t.global_batch} (OpenCLIP's feature-cache "
                  f"accumulation is not implemented); for the recipe's negatives use more ranks or a larger "
                  f"train.micro_batch", file=sys.stderr, flush=True)

    def start_fields(self, run: Run) -> dict:
        return dict(contrastive_batch=self.cfg.train.micro_batch * run.world, data_mode=self.plan.mode,
                    loader=self.plan.loader,
                    train_pairs=self.plan.epoch_size if self.stream_mode else len(self.train_samples), val_pairs=len(self.val_samples),
                    zeroshot_images=len(self.zeroshot or []), classes=len(self.classnames or []),
                    text_model=self.cfg.text.model, text_weights=self.cfg.text.weights, embed_dim=self.oc["embed_dim"],
                    steps_per_epoch=self.steps_per_epoch, init_from=self.cfg.train.init_from, load=self.load_report)

    # ---------------------------------------------------------------- the step
    def _transform(self, train: bool):
        from ..data.classification import timm_transform

        m, d = self.cfg.model, self.cfg.data
        return timm_transform(train, m.img_size, d.mean, d.std, d.crop_pct, d.auto_augment, tuple(d.crop_scale))

    def _loader(self, samples, indices, train: bool, epoch: int = 0):
        from ..data.captions import DaliPairLoader, pair_loader

        d, t = self.cfg.data, self.cfg.train
        if self.plan.loader == "dali":
            m = self.cfg.model
            return DaliPairLoader(samples, indices, self.tokenize, self.oc["text_cfg"]["context_length"], train,
                                  m.img_size, t.micro_batch, d.mean, d.std, self.device, d.crop_pct, d.num_workers,
                                  t.seed, epoch, d.crop_scale)
        return pair_loader(samples, indices, self._transform(train), self.tokenize, self.cfg.model.img_size,
                           self.oc["text_cfg"]["context_length"], t.micro_batch, train, num_workers=d.num_workers,
                           seed=t.seed, epoch=epoch, pin_memory=self.device.type == "cuda")

    def batches(self, run: Run):
        from ..data.classification import shard_indices

        if self.stream_mode:
            return iter(self.stream_loader)
        t = self.cfg.train
        n = len(self.train_samples)

        def loader(epoch, skip):
            idx = shard_indices(n, run.env.rank, run.world, epoch, t.seed, True)
            idx = idx[: (len(idx) // t.micro_batch) * t.micro_batch][skip * t.micro_batch:]
            return self._loader(self.train_samples, idx, True, epoch)

        return epoch_batches(loader, self.steps_per_epoch, self.plan.accum, run.start_step)

    def lr_at(self, step: int) -> float:
        from .optim import lr_at

        return lr_at(step, self.plan.lr, self.warmup, self.total, self.cfg.optim.min_lr)

    def inputs(self, batch):
        from ..distributed import engine as ds_engine

        return (batch["image"].to(self.device, non_blocking=True), batch["text"].to(self.device, non_blocking=True),
                ds_engine.to_device(batch["valid"], self.device).float())

    def loss(self, inputs, targets):
        import torch

        x, tokens, valid = inputs
        image, text, scale, *bias = self.engine(x.to(self.run.compute_dtype), tokens)
        scale = scale.clamp(max=self.max_scale)  # OpenCLIP clamps the logit scale at 100
        if bias:  # siglip
            loss = masked_siglip_loss(self.loss_fn, image.float(), text.float(), scale.float(), bias[0].float(), valid,
                                      self.run.world, self.run.env.rank)
        else:
            loss = masked_clip_loss(self.loss_fn, image.float(), text.float(), scale.float(), valid, self.run.world,
                                    self.run.env.rank)
        n = valid.sum().double()
        self.scale, self.bias = scale.detach(), bias[0].detach() if bias else None
        return loss, torch.stack([loss.detach().double() * n, n]), valid

    def log_fields(self, sums) -> dict:
        return {"train_loss": (sums[0] / sums[1]).item() if sums[1] > 0 else None}

    def log_extra(self, rec, images_per_s):
        rec["logit_scale"] = float(self.scale.item())
        if self.bias is not None:
            rec["logit_bias"] = float(self.bias.item())

    # ---------------------------------------------------------------- evaluation, exports
    def epoch_end(self, step: int) -> bool:
        return (self.steps_per_epoch is not None and step % self.steps_per_epoch == 0) or step == self.total

    def evaluate_due(self, step: int) -> bool:
        every = self.cfg.clip.zeroshot_every
        due = step % every == 0 if every > 0 else self.epoch_end(step)
        return (due or step == self.total) and bool(self.zeroshot or self.val_samples)

    def checkpoint_due(self, step: int) -> bool:
        return self.epoch_end(step)

    def evaluate(self, run: Run, step: int):
        rec = {"epoch": run.epoch(step)}
        results = {}
        if self.zeroshot:
            res = self.zero_shot(run)
            rec.update({f"zeroshot_{k}": v for k, v in res.items()})
            results["zeroshot_top1"] = res["top1"]
        if self.val_samples:
            res = self.retrieval(run)
            rec.update({f"val_{k}": v for k, v in res.items()})
            results["recall_mean"] = res["recall_mean"]
        run.sink.log(step, rec)
        run.history.append((step, rec))
        if self.metric:
            self.keep_best(run, step, [("best", results)], lambda which, r, _: self.export(run, which, rec))
        self.export(run, "last", rec)

    def zero_shot(self, run: Run) -> dict:
        """Top-1/top-5 of the zero-shot classifier (open_clip's: the mean normalised text feature of each class's
        prompts) on ``data.zeroshot``; every rank builds the same classifier and scores its share."""
        from ..data.classification import build_classification_loader
        from .finetune import evaluate

        m, d, t = self.cfg.model, self.cfg.data, self.cfg.train
        clip = run.engine.module
        was = clip.training
        head = zero_shot_head(clip.eval(), self.tokenize, self.classnames, self.cfg.clip.templates, run.device,
                              run.compute_dtype)
        clip.train(was)
        loader = build_classification_loader(self.zeroshot, False, m.img_size, t.micro_batch, run.env.rank,
                                             run.world, kind=self.plan.loader, device=run.device,
                                             num_workers=d.num_workers, mean=d.mean, std=d.std, crop_pct=d.crop_pct)
        return evaluate(head, loader, eval_batches(len(self.zeroshot), run.world,
                                                                            t.micro_batch),
                        t.micro_batch, run.device, run.compute_dtype, m.img_size)

    def retrieval(self, run: Run) -> dict:
        """R@1/5/10 both ways on ``data.val``'s pairs (:func:`pair_retrieval`)."""
        return pair_retrieval(run.engine.module, self.val_samples, lambda idx: self._loader(self.val_samples, idx, False),
                              self.cfg.train.micro_batch, self.cfg.model.img_size, self.oc["text_cfg"]["context_length"],
                              run.device, run.compute_dtype, run.env.rank, run.world)

    def export(self, run: Run, which: str, metrics: dict):
        """The whole model (``model.safetensors``: open_clip's names, the image tower under ``visual.`` in timm's
        names) and ``config.json`` (the text model and overrides, the image tower's arguments, the metrics):
        :func:`load_export` rebuilds it."""
        state = self.export_state(run, False)
        if not run.rank0:
            return
        from safetensors.torch import save_file

        info = {"task": "image_text", "loss": self.cfg.clip.loss, "text": {"model": self.cfg.text.model, **self.oc},
                "visual": self.geom.model_args(self.cfg.model.img_size, self.oc["embed_dim"],
                                               self.cfg.model.global_pool),
                "preprocessing": {"mean": list(self.cfg.data.mean), "std": list(self.cfg.data.std),
                                  "crop_pct": self.cfg.data.crop_pct},
                "zeroshot": {"templates": self.cfg.clip.templates},
                "megadigpt": {"metrics": metrics}}

        def write(tmp):
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(info, indent=1, default=str))

        publish_folder(run.run_dir / which, write)

    def best_record(self, res, step: int) -> dict:
        return {self.metric: res[self.metric], "step": step}


def load_export(folder):
    """A ``best/`` or ``last/`` folder of ``megadigpt clip`` -> the CLIP model (eval mode) and its tokenizer."""
    import logging

    import open_clip
    import torch
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    folder = Path(folder)
    info = json.loads((folder / "config.json").read_text())
    text = dict(info["text"])
    name = text.pop("model")
    was = logging.getLogger().disabled
    logging.getLogger().disabled = True
    try:
        model = open_clip.create_model(name, pretrained=None, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 32,
                                                                          "patch_size": 32}, **text)
    finally:
        logging.getLogger().disabled = was
    model.visual = VisionTransformer(**info["visual"])
    state = load_file(str(folder / "model.safetensors"))
    model.logit_scale = torch.nn.Parameter(torch.zeros(1))  # (1-element, as build_clip makes it)
    model.logit_bias = torch.nn.Parameter(torch.zeros(1)) if "logit_bias" in state else None  # siglip
    model.load_state_dict(state, strict=True)
    tokenizer = open_clip.get_tokenizer(name, context_length=text["text_cfg"]["context_length"])
    return model.eval(), tokenizer


def clip(cfg: ClipRunConfig) -> dict:
    """Run (or resume) image-text fine-tuning; returns a summary with the best results."""
    return harness.run(ClipTask(cfg))

"""Frozen-feature evaluation: linear probes on every layer at once, and k-NN.

The iGPT / DiGIT protocol: the average-pooled patch tokens of each block are a candidate representation; one
linear head per block is trained on them (all heads together, on features cached once), and the best block is
reported. k-NN: cosine similarity against the training features, the k = 20 nearest vote with weights
exp(cos / 0.07) (the DINO weighting).

Features are standardised per block with the training set's mean and variance (a BatchNorm without affine, frozen
- MAE's linear-probe head). Features are extracted with the eval transform (resize + centre crop), each rank its
own slice; the heads train data-parallel with summed gradients; memory per rank is
``images / world x blocks x width x 2 bytes`` (fp16 cache): use ``probe.layers`` to bound it on big sets.

``megadigpt probe WEIGHTS --train ... --val ... --out DIR``; during pretraining ``train.probe_every`` runs the
k-NN part as a monitor (``knn_top1`` in metrics.jsonl).
"""

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F


# ============================================================================ features


def pooled_block_features(encoder, images: torch.Tensor) -> List[torch.Tensor]:
    """Mean of the patch tokens after each block: a list of ``depth`` (B, C) tensors. Works on timm's
    VisionTransformer and on megadigpt's pretraining ``ViTEncoder`` (full attention, CLS included in attention)."""
    if hasattr(encoder, "forward_intermediates"):  # timm
        outs = encoder.forward_intermediates(images, indices=len(encoder.blocks), norm=False, output_fmt="NLC",
                                             intermediates_only=True)
        return [o.mean(dim=1) for o in outs]
    x = encoder.embed_patches(images)
    x = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    feats = []
    for blk in encoder.blocks:
        x = blk(x)
        feats.append(x[:, 1:].mean(dim=1))
    return feats


def parse_layers(spec: str, depth: int) -> List[int]:
    """'all' | 'last' | '3,6,12' -> 1-indexed blocks."""
    from ..config import ConfigError

    if spec == "all":
        return list(range(1, depth + 1))
    if spec == "last":
        return [depth]
    try:
        layers = sorted({int(v) for v in spec.split(",")})
    except ValueError:
        raise ConfigError(f"layers must be all, last or comma-separated block numbers, got {spec!r}")
    if not layers or not all(1 <= v <= depth for v in layers):
        raise ConfigError(f"layers {spec!r} must be blocks in 1..{depth}")
    return layers


@torch.no_grad()
def extract(encoder, loader, num_batches: int, batch_size: int, layers: Sequence[int], img_size: int, device,
            dtype=torch.float32):
    """-> (features (L, n, C) fp16 on ``device``, labels (n,), valid (n,)) for this rank's slice. Every rank runs
    ``num_batches`` forwards (blank padding batches) so that sharded parameters stay in step."""
    feats, labels, valid = [], [], []
    it = iter(loader)
    idx = [v - 1 for v in layers]
    was = encoder.training
    encoder.eval()
    for _ in range(num_batches):
        batch = next(it, None)
        if batch is None:
            x = torch.zeros(batch_size, 3, img_size, img_size, device=device)
            y = torch.zeros(batch_size, dtype=torch.long)
            v = torch.zeros(batch_size, dtype=torch.bool)
            pad = True
        else:
            x, y, v = batch["image"].to(device), batch["label"], batch["valid"]
            pad = False
        out = pooled_block_features(encoder, x.to(dtype))
        if not pad:
            feats.append(torch.stack([out[i].float() for i in idx]).half())
            labels.append(y.to(device))
            valid.append(v.to(device))
    encoder.train(was)
    if not feats:
        C = encoder.embed_dim
        return (torch.zeros(len(layers), 0, C, dtype=torch.half, device=device),
                torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.bool, device=device))
    return torch.cat(feats, dim=1), torch.cat(labels), torch.cat(valid)


# ============================================================================ collectives (no-ops on one process)


def _world():
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if _world() > 1:
        dist.all_reduce(t)
    return t


def _all_gather_rows(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's tensor along ``dim`` (sizes may differ by rank)."""
    import torch.distributed as dist

    if _world() == 1:
        return t
    n = torch.tensor([t.shape[dim]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(_world())]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    pad = list(t.shape)
    pad[dim] = top - t.shape[dim]
    padded = torch.cat([t, t.new_zeros(pad)], dim=dim)
    parts = [torch.zeros_like(padded) for _ in range(_world())]
    dist.all_gather(parts, padded)
    return torch.cat([p.narrow(dim, 0, int(s.item())) for p, s in zip(parts, sizes)], dim=dim)


# ============================================================================ linear heads


def train_linear_heads(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                       num_classes: int, epochs: int = 30, batch: int = 1024, lr: float = 1e-3,
                       weight_decay: float = 1e-4, seed: int = 0) -> Dict:
    """One linear head per layer, trained together. train_x: (L, n, C) this rank's features; heads are replicated
    and their gradients summed over ranks. Returns per-layer top-1/top-5 on ``val_x`` (all ranks) and the heads."""
    L, n, C = train_x.shape
    device = train_x.device
    # standardise with the training set's statistics (all ranks)
    s = _all_reduce(torch.stack([train_x.float().sum(1), (train_x.float() ** 2).sum(1)]))  # (2, L, C)
    count = _all_reduce(torch.tensor([float(n)], device=device)).item()
    mean = s[0] / count
    std = (s[1] / count - mean ** 2).clamp(min=0).sqrt() + 1e-6
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.empty(L, C, num_classes)
    torch.nn.init.trunc_normal_(w, std=0.01, generator=g)
    w = w.to(device)
    bias = torch.zeros(L, 1, num_classes, device=device)
    w.requires_grad_(True)
    bias.requires_grad_(True)
    opt = torch.optim.AdamW([w, bias], lr=lr, weight_decay=weight_decay)
    world = _world()
    per_rank = max(1, batch // world)
    # every rank takes the same number of steps: the smallest slice decides
    min_n = torch.tensor([n], device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(min_n, op=dist.ReduceOp.MIN)
    min_n = int(min_n.item())
    steps_per_epoch = max(1, min_n // per_rank) if min_n > 0 else 0
    total = max(1, epochs * steps_per_epoch)
    step = 0
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * per_rank:(i + 1) * per_rank]
            x = (train_x[:, idx].float() - mean[:, None]) / std[:, None]  # (L, b, C)
            logits = torch.baddbmm(bias, x, w)  # (L, b, K)
            loss = F.cross_entropy(logits.reshape(-1, num_classes), train_y[idx].repeat(L)) * L
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for p in (w, bias):
                    _all_reduce(p.grad)
                    p.grad /= world
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.step()
            step += 1
    with torch.no_grad():
        hits = torch.zeros(2, L, dtype=torch.float64, device=device)
        for i in range(0, val_x.shape[1], 4096):
            x = (val_x[:, i:i + 4096].float() - mean[:, None]) / std[:, None]
            logits = torch.baddbmm(bias, x, w)
            y = val_y[i:i + 4096]
            top = logits.topk(min(5, num_classes), dim=-1).indices  # (L, b, 5)
            hits[0] += (top[..., 0] == y).double().sum(1)
            hits[1] += (top == y[None, :, None]).any(-1).double().sum(1)
        _all_reduce(hits)
        nval = _all_reduce(torch.tensor([float(val_x.shape[1])], device=device, dtype=torch.float64)).item()
    top1 = (100 * hits[0] / max(nval, 1)).tolist()
    top5 = (100 * hits[1] / max(nval, 1)).tolist()
    return {"top1": top1, "top5": top5, "weight": w.detach(), "bias": bias.detach(), "mean": mean, "std": std}


# ============================================================================ k-NN


def _gather_padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Every rank's ``t`` (at most ``rows`` rows), zero-padded to ``rows``: (world, rows, ...)."""
    import torch.distributed as dist

    padded = torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])
    if _world() == 1:
        return padded[None]
    parts = [torch.empty_like(padded) for _ in range(_world())]
    dist.all_gather(parts, padded)
    return torch.stack(parts)


@torch.no_grad()
def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, k: int = 20, t: float = 0.07, chunk: int = 1024) -> Dict:
    """Cosine k-NN with exp(cos / t) weighted votes, on a sharded bank. train_x: (n, C) this rank's slice of the
    bank (it stays here: memory per rank is ``n x C`` fp32, 1/world of the bank), val_x: (m, C) this rank's
    queries. Per chunk, the queries of every rank are gathered (``world x chunk x C``), each rank finds their k
    nearest in its own shard, and the (world x k) candidates per query are gathered and merged: the same
    neighbours as a gathered bank. Returns top-1/top-5 over all ranks, and ``bank_rows`` (this rank's shard)."""
    import torch.distributed as dist

    world = _world()
    device = val_x.device
    bank = F.normalize(train_x.float(), dim=1)  # this rank's shard only
    bank_y = train_y.to(device)
    n_all = int(_all_reduce(torch.tensor([float(bank.shape[0])], device=device)).item())
    k = min(k, n_all)
    m = torch.tensor([val_x.shape[0]], device=device)
    if world > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    rounds = (int(m.item()) + chunk - 1) // chunk  # the same on every rank: each round is a collective
    hits = torch.zeros(2, dtype=torch.float64, device=device)
    total = 0
    for r in range(rounds):
        q, y = val_x[r * chunk:(r + 1) * chunk], val_y[r * chunk:(r + 1) * chunk].to(device)
        qs = _gather_padded(F.normalize(q.float(), dim=1), chunk).flatten(0, 1)  # (world * chunk, C)
        ys = _gather_padded(y, chunk).flatten()
        real = _gather_padded(torch.ones(len(y), dtype=torch.bool, device=device), chunk).flatten()
        # this shard's best k (fewer if the shard is smaller; -inf fills, never chosen over a real neighbour)
        kk = min(k, bank.shape[0])
        sim = torch.full((qs.shape[0], k), -math.inf, device=device)
        lab = torch.zeros(qs.shape[0], k, dtype=torch.long, device=device)
        if kk > 0:
            s, i = (qs @ bank.T).topk(kk, dim=1)
            sim[:, :kk], lab[:, :kk] = s, bank_y[i]
        sims = _gather_padded(sim, sim.shape[0]).permute(1, 0, 2).flatten(1)  # (world * chunk, world * k)
        labs = _gather_padded(lab, lab.shape[0]).permute(1, 0, 2).flatten(1)
        sim, j = sims.topk(k, dim=1)
        votes = torch.zeros(qs.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labs.gather(1, j), (sim / t).exp())
        top = votes.topk(min(5, num_classes), dim=1).indices
        # every rank now holds the merged answer for every rank's queries: count them all, here
        hits[0] += ((top[:, 0] == ys) & real).double().sum()
        hits[1] += ((top == ys[:, None]).any(1) & real).double().sum()
        total += int(real.sum())
    return {"top1": 100 * hits[0].item() / max(total, 1), "top5": 100 * hits[1].item() / max(total, 1),
            "bank_rows": int(bank.shape[0])}


# ============================================================================ the command


def features_for(encoder, samples, img_size: int, micro_batch: int, layers, device, dtype, kind: str,
                 num_workers: int, mean, std, crop_pct: float):
    from ..data.classification import build_classification_loader
    from .transfer import eval_batches

    rank = 0
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
    loader = build_classification_loader(samples, False, img_size, micro_batch, rank, _world(), kind=kind,
                                         device=device, num_workers=num_workers, mean=mean, std=std,
                                         crop_pct=crop_pct)
    feats = extract(encoder, loader, eval_batches(len(samples), _world(), micro_batch), micro_batch, layers,
                    img_size, device, dtype)
    if hasattr(loader, "close"):
        loader.close()
    x, y, valid = feats
    return x[:, valid], y[valid]


def knn_monitor(encoder, train_samples, val_samples, num_classes: int, img_size: int, micro_batch: int, device,
                dtype, mean, std, k: int = 20, t: float = 0.07, num_workers: int = 2) -> Dict:
    """k-NN top-1 of the last block's pooled features, during pretraining (a collective: every rank calls it).
    Images are decoded by ``num_workers`` DataLoader workers (not in the training thread); the bank stays
    sharded over the ranks (:func:`knn_classify`)."""
    import time

    t0 = time.perf_counter()
    depth = len(encoder.blocks)
    common = dict(img_size=img_size, micro_batch=micro_batch, layers=[depth], device=device, dtype=dtype,
                  kind="torch", num_workers=num_workers, mean=mean, std=std, crop_pct=0.875)
    tx, ty = features_for(encoder, train_samples, **common)
    vx, vy = features_for(encoder, val_samples, **common)
    r = knn_classify(tx[0], ty, vx[0], vy, num_classes, k, t)
    return {"knn_top1": r["top1"], "knn_top5": r["top5"], "knn_seconds": time.perf_counter() - t0}


OUTPUT_FILES = ("results.json", "results.md")  # what --out receives


def check_labelled_sources(cfg) -> None:
    """``data.train`` / ``data.val`` that name a megadigpt run directory (its report's plots would be read as one
    class of images, and its labels would not fit): one line saying so, and where the weights go instead."""
    from ..config import ConfigError

    for what, source in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if not isinstance(source, str) or "://" in source:
            continue
        p = Path(source).expanduser()
        if p.is_dir() and ((p / "metrics.jsonl").is_file() or (p / "checkpoints").is_dir()):
            raise ConfigError(f"{what}: no images found in {source}: it is a megadigpt run directory, not labelled "
                              f"images (class folders, shards with .cls members, a sample list); the weights to "
                              f"probe go first: megadigpt probe {source} --train IMAGES --val IMAGES --out DIR")


def run_probe(cfg, weights: Optional[str], out_dir: str, random_init: bool = False) -> dict:
    """``megadigpt probe``: linear probes on every requested block + k-NN, from pretrained (or random) weights."""
    from ..config import ConfigError
    from ..distributed import env as dist_env
    from .finetune import plan_finetune
    from .transfer import check_labels, resolve_model

    if weights:
        cfg.train.init_from = weights
    elif not random_init:
        raise ConfigError("give the weights to probe (a run, checkpoint, timm folder or .safetensors), or "
                          "--random-init")
    check_labelled_sources(cfg)
    env = dist_env.discover()
    cfg.train.global_batch = cfg.train.micro_batch * env.world_size  # extraction only: no optimizer batch
    cfg.train.run_dir = out_dir  # (the checks create train.run_dir; a probe writes only to --out)
    cfg.finetune.mixup = cfg.finetune.cutmix = 0.0  # (not used here: no pairing constraint on the batch)
    plan = plan_finetune(cfg, env.world_size)
    from ..checkpoint.convert import load_encoder_weights
    from ..data import find_samples
    from ..model.classifier import build_classifier
    from .finetune import load_into_classifier
    from .common import torch_dtype

    p, d, m = cfg.probe, cfg.data, cfg.model
    train_samples, val_samples = find_samples(d.train), find_samples(d.val)
    num_classes = check_labels(train_samples, "data.train", m.num_classes)
    check_labels(val_samples, "data.val", num_classes)
    from ..data.sources import check_class_names

    check_class_names(d.train, d.val)  # compared by name: one line where train and val classes differ
    sd, info = load_encoder_weights(weights) if weights else (None, {})
    geom, _ = resolve_model(cfg, sd, info)
    layers = parse_layers(p.layers, geom.depth)
    knn_layers = parse_layers(p.knn_layers, geom.depth)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    from ..distributed import engine as ds_engine

    device = ds_engine.start_processes(env, plan.device_type)
    torch.manual_seed(cfg.train.seed)
    model = build_classifier(geom, m.img_size, 0, m.global_pool, 0.0)
    load = load_into_classifier(model, sd, 0.0) if sd is not None else None
    dtype = torch_dtype(plan.precision)
    model.to(device=device, dtype=dtype)
    want = sorted(set(layers) | set(knn_layers))
    common = dict(img_size=m.img_size, micro_batch=cfg.train.micro_batch, layers=want, device=device, dtype=dtype,
                  kind=plan.loader, num_workers=d.num_workers, mean=d.mean, std=d.std, crop_pct=d.crop_pct)
    tx, ty = features_for(model, train_samples, **common)
    vx, vy = features_for(model, val_samples, **common)
    sel = [want.index(v) for v in layers]
    heads = train_linear_heads(tx[sel], ty, vx[sel], vy, num_classes, p.epochs, p.batch, p.lr, p.weight_decay,
                               cfg.train.seed)
    per_layer = [{"layer": v, "top1": heads["top1"][i], "top5": heads["top5"][i]} for i, v in enumerate(layers)]
    best = max(per_layer, key=lambda r: r["top1"])
    knn = []
    for v in knn_layers:
        r = knn_classify(tx[want.index(v)], ty, vx[want.index(v)], vy, num_classes, p.knn_k, p.knn_t)
        knn.append({"layer": v, "top1": r["top1"], "top5": r["top5"]})
    result = {"weights": weights, "random_init": bool(random_init and not weights), "linear": per_layer,
              "best": best, "knn": knn, "num_classes": num_classes, "train_images": int(_all_reduce(
                  torch.tensor([float(len(ty))], device=device)).item()),
              "val_images": int(_all_reduce(torch.tensor([float(len(vy))], device=device)).item()),
              "img_size": m.img_size, "load": load, "probe": dict(vars(p))}
    if env.rank == 0:
        from ..checkpoint.convert import write_output  # atomic, recorded as megadigpt's (the CLI checks --out)

        write_output(out / "results.json", json.dumps(result, indent=1), "probe")
        lines = ["| block | linear top-1 | linear top-5 | k-NN top-1 |", "|---|---|---|---|"]
        knn_by = {r["layer"]: r["top1"] for r in knn}
        for r in per_layer:
            star = " **best**" if r is best else ""
            kn = f"{knn_by[r['layer']]:.2f}" if r["layer"] in knn_by else "-"
            lines.append(f"| {r['layer']}{star} | {r['top1']:.2f} | {r['top5']:.2f} | {kn} |")
        write_output(out / "results.md", "\n".join(lines) + "\n", "probe")
        print("\n".join(lines))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result

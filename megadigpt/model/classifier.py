"""The fine-tuning model: timm's ``VisionTransformer`` itself, so that what megadigpt fine-tunes is what timm
loads (no key surgery, no wrapper). The paper's head (spec §7) is timm's ``global_pool='avg'``: the mean of the
patch tokens, ``fc_norm`` (LayerNorm), ``head`` (Linear); the trunk's final ``norm`` is then an Identity.

Also here: bicubic interpolation of a position-embedding table to another grid (448 px fine-tuning of a 224 px
encoder), and each parameter's layer id for layer-wise lr decay.
"""

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import ConfigError


@dataclass(frozen=True)
class EncoderGeometry:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int

    def model_args(self, img_size: int, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0) -> dict:
        """timm ``VisionTransformer`` keyword arguments (also written into exported ``config.json``)."""
        return {"img_size": img_size, "patch_size": self.patch_size, "embed_dim": self.embed_dim, "depth": self.depth,
                "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio, "qkv_bias": True, "class_token": True,
                "global_pool": global_pool, "num_classes": num_classes, "drop_path_rate": drop_path}


def build_classifier(geom: EncoderGeometry, img_size: int, num_classes: int, global_pool: str = "avg",
                     drop_path: float = 0.0, init_weights: bool = True):
    """timm's ViT. ``init_weights=False``: timm's own weight init is left to the caller, as ``model.init_steps()``
    (:func:`init_steps`); a partitioned build (``distributed.partitioned``) runs them one module at a time."""
    import functools

    from timm.models.vision_transformer import VisionTransformer

    # LayerNorm eps 1e-6 is timm's ViT default (and the pretraining encoder's)
    model = VisionTransformer(**geom.model_args(img_size, num_classes, global_pool, drop_path),
                              weight_init="" if init_weights else "skip")
    if not init_weights:
        model.init_steps = functools.partial(init_steps, model)
    return model


def _depth_first(module: torch.nn.Module, include_root: bool = False):
    """Modules in the order of timm's ``named_apply`` (children first, then the module)."""
    for child in module.children():
        yield from _depth_first(child, True)
    if include_root:
        yield module


def init_steps(model):
    """timm's ``VisionTransformer.init_weights`` (the default mode, after the modules' own construction-time init)
    as ``(parameters, init)`` steps in timm's order, each touching only its parameters: the random draws are the
    plain build's, step for step."""
    import functools

    from timm.models import vision_transformer as tvit

    if getattr(model, "reg_token", None) is not None or getattr(model, "fix_init", False):
        raise ValueError("init_steps covers timm's default ViT init only (no register tokens, no fix_init)")
    if model.pos_embed is not None:
        yield [model.pos_embed], functools.partial(tvit.trunc_normal_, model.pos_embed, std=.02)
    if model.cls_token is not None:
        yield [model.cls_token], functools.partial(torch.nn.init.normal_, model.cls_token, std=1e-6)
    for module in _depth_first(model):
        if isinstance(module, torch.nn.Linear):
            params = list(module.parameters(recurse=False))
        elif hasattr(module, "init_weights"):  # e.g. a block that re-initialises its children's norms
            params = list(module.parameters())
        else:  # needs_reset=False: the module's own __init__ initialised it
            continue
        yield params, functools.partial(tvit.init_weights_vit_timm, module, needs_reset=False)


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix: int = 1) -> torch.Tensor:
    """(1, P + g*g, C) -> (1, P + new_grid**2, C): the prefix (CLS) rows kept, the grid resampled bicubically
    (MAE's ``interpolate_pos_embed``). The same grid returns the input unchanged (an exact copy)."""
    old = pos_embed.shape[1] - num_prefix
    g = int(round(old ** 0.5))
    if g * g != old:
        raise ValueError(f"position embedding of {old} tokens is not a square grid")
    if g == new_grid:
        return pos_embed.clone()
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    C = grid.shape[-1]
    grid = grid.float().reshape(1, g, g, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, C).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def layer_id(name: str, depth: int) -> int:
    """BEiT/MAE layer-wise lr decay ids: embeddings 0, block i -> i + 1, everything after the trunk depth + 1."""
    if name in ("cls_token", "pos_embed", "reg_token", "mask_token") or name.startswith("patch_embed"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def param_groups_lrd(model: torch.nn.Module, weight_decay: float, layer_decay: float, depth: Optional[int] = None):
    """AdamW groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; no weight decay on 1-D
    parameters, biases, ``pos_embed`` and ``cls_token`` (timm's ``no_weight_decay``)."""
    depth = depth if depth is not None else len(model.blocks)
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3-partitioned parameter's data is 1-D
        no_wd = ndim == 1 or name.endswith(".bias") or name in skip
        lid = layer_id(name, depth)
        key = (lid, no_wd)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - lid), "layer_id": lid}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def fit_to_classifier(model, weights):
    """The pretrained state made to fit the timm model's (full) shapes: position embeddings interpolated,
    another task's head and the pretraining's final norm dropped. -> (state, report); ConfigError when the trunk
    does not fit."""
    from ..distributed.partitioned import full_shape

    own = {n: tuple(full_shape(p)) for n, p in model.named_parameters()}
    own.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in model.state_dict()})
    sd = dict(weights)
    report = {"interpolated": None, "dropped": [], "fresh": []}
    grid = model.patch_embed.grid_size[0]
    if tuple(sd["pos_embed"].shape) != own["pos_embed"]:
        old = sd["pos_embed"].shape[1] - 1
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], grid)
        report["interpolated"] = f"{int(round(old ** 0.5))}x{int(round(old ** 0.5))} -> {grid}x{grid}"
    for k in list(sd):
        if k not in own or tuple(sd[k].shape) != own[k]:
            if k.startswith(("head.", "fc_norm.", "norm.")):  # another task's head / the pretraining's final norm
                report["dropped"].append(k)
                del sd[k]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_missing = [k for k in missing if not k.startswith(("head.", "fc_norm.", "norm."))]
    wrong = [k for k in sd if k in own and tuple(sd[k].shape) != own[k]]
    if bad_missing or unexpected or wrong:
        raise ConfigError(f"the pretrained weights do not fit the classifier: missing {bad_missing[:3]}, unexpected "
                          f"{unexpected[:3]}, wrong shape {wrong[:3]}")
    report["fresh"] = missing
    return sd, report

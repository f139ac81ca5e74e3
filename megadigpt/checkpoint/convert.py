"""``megadigpt convert``: take a run anywhere.

- ``--to timm``: the encoder as a timm ``VisionTransformer`` in safetensors + ``config.json`` (timm's hub layout:
  architecture, model_args, pretrained_cfg). Choices: CLS is first (timm's order; the pretraining appended it
  last, which changes nothing for full attention); ``pos_embed`` is the fixed sin-cos table, CLS slot zero,
  exported as timm's learnable parameter; timm's final LayerNorm is exported at its initial (1, 0) values
  (pretraining has no final norm), so ``timm.create_model(name, pretrained=True,
  pretrained_cfg_overlay=dict(file=...))`` matches every key; pass ``final_norm=False`` for the raw trunk.
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
import re
from pathlib import Path
from typing import Dict, Optional

import torch

from ..config import ConfigError

# ------------------------------------------------------------------------------------------- reading


def _is_ds_dir(p: Path) -> bool:
    return p.is_dir() and (any(p.glob("*model_states.pt")) or (p / "checkpoints").is_dir() or (p / "latest").is_file())


def load_deepspeed(path, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """fp32 state dict of the whole student from a DeepSpeed checkpoint (ZeRO 0-3, any world size)."""
    from . import ds_checkpoint as dc

    p = Path(path)
    if (p / "checkpoints").is_dir():  # a run directory
        ckdir = p / "checkpoints"
        tag = tag or dc.latest_tag(p)
    elif any(p.glob("*model_states.pt")):  # one tag's folder
        ckdir, tag = p.parent, p.name
    else:  # a checkpoints folder
        ckdir = p
        tag = tag or dc.latest_tag(p.parent)
    if not tag or not (ckdir / tag).is_dir():
        raise ConfigError(f"no complete checkpoint found in {path}")
    tagdir = ckdir / tag
    from . import safe_load

    safe_load.check_folder(tagdir)  # a run directory may come from anyone: nothing in it may run
    if any(tagdir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_load.deepspeed_loads():  # zero_to_fp32 asks for weights_only=False; it gets True
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckdir), tag=tag)
    else:  # ZeRO-0: the full module is in the model states file
        states = safe_load.load(next(tagdir.glob("*model_states.pt")))
        sd = states.get("module") if isinstance(states, dict) else None
        if not isinstance(sd, dict):
            raise ConfigError(f"{next(tagdir.glob('*model_states.pt'))}: not a DeepSpeed model states file")
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


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


def timm_export(sd: Dict[str, torch.Tensor], num_heads: int, out_dir, final_norm: bool = True) -> Path:
    """Write ``model.safetensors`` + ``config.json``; returns the folder."""
    from safetensors.torch import save_file

    enc = encoder_state(sd)
    g = encoder_geometry(enc)
    if g["embed_dim"] % num_heads:
        raise ConfigError(f"width {g['embed_dim']} is not divisible by --num-heads {num_heads}")
    state = {k: v.contiguous() for k, v in enc.items()}
    if final_norm:
        state["norm.weight"] = torch.ones(g["embed_dim"])
        state["norm.bias"] = torch.zeros(g["embed_dim"])
    name = timm_architecture(g["embed_dim"], g["patch_size"], g["img_size"])
    model_args = {"img_size": g["img_size"], "patch_size": g["patch_size"], "embed_dim": g["embed_dim"],
                  "depth": g["depth"], "num_heads": num_heads, "mlp_ratio": g["mlp_ratio"], "qkv_bias": True,
                  "class_token": True, "global_pool": "token", "final_norm": final_norm, "num_classes": 0}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    cfg = {"architecture": name, "num_classes": 0, "num_features": g["embed_dim"], "model_args": model_args,
           "pretrained_cfg": {"input_size": [3, g["img_size"], g["img_size"]], "interpolation": "bicubic",
                              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875,
                              "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head",
                              "license": "see the training data's terms", "tag": "megadigpt"}}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def timm_architecture(embed_dim: int, patch_size: int, img_size: int) -> str:
    """timm's entry-point name for an export's config.json: the standard one where timm has it, else any plain ViT
    entry point (the exported model_args set every size)."""
    import timm

    size = {768: "vit_base", 192: "vit_tiny", 384: "vit_small", 1024: "vit_large", 1280: "vit_huge",
            1408: "vit_giant", 1664: "vit_gigantic"}.get(embed_dim, "vit_base")
    name = f"{size}_patch{patch_size}_{img_size}"
    return name if timm.is_model(name) else "vit_base_patch16_224"


def load_timm(folder, **kwargs):
    """``timm.create_model`` on an export folder, with every key matched (strict)."""
    import timm

    folder = Path(folder)
    cfg = _read_json(folder / "config.json")
    args = {**cfg["model_args"], **kwargs}
    return timm.create_model(cfg["architecture"], pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"),
                                                         **{k: v for k, v in cfg["pretrained_cfg"].items()
                                                            if k in ("mean", "std", "input_size", "crop_pct")}),
                             **args)


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
    save_file(state, str(path))


def default_heads(embed_dim: int) -> Optional[int]:
    from ..model.vit import VIT_SIZES

    return next((s.num_heads for s in VIT_SIZES.values() if s.embed_dim == embed_dim), None)


def convert(src, to: str, out, tag: Optional[str] = None, num_heads: Optional[int] = None,
            segment_grid: int = 2, final_norm: bool = True):
    sd = load_any(src, tag)
    if to == "timm":
        embed = encoder_geometry(encoder_state(sd))["embed_dim"]
        heads = num_heads or _heads_from_run(src) or default_heads(embed)
        if heads is None:
            raise ConfigError(f"width {embed} is not a standard ViT size: give --num-heads")
        return timm_export(sd, heads, out, final_norm=final_norm)
    if to == "reference":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(to_reference(sd, segment_grid), out)
        return Path(out)
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

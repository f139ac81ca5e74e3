"""Settings every training loop resolves the same way: the device (``train.device``), the precision ``auto``
stands for, the input loader (``data.loader``), the torch dtype of a precision name and the uint8 -> normalised
input transform. Shared by pretraining, fine-tuning, probing, segmentation, evaluation, the tokenizer fit and the
benchmark; below all of them."""

from typing import Optional

from ..config import ConfigError


def resolve_device_type(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible")
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {requested!r}")
    return requested


def auto_precision(device_type: str, bf16_supported: Optional[bool] = None) -> str:
    """What ``auto`` means: bf16 on GPUs with bf16 tensor cores (Ampere and newer), fp16 on older ones (V100, T4:
    no bf16 units, where bf16 would be emulated), fp32 on CPU. Planning for compute nodes from a machine without a
    GPU (``megadigpt submit``) assumes bf16."""
    if device_type != "cuda":
        return "fp32"
    if bf16_supported is None:
        import torch

        bf16_supported = not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16" if bf16_supported else "fp16"


def resolve_loader(name: str) -> str:
    from ..data.dali_loader import dali_available

    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise ConfigError("data.loader=dali but NVIDIA DALI is not installed (pip install 'megadigpt[dali]')")
    if name not in ("dali", "torch"):
        raise ConfigError(f"data.loader must be auto, dali or torch, got {name!r}")
    return name


def torch_dtype(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def normalizer(mean, std, dtype, device):
    """uint8 (B, 3, H, W) -> normalised ``dtype``; the constants live on the device once, not per step."""
    import torch

    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return lambda x_uint8: ((x_uint8.float() / 255.0 - m) / s).to(dtype)

"""MFU's two halves: FLOPs counted with attention in them (an OpenCLIP teacher's ``nn.MultiheadAttention`` fast path
hides it on real tensors) and the per-GPU peak looked up from the device name."""

import pytest
import torch

from megadigpt.train.metrics import count_flops, gpu_peak, teacher_flops


@pytest.mark.parametrize("name,peak,dtype", [
    ("NVIDIA H100 80GB HBM3", 989.0, "bf16"),  # SXM
    ("NVIDIA H100 PCIe", 756.0, "bf16"),
    ("NVIDIA H100 NVL", 835.0, "bf16"),
    ("NVIDIA H200", 989.0, "bf16"),
    ("NVIDIA H200 NVL", 835.0, "bf16"),
    ("NVIDIA A100-SXM4-80GB", 312.0, "bf16"),
    ("NVIDIA A100-PCIE-40GB", 312.0, "bf16"),
    ("NVIDIA A10", 125.0, "bf16"),  # not A100's figure, and A100 not A10's
    ("Tesla V100-SXM2-32GB", 125.0, "fp16"),  # Volta has no bf16: its 16-bit peak is fp16
    ("Tesla V100-PCIE-16GB", 112.0, "fp16"),
    ("Tesla T4", 65.0, "fp16"),
])
def test_gpu_peak_by_device_name(name, peak, dtype):
    tflops, _, d = gpu_peak(name)
    assert (tflops, d) == (peak, dtype)


def test_unknown_gpu_has_no_peak():
    assert gpu_peak("NVIDIA GeForce RTX 4090") is None


def test_openclip_teacher_flops_include_attention():
    """A random-weight OpenCLIP ViT-S/16 at 64 px: the counted forward equals the analytic count of its matmuls,
    attention included; the same tower counted on real CPU tensors in eval/no_grad (the MHA fast path) misses it."""
    import open_clip

    from megadigpt.config import load_config
    from megadigpt.targets import build_target

    cfg = load_config(None, ["target.kind=open_clip", "target.model=ViT-S-16", "target.weights=null",
                             "target.random_weights=true", "model.img_size=64"])
    v = open_clip.get_model_config("ViT-S-16")["vision_cfg"]
    w, depth, p = v["width"], v["layers"], v["patch_size"]
    mlp = int(w * v.get("mlp_ratio", 4.0))
    emb = open_clip.get_model_config("ViT-S-16")["embed_dim"]
    n = (64 // p) ** 2
    L = n + 1  # + CLS
    block = 2 * L * w * 3 * w + 2 * L * w * w + 2 * 2 * L * w * mlp + 2 * 2 * L * L * w  # qkv, out, MLP, QK^T + AV
    analytic = 2 * n * 3 * p * p * w + depth * block + 2 * L * w * emb  # patch embedding, blocks, projection
    assert teacher_flops(cfg) == analytic
    teacher = build_target(cfg.target, cfg.model)
    real = count_flops(teacher, torch.zeros(1, 3, 64, 64))
    assert real < analytic - depth * 2 * 2 * L * L * w  # what counting on the device used to report


def test_pixel_target_has_no_teacher_flops():
    from megadigpt.config import load_config

    assert teacher_flops(load_config(None, ["target.kind=pixels", "model.img_size=64"])) == 0.0

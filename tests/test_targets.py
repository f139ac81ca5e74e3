import pytest
import torch

from megadigpt.config import ConfigError, ModelConfig, TargetConfig
from megadigpt.targets import build_target, describe_target


def test_pixel_target_is_normalised_patches():
    t = build_target(TargetConfig(kind="pixels", patch_size=4), ModelConfig(img_size=16, patch_size=4))
    x = torch.randn(2, 3, 16, 16)
    tokens, cls = t(x)
    assert cls is None and tokens.shape == (2, 16, 48)
    patch = x[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)  # patch (row 1, col 2) -> token 6
    expect = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
    torch.testing.assert_close(tokens[0, 6], expect)


@pytest.mark.parametrize("layer,grid,dim", [("stride16", 8, 112), ("stride32", 4, 1280)])
def test_efficientnet_teacher(layer, grid, dim):
    tcfg = TargetConfig(kind="efficientnet_lite0", layer=layer, image_size=128)
    spec = describe_target(tcfg, ModelConfig())
    assert (spec.grid, spec.dim, spec.has_cls) == (grid, dim, True)
    t = build_target(tcfg, ModelConfig())
    t.train()  # a teacher stays in eval mode (BatchNorm statistics frozen)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    x = torch.randn(2, 3, 128, 128)
    tokens, cls = t(x)
    assert tokens.shape == (2, grid * grid, dim)
    torch.testing.assert_close(cls, tokens.mean(dim=1))
    tokens2, _ = t(x)
    assert torch.equal(tokens, tokens2)


def test_open_clip_tokens_after_ln_post_and_proj(tmp_path):
    import open_clip

    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-S-16", pretrained=None, force_image_size=64).eval()
    weights = tmp_path / "clip.pt"
    torch.save(ref.state_dict(), weights)
    tcfg = TargetConfig(kind="open_clip", model="ViT-S-16", weights=str(weights), image_size=64)
    spec = describe_target(tcfg, ModelConfig())
    assert (spec.grid, spec.has_cls) == (4, True)
    t = build_target(tcfg, ModelConfig())
    x = torch.randn(2, 3, 64, 64)
    tokens, cls = t(x)
    assert tokens.shape == (2, 16, spec.dim)
    with torch.no_grad():
        torch.testing.assert_close(cls, ref.visual(x), rtol=1e-5, atol=1e-5)  # the CLIP image embedding


def test_timm_teacher_from_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64).eval()
    path = tmp_path / "teacher.safetensors"
    save_file(ref.state_dict(), str(path))
    tcfg = TargetConfig(kind="timm", model="vit_tiny_patch16_224", weights=str(path), image_size=64)
    spec = describe_target(tcfg, ModelConfig())
    assert (spec.grid, spec.dim, spec.has_cls) == (4, 192, True)
    t = build_target(tcfg, ModelConfig())
    x = torch.randn(2, 3, 64, 64)
    tokens, cls = t(x)
    with torch.no_grad():
        feats = ref.forward_features(x)
    torch.testing.assert_close(tokens, feats[:, 1:])
    torch.testing.assert_close(cls, feats[:, 0])


def test_target_errors():
    with pytest.raises(ConfigError, match="unknown target.kind"):
        describe_target(TargetConfig(kind="clip"), ModelConfig())
    with pytest.raises(ConfigError, match="unknown timm model"):
        describe_target(TargetConfig(kind="timm", model="no_such_vit"), ModelConfig())
    with pytest.raises(ConfigError, match="not a plain ViT"):
        describe_target(TargetConfig(kind="open_clip", model="ViT-B-16-SigLIP"), ModelConfig())
    with pytest.raises(ConfigError, match="divisible by 16"):
        describe_target(TargetConfig(kind="efficientnet_lite0", image_size=100), ModelConfig())

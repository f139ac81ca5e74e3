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


def _whole_model_teacher(name, weights, size):
    """The teacher as it was built before issue 27: the whole CLIP model (text tower too) in fp32 on the CPU."""
    import open_clip

    v = open_clip.create_model(name, pretrained=weights, force_image_size=size).visual.eval()

    def forward(x):
        with torch.no_grad():
            out = v.ln_post(v.transformer(v._embeds(x))) @ v.proj
        return out[:, 1:], out[:, 0]

    return forward


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_open_clip_image_tower_alone_equals_the_whole_model(tmp_path, fmt):
    """Only the image tower is built (on meta, then the file's visual.* tensors assigned): its tokens and CLS equal
    the whole-model build's bit for bit, weights saved at 224 px and resized to the target's 64 px grid as open_clip
    resizes them; the text tower is neither built nor needed in the file."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = open_clip.create_model("ViT-S-16", pretrained=None).state_dict()  # at its own 224 px
    path = tmp_path / f"clip.{fmt}"
    torch.save(sd, path) if fmt == "pt" else save_file(sd, str(path))
    tcfg = TargetConfig(kind="open_clip", model="ViT-S-16", weights=str(path), image_size=64)
    t = build_target(tcfg, ModelConfig())
    assert all(k.startswith("visual.") for k in t.state_dict())  # no text tower
    old = _whole_model_teacher("ViT-S-16", str(path), 64)
    x = torch.randn(2, 3, 64, 64)
    tokens, cls = t(x)
    ref_tokens, ref_cls = old(x)
    assert torch.equal(tokens, ref_tokens) and torch.equal(cls, ref_cls)
    # a file with the image tower alone loads too; one without it is a one-line error
    visual_only = tmp_path / "visual.pt"
    torch.save({k: v for k, v in sd.items() if k.startswith("visual.")}, visual_only)
    t2 = build_target(TargetConfig(kind="open_clip", model="ViT-S-16", weights=str(visual_only), image_size=64),
                      ModelConfig())
    assert torch.equal(t2(x)[0], tokens)
    text_only = tmp_path / "text.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("visual.")}, text_only)
    with pytest.raises(ConfigError, match="could not be loaded into open_clip ViT-S-16: the file holds no image-tower"):
        build_target(TargetConfig(kind="open_clip", model="ViT-S-16", weights=str(text_only), image_size=64),
                     ModelConfig())


def test_open_clip_random_teacher_is_built_in_its_dtype():
    """A random teacher (benchmarks, tests) is built directly in the teacher's dtype; in fp32 its weights equal the
    whole model's image tower for the same seed (open_clip builds the image tower first)."""
    import open_clip

    tcfg = TargetConfig(kind="open_clip", model="ViT-S-16", random_weights=True, image_size=64)
    torch.manual_seed(3)
    ref = open_clip.create_model("ViT-S-16", pretrained=None, force_image_size=64).visual.state_dict()
    torch.manual_seed(3)
    t = build_target(tcfg, ModelConfig())
    got = {k[len("visual."):]: v for k, v in t.state_dict().items()}
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    t16 = build_target(tcfg, ModelConfig(), dtype=torch.bfloat16)
    assert {p.dtype for p in t16.parameters()} == {torch.bfloat16}
    tokens, cls = t16(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert tokens.shape == (1, 16, t16.spec.dim) and tokens.dtype == torch.bfloat16 and torch.isfinite(cls).all()


def test_plan_counts_the_teacher_build_on_the_host(tmp_path):
    """``megadigpt plan``'s teacher build host column: the image tower's bytes in the weights file (its header or
    mapped sizes: nothing read), fp32 by default for a tag or a file not here, none for a random teacher (built on
    the device); never the text tower."""
    from dataclasses import replace

    import open_clip
    from safetensors.torch import save_file

    from megadigpt.perf.memory import teacher_host_bytes

    sd = open_clip.create_model("ViT-S-16", pretrained=None).half().state_dict()
    visual = sum(v.nbytes for k, v in sd.items() if k.startswith("visual."))
    pt, st = tmp_path / "clip.pt", tmp_path / "clip.safetensors"
    torch.save(sd, pt)
    save_file(sd, str(st))
    tcfg = TargetConfig(kind="open_clip", model="ViT-S-16", weights=str(pt), image_size=64)
    P = 1000
    assert teacher_host_bytes(tcfg, P) == teacher_host_bytes(replace(tcfg, weights=str(st)), P) == visual
    assert teacher_host_bytes(replace(tcfg, weights="laion2b_s34b_b88k"), P) == 4 * P
    assert teacher_host_bytes(replace(tcfg, weights=None, random_weights=True), P) == 0
    assert teacher_host_bytes(TargetConfig(kind="pixels"), P) == 0

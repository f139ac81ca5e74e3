import pytest
import torch
import torch.nn.functional as F

from megadigpt.config import ModelConfig
from megadigpt.model import VIT_SIZES, build_model, default_taps
from megadigpt.model.digpt import DiGPT
from megadigpt.model.vit import ViTEncoder


def tiny(img=32, patch=4, segment_grid=2, teacher_dim=24, teacher_grid=8, attention="sdpa", depth=4):
    torch.manual_seed(0)
    enc = ViTEncoder(img, patch, 32, depth, 2, attention=attention)
    return DiGPT(enc, segment_grid, teacher_dim, teacher_grid, decoder_dim=32, decoder_depth=2, decoder_heads=4,
                 attention=attention).eval()


def test_default_taps_follow_depth():
    assert default_taps(12) == [6, 8, 10, 12]
    assert default_taps(24) == [12, 16, 20, 24]
    for depth in (6, 32, 40, 48, 56):
        taps = default_taps(depth)
        assert taps[-1] == depth and taps[0] == depth // 2 and taps == sorted(taps)


@pytest.mark.parametrize("arch", list(VIT_SIZES))
@pytest.mark.parametrize("patch", [14, 16])
def test_every_size_builds_and_runs_on_meta(arch, patch):
    """ViT-Ti ... ViT-e with patch 14 and 16: shapes follow from the config (meta device: no memory, no compute)."""
    cfg = ModelConfig(arch=arch, patch_size=patch, img_size=224)
    teacher_grid, teacher_dim = 16, 1024  # OpenCLIP ViT-H/14 at 224
    with torch.device("meta"):
        model = build_model(cfg, teacher_dim, teacher_grid)
        x = torch.zeros(2, 3, 224, 224)
        order = torch.stack([torch.arange(4), torch.arange(4)])
        gen, dis = model.predict(x, order)
        g_loss, d_loss = model(x, torch.zeros(2, 256, teacher_dim), torch.zeros(2, teacher_dim), order)
    grid = 224 // patch
    L = 3 * (grid // 2) ** 2 + 1
    assert gen.shape == dis.shape == (2, L, teacher_dim)
    assert g_loss.shape == d_loss.shape == (2,)
    size = VIT_SIZES[arch]
    assert model.encoder.pos_embed.shape == (1, grid * grid + 1, size.embed_dim)
    assert model.taps == default_taps(size.depth)
    assert model.gen_taps.proj.in_features == 4 * size.embed_dim


def test_timm_parameter_names():
    model = tiny()
    names = set(model.encoder.state_dict())
    for n in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.norm2.weight",
              "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"):
        assert n in names
    assert model.encoder.blocks[0].norm1.eps == 1e-6 and model.gen_taps.norm.eps == 1e-5
    assert torch.count_nonzero(model.encoder.cls_token) == 0 and not model.encoder.pos_embed.requires_grad


def _segment_slice(model, images, order, k, value):
    """Overwrite the pixels of segment id ``order[0, k]`` of sample 0."""
    lay, p = model.layout, model.encoder.patch_embed.patch_size
    s = int(order[0, k])
    r, c = divmod(s, lay.segment_grid)
    side = lay.segment_side * p
    out = images.clone()
    out[0, :, r * side:(r + 1) * side, c * side:(c + 1) * side] = value
    return out


@pytest.mark.parametrize("segment_grid", [2, 4])
def test_causality_by_perturbation(segment_grid):
    model = tiny(img=32, patch=4, segment_grid=segment_grid, teacher_grid=8)
    lay = model.layout
    T, S = lay.tokens_per_segment, lay.num_segments
    torch.manual_seed(1)
    images = torch.randn(1, 3, 32, 32)
    order = torch.randperm(S)[None]
    with torch.no_grad():
        taps0 = model.encode(images, order)
        gen0, dis0 = model.predict(images, order)
        for k in range(S):
            pert = _segment_slice(model, images, order, k, 3.0)
            taps1 = model.encode(pert, order)
            gen1, dis1 = model.predict(pert, order)
            if k == S - 1:  # the held-out segment changes nothing at all
                for a, b in zip(taps0, taps1):
                    assert torch.equal(a, b)
                assert torch.equal(gen0, gen1) and torch.equal(dis0, dis1)
                continue
            before = slice(0, k * T)
            for a, b in zip(taps0, taps1):
                assert torch.equal(a[:, before], b[:, before])  # earlier segments never see segment k
                assert not torch.allclose(a[:, k * T:], b[:, k * T:])  # segment k and later do, CLS too
            # Gen row-block j predicts segment j+1 from segments 0..j; Dis row-block j predicts segment j
            assert torch.equal(gen0[:, before], gen1[:, before])
            assert torch.equal(dis0[:, before], dis1[:, before])
            assert not torch.allclose(gen0[:, k * T:(k + 1) * T], gen1[:, k * T:(k + 1) * T])
            assert not torch.allclose(gen0[:, -1], gen1[:, -1])  # CLS sees everything visible


def direct_loss(pred, teacher_tokens, teacher_cls, order, lay_s, teacher_grid, shift):
    """Spec §5-6 written out per sample and segment: upsample each predicted segment bilinearly to the teacher's
    per-segment grid, compare with the teacher tokens of the segment it predicts, add CLS, average."""
    B, _, D = pred.shape
    g, s = lay_s.segment_grid, lay_s.segment_side
    st = teacher_grid // g
    out = []
    for b in range(B):
        grid_t = teacher_tokens[b].reshape(teacher_grid, teacher_grid, D)
        per_token = []
        for k in range(lay_s.num_visible):
            seg_id = int(order[b, k + shift])
            r, c = divmod(seg_id, g)
            target = grid_t[r * st:(r + 1) * st, c * st:(c + 1) * st].reshape(-1, D)
            p = pred[b, k * s * s:(k + 1) * s * s].reshape(s, s, D).permute(2, 0, 1)[None]
            if s != st:
                p = F.interpolate(p, size=(st, st), mode="bilinear", align_corners=False)
            p = p[0].permute(1, 2, 0).reshape(-1, D)
            per_token.append(2 - 2 * F.cosine_similarity(p, target, dim=-1))
        per_token.append((2 - 2 * F.cosine_similarity(pred[b, -1], teacher_cls[b], dim=-1))[None])
        out.append(torch.cat(per_token).mean())
    return torch.stack(out)


@pytest.mark.parametrize("patch,student_side", [(16, 7), (14, 8)])
def test_loss_equals_direct_computation(patch, student_side):
    """ViT-B/16 at 224 (7x7 per segment, upsampled to the teacher's 8x8) and ViT-L/14 (8x8 = 8x8)."""
    torch.manual_seed(0)
    enc = ViTEncoder(224, patch, 32, 2, 2)
    model = DiGPT(enc, 2, 40, 16, taps=[1, 2, 2, 2], decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()
    assert model.layout.segment_side == student_side
    images, tokens, cls = torch.randn(3, 3, 224, 224), torch.randn(3, 256, 40), torch.randn(3, 40)
    order = torch.stack([torch.randperm(4) for _ in range(3)])
    with torch.no_grad():
        gen, dis = model.predict(images, order)
        g_loss, d_loss = model(images, tokens, cls, order)
    torch.testing.assert_close(g_loss, direct_loss(gen, tokens, cls, order, model.layout, 16, shift=1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_loss, direct_loss(dis, tokens, cls, order, model.layout, 16, shift=0),
                               rtol=1e-5, atol=1e-6)


def test_loss_without_teacher_cls_and_downsampling():
    model = tiny(img=32, patch=4, teacher_grid=4)  # student 4x4 per segment -> teacher 2x2
    images, tokens = torch.randn(2, 3, 32, 32), torch.randn(2, 16, 24)
    g, d = model(images, tokens, None)
    assert g.shape == (2,) and torch.all((g >= 0) & (g <= 4))


def test_attention_backends_agree():
    from megadigpt.distributed.parallelize import set_attention_backend

    models = {b: set_attention_backend(tiny(), b) for b in ("sdpa", "eager", "flex", "prefix")}
    assert models["flex"].encoder.blocks[0].attn.backend == "flex"
    assert models["eager"].gen_decoder.blocks[0].cross_attn.backend == "eager"
    images = torch.randn(2, 3, 32, 32)
    order = torch.stack([torch.randperm(4) for _ in range(2)])
    with torch.no_grad():
        outs = {b: m.predict(images, order) for b, m in models.items()}
    for b in ("eager", "flex", "prefix"):
        torch.testing.assert_close(outs[b][0], outs["sdpa"][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(outs[b][1], outs["sdpa"][1], rtol=1e-4, atol=1e-5)
    # gradients: sdpa, prefix and eager all train on CPU and agree
    tokens, cls = torch.randn(2, 64, 24), torch.randn(2, 24)
    grads = {}
    for b in ("sdpa", "eager", "prefix"):
        m = models[b].train()
        m.zero_grad()
        g, d = m(images, tokens, cls, order)
        (g.mean() + d.mean()).backward()
        grads[b] = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["eager"], grads["sdpa"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads["prefix"], grads["eager"], rtol=1e-4, atol=1e-6)


def test_flex_refuses_to_train_on_cpu():
    m = tiny(attention="flex").train()
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        m(torch.randn(1, 3, 32, 32), torch.randn(1, 64, 24), None)


def test_teacher_grid_must_map_onto_segments():
    enc = ViTEncoder(32, 4, 32, 2, 2)
    with pytest.raises(ValueError, match="teacher"):
        DiGPT(enc, 2, 24, 5)


def test_random_order_is_per_sample_permutation():
    model = tiny()
    order = model.random_order(64)
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(64, 4))
    assert len({tuple(o.tolist()) for o in order}) > 1


def test_objective_ablations():
    """dis_only: no Gen loss, no Gen parameters; distill: no decoders, full attention (every patch matters)."""
    from megadigpt.config import load_config

    x = torch.randn(2, 3, 32, 32)
    tokens, cls = torch.randn(2, 64, 48), torch.randn(2, 48)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    out = {}
    for obj in ("digpt", "dis_only", "distill"):
        cfg = load_config(None, ["model.arch=vit_tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                                 "model.img_size=32", "model.patch_size=4", "model.decoder_dim=16",
                                 "model.decoder_depth=1", "model.decoder_heads=2", f"model.objective={obj}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, 48, 8)
        names = {n.split(".")[0] for n, _ in model.named_parameters()}
        gen, dis = model(x, tokens, cls, order)
        (gen + dis).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        out[obj] = (names, gen, dis, model)
        if obj != "digpt":
            assert torch.equal(gen, torch.zeros(2))
        if obj in ("digpt", "dis_only"):  # the held-out last segment (top-left quadrant for sample 1) is unseen
            x2 = x.clone()
            x2[0, :, 16:, 16:] += 1.0
            assert torch.allclose(model(x2, tokens, cls, order)[1][0], dis[0])
        else:
            x2 = x.clone()
            x2[0, :, 16:, 16:] += 1.0  # distillation sees the whole image
            assert not torch.allclose(model(x2, tokens, cls, order)[1][0], dis[0])
    assert "gen_decoder" not in out["dis_only"][0] and "dis_decoder" in out["dis_only"][0]
    assert {"gen_decoder", "dis_decoder", "gen_taps", "dis_taps"}.isdisjoint(out["distill"][0])
    digpt, dis_only = out["digpt"][3], out["dis_only"][3]
    missing, unexpected = dis_only.load_state_dict(digpt.state_dict(), strict=False)
    assert not missing and all(k.startswith("gen_") for k in unexpected)
    assert torch.allclose(dis_only(x, tokens, cls, order)[1], out["digpt"][2], atol=1e-6)  # the same Dis path

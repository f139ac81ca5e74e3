"""Discrete targets: k-means, nearest-centroid assignment, the cross-entropy heads, tokenizer files and their
provenance check, and pretraining against codebook indices on real DeepSpeed engines (2 ranks, ZeRO-3)."""

import dataclasses
import json
import math

import pytest
import torch

from megadigpt.config import ConfigError, ModelConfig, TargetConfig, load_config
from megadigpt.model import VIT_SIZES, build_model
from megadigpt.targets import build_target, describe_target
from megadigpt.tokenizer import Codebook, assign, kmeans, load_codebook

from .conftest import TINY, losses, run_cli


# ============================================================================ k-means and assignment


def test_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 8, generator=g) * 10
    labels = torch.arange(6).repeat_interleave(300)
    x = centers[labels] + 0.5 * torch.randn(len(labels), 8, generator=g)
    found, info = kmeans(x, 6, iters=50, seed=3)
    # every planted centre has exactly one found centroid next to it
    d = torch.cdist(centers, found)
    match = d.argmin(dim=1)
    assert sorted(match.tolist()) == list(range(6))
    assert d.min(dim=1).values.max() < 0.15, d.min(dim=1).values
    # and the partition is the planted one
    assert torch.equal(match[labels], assign(x, found))
    assert info["sizes"].tolist() == [300] * 6
    assert info["inertia"] == pytest.approx(0.25 * 8, rel=0.1)  # the noise variance per point: 8 dims x 0.5^2
    assert info["history"] == sorted(info["history"], reverse=True)  # Lloyd never increases the objective


def test_kmeans_reseeds_empty_clusters_and_refuses_too_few_points():
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2) * 5])  # 2 distinct points, k = 3: one cluster stays empty
    c, info = kmeans(x, 3, iters=5, seed=0)
    assert torch.isfinite(c).all() and info["sizes"].sum() == 100
    with pytest.raises(ValueError, match="at least k points"):
        kmeans(torch.randn(3, 2), 4)


def test_assign_equals_brute_force_nearest_centroid():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(3000, 16, generator=g), torch.randn(257, 16, generator=g)
    brute = torch.cdist(x.double(), c.double()).argmin(dim=1)
    assert torch.equal(assign(x, c, chunk=97), brute)  # chunked, ragged last chunk
    assert torch.equal(assign(x.bfloat16(), c), torch.cdist(x.bfloat16().double(), c.double()).argmin(dim=1))


def test_tokenized_target_assigns_every_token_in_fp32(tmp_path):
    """The discrete target = the feature target + nearest centroid per token; casting the teacher to bf16 leaves
    the centroids in fp32."""
    tcfg = TargetConfig(kind="pixels", layer="rgb", patch_size=1, image_size=8)
    mcfg = ModelConfig(img_size=8, patch_size=2)
    spec = describe_target(tcfg, mcfg)
    from megadigpt.tokenizer.codebook import target_identity

    cents = torch.randn(12, 3, generator=torch.Generator().manual_seed(2))
    Codebook(cents, torch.zeros(12), {"target": target_identity(tcfg, spec)}).save(tmp_path / "tok.pt")
    tok = build_target(dataclasses.replace(tcfg, tokenizer=str(tmp_path / "tok.pt")), mcfg)
    assert tok.spec.classes == 12 and not tok.spec.has_cls
    images = torch.randn(2, 3, 8, 8)
    ids, cls = tok(images)
    pixels = images.permute(0, 2, 3, 1).reshape(2, 64, 3)  # rgb layer, patch 1: every pixel's colour, row-major
    assert cls is None and ids.shape == (2, 64) and ids.dtype == torch.int64
    assert torch.equal(ids, torch.cdist(pixels.double(), cents.double()).argmin(dim=-1))
    tok = tok.to(torch.bfloat16)
    assert tok.centroids.dtype == torch.float32


# ============================================================================ the cross-entropy heads


def _tiny(teacher_grid, classes, objective="digpt", img=16, patch=2):
    from megadigpt.model import DiGPT, ViTEncoder

    torch.manual_seed(0)
    enc = ViTEncoder(img, patch, 32, 2, 4, 2.0)
    return DiGPT(enc, 2, 3, teacher_grid, decoder_dim=32, decoder_depth=1, decoder_heads=4,
                 objective=objective, num_classes=classes).eval()


def _direct_ce(pred, ids, order, model, shift):
    """Mean cross-entropy written out token by token: row-block j of a head predicts segment order[j + shift];
    its student token (i, jj) predicts teacher tokens (i*r + a, jj*r + b) with logits slice (a*r + b)*K."""
    B, K = pred.shape[0], model.classes
    g, s = model.layout.segment_grid, model.layout.segment_side
    st, Gt = model.teacher_layout.segment_side, model.teacher_grid
    r = st // s
    out = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        terms = []
        for j in range(model.layout.num_visible):
            sr, sc = divmod(int(order[b, j + shift]), g)
            for i in range(s):
                for jj in range(s):
                    row = pred[b, j * s * s + i * s + jj].double()
                    for a in range(r):
                        for bb in range(r):
                            logits = row[(a * r + bb) * K:(a * r + bb + 1) * K]
                            tgt = ids[b, (sr * st + i * r + a) * Gt + sc * st + jj * r + bb]
                            terms.append(torch.logsumexp(logits, 0) - logits[tgt])
        out[b] = torch.stack(terms).mean()
    return out


@pytest.mark.parametrize("teacher_grid", [8, 16])  # student grid 8: r = 1 (DiGIT-like) and r = 2 (a palette)
def test_ce_head_loss_equals_direct_computation(teacher_grid):
    K = 5
    model = _tiny(teacher_grid, K)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 16, 16, generator=g)
    ids = torch.randint(K, (2, teacher_grid ** 2), generator=g)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(2)])
    with torch.no_grad():
        gen_loss, dis_loss = model(images, ids, None, order)
        gen, dis = model.predict(images, order)
    assert model.gen_decoder.head.out_features == K * (teacher_grid // 8) ** 2
    torch.testing.assert_close(gen_loss.double(), _direct_ce(gen, ids, order, model, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dis_loss.double(), _direct_ce(dis, ids, order, model, 0), rtol=1e-5, atol=1e-6)


def test_distill_ce_head_and_untrained_loss_is_log_k():
    K = 7
    model = _tiny(16, K, objective="distill")
    images, ids = torch.randn(3, 3, 16, 16), torch.randint(K, (3, 256))
    with torch.no_grad():
        _, loss = model(images, ids, None)
        x = model.distill_head(model.distill_norm(model.encoder.forward_features(images)))[:, 1:]  # (B, 64, 4K)
    # student token (i, j) -> teacher tokens (2i + a, 2j + b), logits slice (2a + b) * K
    logits = x.reshape(3, 8, 8, 2, 2, K).permute(0, 1, 3, 2, 4, 5).reshape(3, 256, K)
    direct = torch.nn.functional.cross_entropy(logits.reshape(-1, K), ids.reshape(-1), reduction="none")
    torch.testing.assert_close(loss, direct.view(3, 256).mean(1))
    assert abs(float(loss.mean()) - math.log(K)) < 0.5  # xavier-initialised heads start near uniform


@pytest.mark.parametrize("arch,patch", [("vit_tiny", 16), ("vit_base", 14), ("vit_large", 14), ("vit_e", 14)])
def test_discrete_heads_for_every_size_on_meta(arch, patch):
    """Shapes follow from the config for every size: DiGIT-style 16k ids on the teacher's own grid."""
    cfg = ModelConfig(arch=arch, patch_size=patch)
    grid = 224 // patch
    with torch.device("meta"):
        model = build_model(cfg, 1024, grid, num_classes=16384)
        order = torch.arange(4)[None].repeat(2, 1)
        gen, dis = model(torch.empty(2, 3, 224, 224), torch.zeros(2, grid * grid, dtype=torch.long), None, order)
    assert gen.shape == dis.shape == (2,)
    assert model.gen_decoder.head.out_features == 16384 and model.encoder.embed_dim == VIT_SIZES[arch].embed_dim


# ============================================================================ tokenizer files


def test_fit_roundtrip_provenance_and_mismatch_refused(cifar_small, tmp_path):
    """A real fit on real images (pixels -> palette and EfficientNet tokens), read back, then refused for any other
    teacher, layer or resolution."""
    from megadigpt.tokenizer.fit import fit_tokenizer

    train = str(cifar_small / "train.jsonl")
    base = ["model.img_size=32", "model.patch_size=4", "data.num_workers=0", f"data.source={train}"]
    pal = load_config("demo", base + ["target.kind=pixels", "target.layer=rgb", "target.patch_size=1",
                                      "target.image_size=32"])
    res = fit_tokenizer(pal, k=16, images=24, tokens_per_image=40, iters=8, seed=5, out=str(tmp_path / "pal.pt"),
                        progress=False, batch=8)
    assert (res["k"], res["dim"], res["vectors"], res["images"]) == (16, 3, 24 * 40, 24)
    book = load_codebook(tmp_path / "pal.pt")
    assert book.k == 16 and book.dim == 3 and book.fingerprint() == res["fingerprint"]
    prov = book.provenance
    assert prov["target"]["kind"] == "pixels" and prov["target"]["layer"] == "rgb"
    assert prov["target"]["image_size"] == 32 and prov["target"]["patch_size"] == 1
    assert prov["data"]["source"] == train and prov["data"]["seed"] == 5
    assert prov["kmeans"]["k"] == 16 and prov["kmeans"]["device"] == "cpu"
    assert int(book.sizes.sum()) == 24 * 40
    spec = describe_target(dataclasses.replace(pal.target, tokenizer=str(tmp_path / "pal.pt")), pal.model)
    assert spec.classes == 16 and spec.grid == 32

    eff = load_config("demo", base + ["target.image_size=32", "target.layer=stride16"])
    fit_tokenizer(eff, k=8, images=16, tokens_per_image=0, iters=5, out=str(tmp_path / "eff.pt"), progress=False,
                  batch=8)
    assert load_codebook(tmp_path / "eff.pt").provenance["target"]["dim"] == 112
    for tcfg, field in [(dataclasses.replace(eff.target, layer="stride32"), "layer 'stride16'"),
                        (dataclasses.replace(eff.target, image_size=64), "image_size 32"),
                        (dataclasses.replace(eff.target, weights=str(tmp_path / "pal.pt")), "weights None"),
                        (pal.target, "kind 'efficientnet_lite0'")]:
        with pytest.raises(ConfigError, match=f"was fit on other features: .*{field}"):
            describe_target(dataclasses.replace(tcfg, tokenizer=str(tmp_path / "eff.pt")), eff.model)

    with pytest.raises(ConfigError, match="exists; pass --force"):
        fit_tokenizer(pal, k=16, images=24, out=str(tmp_path / "pal.pt"), progress=False)
    (tmp_path / "broken.pt").write_bytes((tmp_path / "pal.pt").read_bytes()[:200])
    with pytest.raises(ConfigError, match="not a readable tokenizer file"):
        load_codebook(tmp_path / "broken.pt")
    torch.save({"centroids": torch.zeros(2, 3)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a megadigpt tokenizer file"):
        load_codebook(tmp_path / "other.pt")


def test_timm_teacher_block_layer_with_final_norm():
    """DiGIT's layer: a block's output through the final norm (here block -2 of a random 3-block ViT)."""
    tcfg = TargetConfig(kind="timm", model="vit_tiny_patch16_224", layer="-2", image_size=32, random_weights=True)
    t = build_target(tcfg, ModelConfig(img_size=32))
    x = torch.randn(2, 3, 32, 32)
    tokens, cls = t(x)
    net = t.net
    h = net.norm_pre(net._pos_embed(net.patch_embed(x)))
    for blk in net.blocks[:len(net.blocks) - 1]:
        h = blk(h)
    h = net.norm(h)
    torch.testing.assert_close(tokens, h[:, 1:])
    torch.testing.assert_close(cls, h[:, 0])
    with pytest.raises(ConfigError, match="outside the teacher's 12 blocks"):
        describe_target(dataclasses.replace(tcfg, layer="13"), ModelConfig(img_size=32))
    with pytest.raises(ConfigError, match="final or a block index"):
        describe_target(dataclasses.replace(tcfg, layer="stride8"), ModelConfig(img_size=32))


# ============================================================================ pretraining on codebook indices


def test_palette_pretraining_zero_stages_and_ranks_agree_and_resume_keeps_the_tokenizer(cifar_dir, tmp_path):
    """CLI end to end: fit a 16-colour palette, pretrain on it (every pixel a class, 4x4 pixels per student token)
    with ZeRO-1 on 1 rank, ZeRO-3 and ZeRO-2 on 2 ranks (the same losses), then refuse to resume with another
    tokenizer."""
    data = str(cifar_dir / "train-000000.tar")
    palette = ["target.layer=rgb", "target.patch_size=1"]
    fit = ["tokenizer", "fit", "--config", "demo", "--data", data, "--k", "16", "--images", "64", "--iters", "10",
           *TINY, *palette]
    out = json.loads(run_cli(fit + ["--out", str(tmp_path / "tok.pt")]).stdout.strip().splitlines()[-1])
    assert out["k"] == 16 and out["empty_clusters"] == 0

    def pretrain(run, nproc, *extra):
        return run_cli(["pretrain", "--data", data, "--run-dir", str(tmp_path / run), *TINY, *palette,
                        f"target.tokenizer={tmp_path / 'tok.pt'}", "train.global_batch=8", "train.max_steps=4",
                        *extra], nproc=nproc)

    pretrain("r1", 1, "train.zero_stage=1", "train.micro_batch=8")
    pretrain("r2", 2, "train.zero_stage=3", "train.micro_batch=4")
    pretrain("r3", 2, "train.zero_stage=2", "train.micro_batch=4")
    one, two, three = losses(tmp_path / "r1"), losses(tmp_path / "r2"), losses(tmp_path / "r3")
    assert sorted(one) == sorted(two) == sorted(three) == [1, 2, 3, 4]
    for step in (1, 2, 3):
        for other in (two, three):
            for a, b in zip(one[step], other[step]):
                assert abs(a - b) < 1e-5, (step, one[step], other[step])
    assert abs(one[1][0] - math.log(16)) < 0.5  # cross-entropy over 16 colours starts near ln 16
    assert one[4][0] < one[1][0] and one[4][1] < one[1][1]  # and it learns
    marker = json.loads(next((tmp_path / "r2" / "checkpoints").glob("step_*/*.json")).read_text())
    assert marker["tokenizer"] == out["fingerprint"]

    # another tokenizer for the same target (the fit CLI ran above; here only its centroids differ)
    book = load_codebook(tmp_path / "tok.pt")
    Codebook(book.centroids.roll(1, 0), book.sizes.roll(1, 0), book.provenance).save(tmp_path / "tok2.pt")
    assert load_codebook(tmp_path / "tok2.pt").fingerprint() != out["fingerprint"]
    p = run_cli(["pretrain", "--data", data, "--run-dir", str(tmp_path / "r2"), *TINY, *palette,
                 f"target.tokenizer={tmp_path / 'tok2.pt'}", "train.global_batch=8", "train.micro_batch=8",
                 "train.max_steps=6"],
                check=False)
    assert p.returncode == 2 and "trained with tokenizer" in p.stderr, p.stderr[-2000:]


def test_planner_traces_the_logits_of_a_discrete_target(tmp_path):
    """megadigpt plan's meta-device trace includes the teacher-side assignment and the cross-entropy logits."""
    from megadigpt.perf.memory import model_sizes, trace_micro_step
    from megadigpt.tokenizer.codebook import target_identity

    cfg = load_config("demo", ["model.img_size=32", "model.patch_size=4", "target.kind=pixels", "target.layer=rgb",
                               "target.patch_size=1", "target.image_size=32", f"train.run_dir={tmp_path / 'r'}"])
    spec = describe_target(cfg.target, cfg.model)
    features = trace_micro_step(cfg, 2, precision="fp32", teacher_dtype="fp32")
    K = 256
    Codebook(torch.randn(K, 3), torch.zeros(K), {"target": target_identity(cfg.target, spec)}).save(tmp_path / "t")
    cfg.target.tokenizer = str(tmp_path / "t")
    sizes = model_sizes(cfg)
    assert sizes.student_params > 0 and sizes.teacher_fwd_flops > 0  # the assignment is the teacher's work here
    discrete = trace_micro_step(cfg, 2, precision="fp32", teacher_dtype="fp32")
    # Gen and Dis logits for 2 images x 3 segments x 16 x 16 pixels x K colours in fp32, alive until backward
    logits = 2 * 2 * 3 * 16 * 16 * K * 4
    assert discrete - features > logits, (discrete, features, logits)
    # `megadigpt plan --classes K` plans the same before the tokenizer exists
    unfit = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, tokenizer=str(tmp_path / "missing")))
    assert model_sizes(unfit, classes=K) == sizes
    assert trace_micro_step(unfit, 2, precision="fp32", teacher_dtype="fp32", classes=K) == discrete

"""megadigpt convert: DeepSpeed (ZeRO-3, 2 ranks) -> timm loads strictly with identical features; reference
layout round-trips exactly, is a valid train.init_from, and maps by role: a reference checkpoint is the reference
network (same losses as a transcription of its forward) and one tensor perturbed moves the decoder the reference
uses it for; bad inputs are refused."""

import json
import re

import pytest
import torch

from megadigpt.checkpoint.convert import (from_reference, load_any, load_reference_file, load_timm, to_reference)
from megadigpt.config import ConfigError, load_config
from megadigpt.model import build_model

from .conftest import TINY, losses, run_cli


def _args(cifar_dir, run_dir, *extra):
    return ["pretrain", "--data", str(cifar_dir / "train-000000.tar"), "--run-dir", str(run_dir), *TINY,
            "train.global_batch=8", "train.micro_batch=4", "train.max_steps=2", *extra]


@pytest.fixture(scope="module")
def runs(cifar_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("cv")
    run_cli(_args(cifar_dir, base / "z3", "train.zero_stage=3"), nproc=2)
    return base


def _model(run_dir):
    cfg = load_config(str(run_dir / "config.yaml"))
    return build_model(cfg.model, 48, 8).eval()  # pixel target: 4x4x3 = 48-d, 8x8 grid


CONSOLIDATE = """
import sys, torch, deepspeed
from megadigpt.checkpoint.convert import load_any
from megadigpt.config import load_config
from megadigpt.model import build_model
from megadigpt.train.optim import build_optimizer
out = sys.argv[1]
cfg = load_config(sys.argv[2])
deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
for stage in map(int, sys.argv[3].split(",")):  # one process pair for every stage: one import, one process group
    torch.manual_seed(0)
    model = build_model(cfg.model, 48, 8)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim, 1e-3, "cpu"),
                                      config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                                              "zero_allow_untested_optimizer": True})
    for _ in range(2):
        g, d = engine(torch.randn(2, 3, 32, 32), torch.randn(2, 64, 48), torch.randn(2, 48))
        engine.backward(g.mean() + d.mean())
        engine.step()
    engine.save_checkpoint(f"{out}/z{stage}", tag="t")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        live = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    got = load_any(f"{out}/z{stage}/t")
    if set(got) != set(live):
        print(f"stage {stage}: KEYS {sorted(set(got) ^ set(live))[:3]}", flush=True)
    else:
        bad = [k for k in live if not torch.equal(got[k], live[k].float())]
        print(f"stage {stage}: " + ("EXACT" if not bad else f"DIFFER {bad[:3]}"), flush=True)
    engine.destroy()
"""

STAGES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def consolidated(runs, tmp_path_factory):
    """Every ZeRO stage trained, saved and consolidated by one 2-rank torchrun (the stages one after another)."""
    import subprocess
    import sys

    from .conftest import REPO, free_port, subprocess_env

    base = tmp_path_factory.mktemp("consolidate")
    script = base / "consolidate.py"
    script.write_text(CONSOLIDATE)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), str(base / "ck"), str(runs / "z3" / "config.yaml"),
                           ",".join(map(str, STAGES))],
                          capture_output=True, text=True, env=subprocess_env(), cwd=str(REPO), timeout=600)


@pytest.mark.parametrize("stage", STAGES)
def test_consolidation_equals_the_live_weights(consolidated, stage):
    """Every ZeRO stage, on 2 ranks: the consolidated fp32 state is bit-for-bit the engine's own parameters."""
    p = consolidated
    assert p.stdout.count(f"stage {stage}: EXACT") == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("final_norm", [True, False])
def test_timm_loads_strictly_with_identical_features(runs, tmp_path, final_norm):
    import timm

    out = tmp_path / "timm"
    args = ["convert", str(runs / "z3"), "--to", "timm", "--out", str(out)] + ([] if final_norm else
                                                                                ["--no-final-norm"])
    run_cli(args)
    cfg = json.loads((out / "config.json").read_text())
    from safetensors.torch import load_file

    plain = timm.create_model(cfg["architecture"], **cfg["model_args"])
    exported = load_file(str(out / "model.safetensors"))
    plain.load_state_dict(exported, strict=True)  # every key matched
    encoder = {k[len("encoder."):]: v for k, v in load_any(runs / "z3").items() if k.startswith("encoder.")}
    assert {k: v for k, v in exported.items() if not k.startswith("fc_norm.")}.keys() == encoder.keys()
    for k in encoder:  # and back: the timm tensors are megadigpt's encoder tensors, bit for bit
        assert torch.equal(exported[k], encoder[k]), k
    tm = load_timm(out).eval()  # timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))
    ours = _model(runs / "z3")
    ours.load_state_dict(load_any(runs / "z3"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the raw trunk either way: with avg pooling timm's norm is an Identity (fc_norm pools)
        torch.testing.assert_close(tm.forward_features(x), ours.encoder.forward_features(x), rtol=1e-5, atol=1e-5)
    assert tm.global_pool == "avg" and isinstance(tm.norm, torch.nn.Identity)
    assert isinstance(tm.fc_norm, torch.nn.LayerNorm) == final_norm


@pytest.fixture(scope="module")
def ref_pth(runs):
    """``megadigpt convert --to reference`` of the ZeRO-3 run, once for the tests that read it."""
    path = runs / "ref.pth"
    run_cli(["convert", str(runs / "z3"), "--to", "reference", "--out", str(path)])
    return path


def test_reference_layout_round_trips_exactly(runs, ref_pth):
    sd = load_any(runs / "z3")
    ref = load_reference_file(ref_pth)  # weights_only loading
    for k in ("ar_token", "kd_token", "ar_enc2dec.weight", "kd_pred.bias", "ar_blocks.0.attn2.kv.weight",
              "ar_blocks.0.norm2_1.weight", "ar_enc_norm.3.weight", "blocks.0.attn.qkv.weight", "mask",
              "decoder_pos_embed"):
        assert k in ref, k
    assert ref["mask"].shape == (49, 49) and torch.isinf(ref["mask"][0, -1])  # 3 x 16 + 1 tokens; seg 0 !-> CLS
    back = from_reference(ref)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    assert set(to_reference(back)["model"]) == set(ref)


def test_reference_checkpoint_continues_pretraining(runs, ref_pth, cifar_dir, tmp_path):
    """init_from a reference-layout .pth and from the fp32 export: the same weights, the same loss curve."""
    run_cli(["convert", str(runs / "z3"), "--to", "fp32", "--out", str(tmp_path / "full.safetensors")])
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli(_args(cifar_dir, a, "train.zero_stage=1", f"train.init_from={ref_pth}"))
    run_cli(_args(cifar_dir, b, "train.zero_stage=1", f"train.init_from={tmp_path / 'full.safetensors'}"))
    assert losses(a) == losses(b)
    # it really started from the converted weights: not from the seed's initialisation, whose first loss is the
    # ZeRO-3 run's own (same seed, data and batch; 1 vs 2 ranks agree to ~1e-6, tests/test_deepspeed.py)
    scratch = losses(runs / "z3")[1]
    assert all(abs(x - y) > 1e-4 for x, y in zip(losses(a)[1], scratch)), (losses(a)[1], scratch)


def test_bad_inputs_are_refused(runs, tmp_path):
    junk = tmp_path / "junk.pth"
    torch.save({"model": {"foo": torch.zeros(1)}}, junk)
    with pytest.raises(ConfigError, match="not a reference D-iGPT checkpoint"):
        load_any(junk)
    pickled = tmp_path / "evil.pth"
    import pathlib

    torch.save({"model": {"ar_token": torch.zeros(1)}, "payload": pathlib.PurePosixPath("/x")}, pickled)
    with pytest.raises(ConfigError, match="refused to load: .*pathlib.PurePosixPath"):
        load_any(pickled)  # weights_only refuses arbitrary objects
    with pytest.raises(ConfigError, match="not found"):
        load_any(tmp_path / "missing")
    ref = load_reference_file_from(runs, tmp_path)
    ref["model"]["surprise.weight"] = torch.zeros(1)
    torch.save(ref, tmp_path / "ref_bad.pth")
    with pytest.raises(ConfigError, match="unknown key"):
        load_any(tmp_path / "ref_bad.pth")
    p = run_cli(["pretrain", "--run-dir", str(tmp_path / "x"), "train.init_from=" + str(tmp_path / "ref_bad.pth")],
                check=False)
    assert p.returncode == 2 and "unknown key" in p.stderr


def load_reference_file_from(runs, tmp_path):
    return to_reference(load_any(runs / "z3"))


def _card_example(card: str, folder, image) -> dict:
    """Run the model card's own "How to use" example (its first python block) on one image file; its variables."""
    code = card.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = re.sub(r"path/to/megadigpt_vit\w+", str(folder), code).replace('"image.jpg"', repr(str(image)))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the card megadigpt itself wrote
    return scope


@pytest.mark.parametrize("final_norm", [True, False])
def test_card_example_gives_the_probes_and_finetunings_features(runs, cifar_dir, tmp_path, final_norm):
    """Issue 30: the timm export pools as megadigpt measures. The card's own example, run as written on real
    CIFAR-10 test images (PIL + timm's transform from the export's preprocessing), gives the probe's features
    (the mean of the last block's patch tokens, through the probe's loader and classifier:
    ``pooled_block_features``) to fp32 tolerance, and its ``pooled`` (= ``model(x)``) is the fine-tuning head's
    input (avg pool + fc_norm); without the final norm ``model(x)`` is the probe's features themselves."""
    from megadigpt.checkpoint.convert import geometry_of, load_encoder_weights
    from megadigpt.config import FinetuneDataConfig
    from megadigpt.data import find_samples
    from megadigpt.data.classification import build_classification_loader
    from megadigpt.model.classifier import build_classifier
    from megadigpt.train.finetune import load_into_classifier
    from megadigpt.train.probe import pooled_block_features

    out = tmp_path / "enc"
    run_cli(["convert", str(runs / "z3"), "--to", "timm", "--out", str(out)] +
            ([] if final_norm else ["--no-final-norm"]))
    card = (out / "README.md").read_text()
    samples = find_samples(str(cifar_dir / "test-000000.tar"))[:8]
    feats, pooled, direct = [], [], []
    for i, smp in enumerate(samples):
        image = tmp_path / f"{i}.jpg"
        image.write_bytes(smp.read())
        got = _card_example(card, out, image)
        feats.append(got["features"])
        pooled.append(got["pooled"] if final_norm else got["model"](got["x"]))
        direct.append(got["model"](got["x"]).detach())
    feats, pooled, direct = torch.cat(feats), torch.cat(pooled), torch.cat(direct)

    # the probe, as ``megadigpt probe`` runs it: the run's weights in its classifier, its loader and defaults
    sd, info = load_encoder_weights(runs / "z3")
    geom, _ = geometry_of(sd, info.get("num_heads"))
    d = FinetuneDataConfig()
    loader = build_classification_loader(samples, False, 32, 8, 0, 1, kind="torch", device=torch.device("cpu"),
                                         num_workers=0, mean=d.mean, std=d.std, crop_pct=d.crop_pct)
    x = next(iter(loader))["image"]
    probe_model = build_classifier(geom, 32, 0, "avg", 0.0).eval()
    load_into_classifier(probe_model, sd, 0.0)
    finetune_model = build_classifier(geom, 32, 10, "avg", 0.0).eval()  # the paper's head, as fine-tuning builds it
    load_into_classifier(finetune_model, sd, 2e-5)
    ours = _model(runs / "z3")
    ours.load_state_dict(load_any(runs / "z3"))
    with torch.no_grad():
        probe = pooled_block_features(probe_model, x)[-1]
        torch.testing.assert_close(feats, probe, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats, pooled_block_features(ours.encoder, x)[-1], rtol=1e-5, atol=1e-5)
        head_input = finetune_model.forward_head(finetune_model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(direct, pooled, rtol=0, atol=0)  # model(x) is the card's pooled
    if final_norm:
        torch.testing.assert_close(pooled, head_input, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(pooled, probe, atol=1e-3)  # (the norm is there: the two are told apart)
    else:
        torch.testing.assert_close(pooled, probe, rtol=1e-5, atol=1e-5)
    assert feats.abs().max() > 0.1 and feats.std(0).mean() > 1e-3  # real, varied features, not a constant


def test_standard_size_loads_by_its_timm_name(tmp_path):
    """A ViT-Ti/16 at 224 exports under timm's own name and loads with the plain call (num_classes=0 for
    features or N to fine-tune: a pretrained encoder has no classifier head)."""
    import timm

    from megadigpt.checkpoint.convert import timm_export
    from megadigpt.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vit_tiny", patch_size=16, img_size=224, decoder_dim=32, decoder_depth=1,
                                    decoder_heads=2), 48, 14).eval()
    out = timm_export(model.state_dict(), 3, tmp_path / "ti")
    assert json.loads((out / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=True, global_pool="avg",  # megadigpt's pooling
                           pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")), num_classes=0).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        mine = model.encoder.forward_features(x)
        torch.testing.assert_close(tm.forward_features(x), mine, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tm(x), torch.nn.functional.layer_norm(mine[:, 1:].mean(1), (192,), eps=1e-6),
                                   rtol=1e-5, atol=1e-5)
    fine = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=10, global_pool="avg",
                             pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    assert fine.head.out_features == 10 and torch.equal(fine.blocks[0].attn.qkv.weight,
                                                         model.encoder.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------------------------------------- reference by role
# A transcription of the reference network's forward, on a state dict with the reference's own names (spec §3-4;
# megadigpt's perf baseline is megadigpt's model with eager attention, not this). The one line that matters:
# ``forward_encoder`` returns ``(x_kd, x_ar)`` and ``forward`` unpacks ``latent_ar, latent_kd``, so the taps
# *named* ``ar_*`` feed ``kd_blocks`` (discriminative) and ``kd_*`` feed ``ar_blocks`` (generative).

REF = dict(heads=2, dec_heads=2, patch=4, segment_grid=2, taps=[2, 3, 4, 4], dec_depth=1)


def _ln(sd, p, x, eps=1e-6):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(sd, p, x):
    return torch.nn.functional.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _attend(q, k, v, heads, mask):
    B, L, C = q.shape
    q, k, v = (t.reshape(B, t.shape[1], heads, C // heads).transpose(1, 2) for t in (q, k, v))
    a = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5 + mask  # the reference's additive -inf mask
    return (a.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, L, C)


def _mlp(sd, p, x):
    return _lin(sd, p + ".fc2", torch.nn.functional.gelu(_lin(sd, p + ".fc1", x)))


def ref_forward_encoder(sd, images, order):
    from megadigpt.model.digpt import take_segments
    from megadigpt.model.masks import SegmentLayout

    w = sd["patch_embed.proj.weight"]
    x = torch.nn.functional.conv2d(images, w, sd["patch_embed.proj.bias"], stride=REF["patch"]).flatten(2)
    x = x.transpose(1, 2) + sd["pos_embed"][:, 1:]
    B, N, C = x.shape
    lay = SegmentLayout(int(N ** 0.5), REF["segment_grid"])
    x = take_segments(x[:, lay.patch_index()], order[:, :lay.num_visible]).reshape(B, -1, C)
    x = torch.cat([x, sd["cls_token"].expand(B, -1, -1)], dim=1)  # CLS last
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    outs = []
    for i in range(depth):
        p = f"blocks.{i}"
        q, k, v = _lin(sd, p + ".attn.qkv", _ln(sd, p + ".norm1", x)).chunk(3, dim=-1)
        x = x + _lin(sd, p + ".attn.proj", _attend(q, k, v, REF["heads"], sd["mask"]))
        x = x + _mlp(sd, p + ".mlp", _ln(sd, p + ".norm2", x))
        outs += [x] * REF["taps"].count(i + 1)
    x_kd = _lin(sd, "kd_enc2dec", torch.cat([_ln(sd, f"kd_enc_norm.{j}", t, 1e-5) for j, t in enumerate(outs)], -1))
    x_ar = _lin(sd, "ar_enc2dec", torch.cat([_ln(sd, f"ar_enc_norm.{j}", t, 1e-5) for j, t in enumerate(outs)], -1))
    return x_kd, x_ar, lay


def ref_decoder(sd, name, latent, pos):
    """name: 'ar' or 'kd'; latent (B, L, D * depth) -> (B, L, teacher width)."""
    q = sd[f"{name}_token"] + pos
    mem = latent.reshape(*latent.shape[:-1], q.shape[-1], REF["dec_depth"])
    for i in range(REF["dec_depth"]):
        p, m = f"{name}_blocks.{i}", mem[..., i]
        a, b, c = _lin(sd, p + ".attn1.qkv", _ln(sd, p + ".norm1", q)).chunk(3, dim=-1)
        q = q + _lin(sd, p + ".attn1.proj", _attend(a, b, c, REF["dec_heads"], sd["mask"]))
        k, v = _lin(sd, p + ".attn2.kv", _ln(sd, p + ".norm2_2", m)).chunk(2, dim=-1)
        q = q + _lin(sd, p + ".attn2.proj", _attend(_lin(sd, p + ".attn2.q", _ln(sd, p + ".norm2_1", q)), k, v,
                                                    REF["dec_heads"], sd["mask"]))
        q = q + _mlp(sd, p + ".mlp", _ln(sd, p + ".norm2", q))
    return _lin(sd, f"{name}_pred", _ln(sd, f"{name}_norm", q))


def ref_forward(sd, images, order):
    """The reference's (Gen, Dis) predictions; rows as megadigpt's predict (last row: CLS)."""
    latent_ar, latent_kd, lay = ref_forward_encoder(sd, images, order)  # sic: (x_kd, x_ar) unpacked as (ar, kd)
    B, nv = images.shape[0], lay.num_visible
    pos = sd["decoder_pos_embed"][0, 1:][lay.patch_index()][order]  # (B, S, T, D)
    cls = pos.new_zeros(B, 1, pos.shape[-1])
    ar_pos = torch.cat([pos[:, 1:].reshape(B, -1, pos.shape[-1]), cls], dim=1)  # row block k -> segment k+1
    kd_pos = torch.cat([pos[:, :nv].reshape(B, -1, pos.shape[-1]), cls], dim=1)  # row block k -> segment k
    return ref_decoder(sd, "ar", latent_ar, ar_pos), ref_decoder(sd, "kd", latent_kd, kd_pos)


def ref_losses(sd, images, tokens, cls, order):
    """Per-sample mean 2 - 2 cos over predicted tokens + CLS (teacher grid = student grid here)."""
    from megadigpt.model.digpt import cosine_loss, take_segments
    from megadigpt.model.masks import SegmentLayout

    gen, dis = ref_forward(sd, images, order)
    lay = SegmentLayout(int(tokens.shape[1] ** 0.5), REF["segment_grid"])
    segs = take_segments(tokens[:, lay.patch_index()], order)
    n = lay.num_visible * lay.tokens_per_segment
    out = []
    for pred, tgt in ((gen, segs[:, 1:]), (dis, segs[:, :-1])):
        tok = cosine_loss(pred[:, :n], tgt.reshape(tgt.shape[0], n, -1))
        out.append(torch.cat([tok, cosine_loss(pred[:, -1], cls)[:, None]], dim=1).mean(dim=1))
    return tuple(out)


def _tiny_model():
    from megadigpt.config import ModelConfig

    return build_model(ModelConfig(arch="vit_tiny", embed_dim=64, depth=4, num_heads=REF["heads"], img_size=32,
                                   patch_size=REF["patch"], decoder_dim=32, decoder_depth=REF["dec_depth"],
                                   decoder_heads=REF["dec_heads"], taps=REF["taps"]), 48, 8).eval()


def _randomized(sd, seed):
    """Every weight random (LayerNorms too, and different in every module), buffers as they are."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v if k in ("mask", "decoder_pos_embed", "pos_embed", "encoder.pos_embed") else
                0.3 * torch.randn(v.shape, generator=g) + (1.0 if k.endswith("norm.weight") or ".norm" in k
                                                           and k.endswith("weight") else 0.0))
            for k, v in sd.items()}


def _shared_norms(ref):
    """The reference repeats one LayerNorm module over its taps: its copies are one tensor."""
    for k in list(ref):
        for b in ("ar", "kd"):
            if k.startswith(f"{b}_enc_norm.") and not k.startswith(f"{b}_enc_norm.0."):
                ref[k] = ref[f"{b}_enc_norm.0." + k.split(".")[-1]]
    return ref


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 64, 48, generator=g),
            torch.randn(3, 48, generator=g), torch.stack([torch.randperm(4, generator=g) for _ in range(3)]))


def test_reference_checkpoint_is_the_reference_network():
    """A reference-layout state dict with random weights, imported (from_reference) into megadigpt: the same Gen
    and Dis losses as the reference's own forward for the same weights, inputs and segment orders. Mapping by
    name (ar taps -> Gen) fails this."""
    ref = _shared_norms(_randomized(to_reference(_tiny_model().state_dict())["model"], seed=0))
    model = _tiny_model()
    model.load_state_dict(from_reference(ref), strict=True)
    x, tokens, cls, order = _inputs()
    with torch.no_grad():
        want = ref_losses(ref, x, tokens, cls, order)
        got = model(x, tokens, cls, order)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    assert not torch.allclose(want[0], want[1], atol=1e-3)  # the two decoders really differ


def test_exported_model_is_ours_inside_the_reference_code():
    """The reverse: a megadigpt model exported with to_reference computes, in the reference's forward, the losses
    megadigpt computes."""
    model = _tiny_model()
    model.load_state_dict(_randomized(model.state_dict(), seed=2), strict=True)
    ref = to_reference(model.state_dict())["model"]
    x, tokens, cls, order = _inputs(3)
    with torch.no_grad():
        want = model(x, tokens, cls, order)
        got = ref_losses(ref, x, tokens, cls, order)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name,moves", [
    ("kd_enc2dec.weight", "gen"), ("ar_enc2dec.weight", "dis"), ("kd_enc_norm.*.weight", "gen"),
    ("ar_enc_norm.*.weight", "dis"), ("ar_blocks.0.attn2.kv.weight", "gen"), ("kd_blocks.0.attn2.kv.weight", "dis"),
    ("ar_token", "gen"), ("kd_token", "dis"), ("ar_pred.weight", "gen"), ("kd_pred.weight", "dis"),
    ("blocks.3.mlp.fc2.weight", "both")])
def test_perturbing_one_reference_tensor_moves_its_decoder(name, moves):
    """Import a reference-layout checkpoint, perturb one imported tensor (all tap copies of a shared norm), and see
    which of megadigpt's decoders changes its output: the one the reference's forward uses it for."""
    ref = _shared_norms(_randomized(to_reference(_tiny_model().state_dict())["model"], seed=4))
    x, _, _, order = _inputs(5)
    model = _tiny_model()

    def outputs(sd):
        model.load_state_dict(from_reference(sd), strict=True)
        with torch.no_grad():
            return model.predict(x, order)

    base = outputs(ref)
    key = name.replace("*", "0")
    bumped = _shared_norms({**ref, key: ref[key] + 0.5 * torch.randn_like(ref[key])})  # every copy of a shared norm
    gen, dis = outputs(bumped)
    moved = {"gen": not torch.allclose(gen, base[0], atol=1e-6), "dis": not torch.allclose(dis, base[1], atol=1e-6)}
    assert moved == {"gen": moves in ("gen", "both"), "dis": moves in ("dis", "both")}, (name, moved)
    with torch.no_grad():  # and the reference's own forward agrees on which one moved
        r0, r1 = ref_forward(ref, x, order), ref_forward(bumped, x, order)
    assert [not torch.allclose(a, b, atol=1e-6) for a, b in zip(r0, r1)] == [moved["gen"], moved["dis"]]

"""megadigpt convert: DeepSpeed (ZeRO-3, 2 ranks) -> timm loads strictly with identical features; reference
layout round-trips exactly and is a valid train.init_from; bad inputs are refused."""

import json

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
stage, out = int(sys.argv[1]), sys.argv[2]
cfg = load_config(sys.argv[3])
deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
torch.manual_seed(0)
model = build_model(cfg.model, 48, 8)
engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim, 1e-3, "cpu"), config={
    "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True})
for _ in range(2):
    g, d = engine(torch.randn(2, 3, 32, 32), torch.randn(2, 64, 48), torch.randn(2, 48))
    engine.backward(g.mean() + d.mean())
    engine.step()
engine.save_checkpoint(out, tag="t")
with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
    live = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
got = load_any(out + "/t")
assert set(got) == set(live), set(got) ^ set(live)
bad = [k for k in live if not torch.equal(got[k], live[k].float())]
print("EXACT" if not bad else f"DIFFER {bad[:3]}")
"""


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_consolidation_equals_the_live_weights(runs, tmp_path, stage):
    """Every ZeRO stage, on 2 ranks: the consolidated fp32 state is bit-for-bit the engine's own parameters."""
    import subprocess
    import sys

    from .conftest import REPO, free_port, subprocess_env

    script = tmp_path / "consolidate.py"
    script.write_text(CONSOLIDATE)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script), str(stage), str(tmp_path / "ck"), str(runs / "z3" /
                                                                                             "config.yaml")],
                       capture_output=True, text=True, env=subprocess_env(), cwd=str(REPO), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("EXACT") == 2, p.stdout[-2000:]


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
    assert {k: v for k, v in exported.items() if not k.startswith("norm.")}.keys() == encoder.keys()
    for k in encoder:  # and back: the timm tensors are megadigpt's encoder tensors, bit for bit
        assert torch.equal(exported[k], encoder[k]), k
    tm = load_timm(out).eval()  # timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))
    ours = _model(runs / "z3")
    ours.load_state_dict(load_any(runs / "z3"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mine = ours.encoder.forward_features(x)
        if final_norm:
            mine = torch.nn.functional.layer_norm(mine, mine.shape[-1:], eps=1e-6)
        torch.testing.assert_close(tm.forward_features(x), mine, rtol=1e-5, atol=1e-5)


def test_reference_layout_round_trips_exactly(runs, tmp_path):
    sd = load_any(runs / "z3")
    path = tmp_path / "ref.pth"
    run_cli(["convert", str(runs / "z3"), "--to", "reference", "--out", str(path)])
    ref = load_reference_file(path)  # weights_only loading
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


def test_reference_checkpoint_continues_pretraining(runs, cifar_dir, tmp_path):
    """init_from a reference-layout .pth and from the fp32 export: the same weights, the same loss curve."""
    run_cli(["convert", str(runs / "z3"), "--to", "reference", "--out", str(tmp_path / "ref.pth")])
    run_cli(["convert", str(runs / "z3"), "--to", "fp32", "--out", str(tmp_path / "full.safetensors")])
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_cli(_args(cifar_dir, a, "train.zero_stage=1", f"train.init_from={tmp_path / 'ref.pth'}"))
    run_cli(_args(cifar_dir, b, "train.zero_stage=1", f"train.init_from={tmp_path / 'full.safetensors'}"))
    run_cli(_args(cifar_dir, c, "train.zero_stage=1"))
    assert losses(a) == losses(b)
    assert losses(a)[1] != losses(c)[1]  # it really started from the converted weights


def test_bad_inputs_are_refused(runs, tmp_path):
    junk = tmp_path / "junk.pth"
    torch.save({"model": {"foo": torch.zeros(1)}}, junk)
    with pytest.raises(ConfigError, match="not a reference D-iGPT checkpoint"):
        load_any(junk)
    pickled = tmp_path / "evil.pth"
    import pathlib

    torch.save({"model": {"ar_token": torch.zeros(1)}, "payload": pathlib.PurePosixPath("/x")}, pickled)
    with pytest.raises(ConfigError, match="not a loadable checkpoint"):
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
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")), num_classes=0).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        mine = model.encoder.forward_features(x)
        torch.testing.assert_close(tm.forward_features(x), torch.nn.functional.layer_norm(mine, (192,), eps=1e-6),
                                   rtol=1e-5, atol=1e-5)
    fine = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=10,
                             pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    assert fine.head.out_features == 10 and torch.equal(fine.blocks[0].attn.qkv.weight,
                                                         model.encoder.blocks[0].attn.qkv.weight)

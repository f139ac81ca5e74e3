"""Fine-tuning, probing and evaluation: the pieces on planted cases, and the whole path on real CIFAR-10 images
with real DeepSpeed engines (gloo), real checkpoints and real timm loading."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megadigpt.config import ConfigError, FinetuneRunConfig, load_config
from megadigpt.model.classifier import EncoderGeometry, build_classifier, interpolate_pos_embed, param_groups_lrd
from megadigpt.model.pos_embed import sincos_2d

from .conftest import TINY, run_cli

GEOM = EncoderGeometry(embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0, patch_size=4)


# ----------------------------------------------------------------------------------------- model pieces

def test_pos_embed_interpolation_exact_at_same_size_and_smooth_above():
    pe = sincos_2d(64, 8)[None]
    same = interpolate_pos_embed(pe, 8)
    assert torch.equal(same, pe) and same.data_ptr() != pe.data_ptr()
    up = interpolate_pos_embed(pe, 16)
    assert up.shape == (1, 1 + 256, 64)
    assert torch.equal(up[:, 0], pe[:, 0])  # the CLS slot is kept
    # a smooth table stays close to the same table computed at the new grid's positions (x2 upsampling of
    # positions 0..7 -> 16 samples over the same extent): compare the centres of 2x2 cells with the originals
    grid = up[0, 1:].reshape(16, 16, 64)
    cell_mean = grid.reshape(8, 2, 8, 2, 64).mean(dim=(1, 3))
    assert (cell_mean - pe[0, 1:].reshape(8, 8, 64)).abs().max() < 0.15
    with pytest.raises(ValueError):
        interpolate_pos_embed(torch.zeros(1, 1 + 10, 8), 4)


def test_layer_decay_groups():
    model = build_classifier(GEOM, 32, 10)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5)
    d = GEOM.depth
    by_name = {}
    for g in groups:
        for p in g["params"]:
            by_name[id(p)] = g
    named = dict(model.named_parameters())
    expect = {"cls_token": (0, 0.0), "pos_embed": (0, 0.0), "patch_embed.proj.weight": (0, 0.05),
              "patch_embed.proj.bias": (0, 0.0), "blocks.0.attn.qkv.weight": (1, 0.05),
              "blocks.0.norm1.weight": (1, 0.0), "blocks.3.mlp.fc2.weight": (4, 0.05),
              "fc_norm.weight": (d + 1, 0.0), "head.weight": (d + 1, 0.05), "head.bias": (d + 1, 0.0)}
    for name, (lid, wd) in expect.items():
        g = by_name[id(named[name])]
        assert g["layer_id"] == lid and g["weight_decay"] == wd, name
        assert g["lr_scale"] == pytest.approx(0.5 ** (d + 1 - lid)), name
    assert sum(len(g["params"]) for g in groups) == len(named)  # every parameter exactly once
    assert len({id(p) for g in groups for p in g["params"]}) == len(named)


def test_mixup_cutmix_targets_match_the_images():
    """The mixed targets are what the mixed images are made of: lam of the image's own label and 1 - lam of its
    partner's (the batch reversed), smoothing spread over all classes; for cutmix 1 - lam is the pasted area."""
    from timm.data import Mixup

    K, smoothing = 5, 0.1
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).clone()  # image i is all i
    y = torch.tensor([0, 1, 2, 3])
    for mix, cut in ((1.0, 0.0), (0.0, 1.0)):
        np.random.seed(3)
        mixed, target = Mixup(mixup_alpha=mix, cutmix_alpha=cut, prob=1.0, switch_prob=0.0, mode="batch",
                              label_smoothing=smoothing, num_classes=K)(x.clone(), y)
        assert torch.allclose(target.sum(1), torch.ones(4))
        partner = x.flip(0)[:, 0, 0, 0]
        own_frac = ((mixed[:, 0] - partner.view(4, 1, 1)) / (x[:, 0, 0, 0] - partner).view(4, 1, 1)).mean(dim=(1, 2))
        if cut:  # a box of the partner pasted: the fraction of own pixels, from the pixels themselves
            own_frac = (mixed[:, 0] == x[:, 0]).float().mean(dim=(1, 2))
        off, on = smoothing / K, 1 - smoothing + smoothing / K
        for i in range(4):
            lam = own_frac[i].item()
            want = torch.full((K,), off)
            want[y[i]] = on * lam + off * (1 - lam)
            want[y.flip(0)[i]] = on * (1 - lam) + off * lam
            assert torch.allclose(target[i], want, atol=1e-5), (mix, cut, i, target[i], want)


# ----------------------------------------------------------------------------------------- probe and k-NN

def test_probe_picks_the_planted_layer():
    from megadigpt.train.probe import train_linear_heads

    g = torch.Generator().manual_seed(0)
    L, n, m, C, K = 4, 600, 300, 16, 3
    y, vy = torch.randint(0, K, (n,), generator=g), torch.randint(0, K, (m,), generator=g)
    x, vx = torch.randn(L, n, C, generator=g), torch.randn(L, m, C, generator=g)
    centres = torch.randn(K, C, generator=g) * 3
    x[2] += centres[y]  # block 3 separates the classes; block 2 weakly; the others are noise
    vx[2] += centres[vy]
    x[1] += 0.3 * centres[y]
    vx[1] += 0.3 * centres[vy]
    r = train_linear_heads(x.half(), y, vx.half(), vy, K, epochs=20, batch=128, lr=1e-2)
    top1 = r["top1"]
    assert int(np.argmax(top1)) == 2 and top1[2] > 95
    assert top1[1] > top1[0] and top1[0] < 50 and top1[3] < 50


def test_knn_against_a_direct_computation():
    from megadigpt.train.probe import knn_classify

    g = torch.Generator().manual_seed(1)
    bank, by = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    q, qy = torch.randn(20, 8, generator=g), torch.randint(0, 4, (20,), generator=g)
    r = knn_classify(bank, by, q, qy, 4, k=5, t=0.1, chunk=7)
    hits = 0
    for i in range(20):
        sims = torch.nn.functional.cosine_similarity(q[i:i + 1], bank)
        top = sims.topk(5)
        votes = torch.zeros(4).index_add_(0, by[top.indices], (top.values / 0.1).exp())
        hits += int(votes.argmax() == qy[i])
    assert r["top1"] == pytest.approx(100 * hits / 20)


# ----------------------------------------------------------------------------------------- robustness sets

# (the sets' class maps: tests/test_eval_sources.py)


# ----------------------------------------------------------------------------------------- config checks

def test_finetune_bad_input_fails_early(tmp_path):
    from megadigpt.train.finetune import plan_finetune

    base = [f"data.train={tmp_path}", f"data.val={tmp_path}", "train.global_batch=8", "train.micro_batch=8",
            f"train.run_dir={tmp_path / 'r'}"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jpg").write_bytes(b"")
    cases = {
        "model.arch=auto takes the geometry": [],
        "must be even": ["model.arch=vit_tiny", "train.micro_batch=7", "train.global_batch=7"],
        "layer_decay": ["model.arch=vit_tiny", "optim.layer_decay=1.5"],
        "global_pool": ["model.arch=vit_tiny", "model.global_pool=max"],
        "train.init_from not found": ["train.init_from=/nonexistent"],
        "remode": ["model.arch=vit_tiny", "finetune.remode=zeros"],
    }
    for msg, extra in cases.items():  # value ranges are load_config's, the rest plan_finetune's
        with pytest.raises(ConfigError, match=msg):
            plan_finetune(load_config(None, base + extra, root=FinetuneRunConfig), 1)
    with pytest.raises(ConfigError, match="pretraining config given"):
        load_config("demo", [], root=FinetuneRunConfig)


# ----------------------------------------------------------------------------------------- the whole path

FT = ["--config", "cifar10_finetune", "data.num_workers=0", "train.progress=off", "train.log_every=1",
      "train.tensorboard=false", "train.global_batch=16", "train.micro_batch=8", "data.loader=torch"]


def _records(run_dir, key):
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if key in r and "event" not in r:
            out[r["step"]] = r[key]
    return out


def test_pretrain_finetune_eval_on_cifar(cifar_small, tmp_path):
    """A tiny pretraining (with the k-NN monitor) -> fine-tune on 2 ranks under ZeRO-3 with EMA -> the exports
    load in timm -> ``megadigpt eval`` on the same images reproduces the fine-tune's own last evaluation."""
    pre = tmp_path / "pre"
    run_cli(["pretrain", "--data", str(cifar_small / "train.jsonl"), "--run-dir", str(pre)] + TINY +
            ["train.max_steps=4", "train.global_batch=16", "train.micro_batch=16", "train.zero_stage=1",
             "train.probe_every=2", f"train.probe_train={cifar_small / 'train.jsonl'}",
             f"train.probe_val={cifar_small / 'val.jsonl'}"])
    knn = _records(pre, "knn_top1")
    assert sorted(knn) == [2, 4] and all(0 <= v <= 100 for v in knn.values())

    ft = tmp_path / "ft"
    run_cli(["finetune", "--init-from", str(pre), "--train", str(cifar_small / "train.jsonl"), "--val",
             str(cifar_small / "val.jsonl"), "--run-dir", str(ft)] + FT +
            ["train.epochs=2", "train.zero_stage=3", "finetune.ema_decay=0.9"], nproc=2)
    val = _records(ft, "val_top1")
    assert sorted(val) == [8, 16]  # 128 images / 2 ranks / 8 per micro-batch = 8 steps an epoch
    assert _records(ft, "val_images") == {8: 64, 16: 64}  # every image once, on 2 ranks
    assert sorted(_records(ft, "val_ema_top1")) == [8, 16]
    assert set(_records(ft, "bad_samples").values()) == {0}  # real images, RandAugment included: none dropped
    start = next(json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines() if '"start"' in line)
    assert start["load"]["interpolated"] is None and "head.weight" in start["load"]["fresh"]
    for which in ("best", "last", "best_ema", "last_ema"):
        meta = json.loads((ft / which / "config.json").read_text())
        assert meta["num_classes"] == 10 and meta["label_names"][0] == "airplane"
    from megadigpt.checkpoint.convert import load_timm
    from safetensors.torch import load_file

    model = load_timm(ft / "last").eval()
    assert model.num_classes == 10 and model.global_pool == "avg"
    # the trunk moved during fine-tuning, the EMA export differs from the raw one
    raw, ema = load_file(str(ft / "last" / "model.safetensors")), load_file(str(ft / "last_ema" / "model.safetensors"))
    assert not torch.equal(raw["head.weight"], ema["head.weight"])
    # the EMA (kept on ZeRO-3's local slices) followed the training: it left the pretrained weights behind, and
    # lies between them and the final ones
    from megadigpt.checkpoint.convert import load_encoder_weights

    init, _ = load_encoder_weights(pre)
    k = "blocks.1.attn.qkv.weight"
    assert 0 < (ema[k] - raw[k]).norm() < (init[k] - raw[k]).norm()
    assert (ema[k] - init[k]).norm() > 0

    out = tmp_path / "eval"
    run_cli(["eval", str(ft), "--which", "last", "--imagenet", str(cifar_small / "val_folders"), "--out", str(out),
             "--loader", "torch", "--workers", "0"])
    res = json.loads((out / "eval.json").read_text())["sets"]["imagenet"]
    assert res["images"] == 64
    assert res["top1"] == pytest.approx(val[16], abs=1e-9)  # same images, transform and weights, another process
    assert res["loss"] == pytest.approx(_records(ft, "val_loss")[16], rel=1e-5)

    # the run's EMA validation is an evaluation of its own EMA export: under ZeRO-3 the small parameters (every one
    # at this size, below stage3_param_persistence_threshold) stay gathered, and evaluating with the EMA must use
    # the EMA's values of those too, not the live biases and norms
    run_cli(["eval", str(ft), "--which", "last_ema", "--imagenet", str(cifar_small / "val_folders"), "--out",
             str(tmp_path / "eval_ema"), "--loader", "torch", "--workers", "0"])
    res_ema = json.loads((tmp_path / "eval_ema" / "eval.json").read_text())["sets"]["imagenet"]
    assert res_ema["top1"] == pytest.approx(_records(ft, "val_ema_top1")[16], abs=1e-9)
    assert res_ema["loss"] == pytest.approx(_records(ft, "val_ema_loss")[16], rel=1e-5)
    assert res_ema["loss"] != pytest.approx(res["loss"], rel=1e-5)


def test_finetune_resume_after_preemption_matches(cifar_small, tmp_path):
    """SIGTERM mid-epoch -> checkpoint, exit 75; the same command resumes mid-epoch and ends with the weights of an
    uninterrupted run (augmentation is a function of (seed, epoch, sample), the step's randomness of the step)."""
    from safetensors.torch import load_file

    common = ["--train", str(cifar_small / "train.jsonl"), "--val", str(cifar_small / "val.jsonl")] + FT + [
        "model.arch=vit_tiny", "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.patch_size=4",
        "train.epochs=2", "train.micro_batch=16", "train.zero_stage=1"]
    run_cli(["finetune", "--run-dir", str(tmp_path / "a")] + common)
    proc = run_cli(["finetune", "--run-dir", str(tmp_path / "b")] + common, check=False, MEGADIGPT_FAULTS="term=3")
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert not (tmp_path / "b" / "last").exists() or json.loads(
        (tmp_path / "b" / "last" / "config.json").read_text())["megadigpt"]["metrics"]["step"] < 8
    run_cli(["finetune", "--run-dir", str(tmp_path / "b")] + common)
    a, b = load_file(str(tmp_path / "a" / "last" / "model.safetensors")), load_file(
        str(tmp_path / "b" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert _records(tmp_path / "a", "val_top1") == _records(tmp_path / "b", "val_top1")


def test_probe_cli_on_cifar(cifar_small, tmp_path):
    out = tmp_path / "probe"
    run_cli(["probe", "--random-init", "--config", "cifar10_finetune", "--train", str(cifar_small / "train.jsonl"),
             "--val", str(cifar_small / "val.jsonl"), "--out", str(out), "model.arch=vit_tiny", "model.depth=3",
             "model.patch_size=4", "data.num_workers=0", "data.loader=torch", "probe.epochs=3",
             "--knn-layers", "all"], nproc=2)
    r = json.loads((out / "results.json").read_text())
    assert [x["layer"] for x in r["linear"]] == [1, 2, 3] and len(r["knn"]) == 3
    assert r["train_images"] == 128 and r["val_images"] == 64
    assert r["best"]["top1"] == max(x["top1"] for x in r["linear"])


def test_builtin_finetune_recipes():
    """The spec §7 recipes, as shipped."""
    b = load_config("finetune_vitb16_in1k", root=FinetuneRunConfig)
    assert (b.optim.lr, b.optim.layer_decay, b.model.drop_path, b.train.epochs, b.train.global_batch) == \
        (4e-4, 0.65, 0.1, 100, 1024)
    assert (b.finetune.mixup, b.finetune.cutmix, b.finetune.smoothing, b.finetune.reprob, b.finetune.ema_decay) == \
        (0.8, 1.0, 0.1, 0.25, 0.0)
    assert b.data.auto_augment.startswith("rand-m9-mstd0.5") and b.model.global_pool == "avg"
    l21 = load_config("finetune_vitl14_in21k_448", root=FinetuneRunConfig)
    assert (l21.model.img_size, l21.optim.layer_decay, l21.model.drop_path, l21.train.epochs) == (448, 0.75, 0.15, 20)
    assert 2e-4 <= l21.optim.lr <= 3e-4 and l21.train.zero_stage == 3
    l1 = load_config("finetune_vitl14_in1k_448", root=FinetuneRunConfig)
    assert (l1.model.img_size, l1.optim.lr, l1.optim.layer_decay, l1.finetune.ema_decay, l1.train.epochs) == \
        (448, 2e-5, 0.85, 0.9999, 20)


def test_encoder_weights_from_every_source(tmp_path):
    """A pretraining state, its timm export and its reference .pth give the same trunk in timm's names."""
    from megadigpt.checkpoint.convert import load_encoder_weights, save_state, timm_export, to_reference
    from megadigpt.model import build_model

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    sd = {k: v.float() for k, v in build_model(cfg.model, 48, 8).state_dict().items()}
    save_state(sd, tmp_path / "full.safetensors")
    timm_export(sd, 2, tmp_path / "timm")
    torch.save(to_reference(sd), tmp_path / "ref.pth")
    a, _ = load_encoder_weights(tmp_path / "full.safetensors")
    b, info = load_encoder_weights(tmp_path / "timm")
    c, _ = load_encoder_weights(tmp_path / "ref.pth")
    assert info["num_heads"] == 2 and set(a) == set(c) and set(b) == set(a) | {"fc_norm.weight", "fc_norm.bias"}
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
    model = build_classifier(GEOM, 32, 10)  # the TINY trunk: width 64, depth 4, patch 4
    from megadigpt.train.finetune import load_into_classifier

    rep = load_into_classifier(model, b, 2e-5)
    assert rep["dropped"] == [] and "head.weight" in rep["fresh"]  # the export's fc_norm: the (1, 0) of a fresh one
    assert torch.equal(model.fc_norm.weight, torch.ones(64)) and torch.equal(model.fc_norm.bias, torch.zeros(64))
    assert torch.equal(model.blocks[2].mlp.fc1.weight, a["blocks.2.mlp.fc1.weight"])
    big = build_classifier(GEOM, 64, 10)  # 448-px style: a bigger grid, position embeddings interpolated
    assert load_into_classifier(big, a, 2e-5)["interpolated"] == "8x8 -> 16x16"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither checkpoints"):
        load_encoder_weights(tmp_path / "empty")


MASTERS_SCRIPT = r"""
import os, torch, deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from megadigpt.distributed.sharded import LocalEMA, full_state_dict
from megadigpt.model.classifier import EncoderGeometry, build_classifier
from megadigpt.train.optim import build_optimizer
from megadigpt.config import OptimConfig
deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
rank = int(os.environ["RANK"])
for stage in (1, 3):
    torch.manual_seed(0)
    model = build_classifier(EncoderGeometry(32, 2, 2, 2.0, 8), 16, 5)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
    opt = build_optimizer(model, OptimConfig(), 1e-2, "cpu", ds_config=ds)
    engine = deepspeed.initialize(model=model, optimizer=opt, config=ds)[0]
    module = engine.module
    params = dict(module.named_parameters())
    masters = lambda: {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in params.items()}
    def bf16_values():
        with deepspeed.zero.GatheredParameters(list(params.values())) if stage == 3 else torch.no_grad():
            return {n: p.detach().float().cpu().clone() for n, p in params.items()}
    ema = LocalEMA(module, 0.5)
    m0 = masters()
    torch.manual_seed(1 + rank)
    for _ in range(2):
        loss = engine(torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)).float().logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
    ema.update()
    m1, lp = masters(), bf16_values()
    state = full_state_dict(module, rank == 0)
    ema_state = full_state_dict(module, rank == 0, ema)
    with ema.swapped_in():
        swapped = bf16_values()
    after = bf16_values()
    if rank == 0:
        assert all(torch.equal(state[n], m1[n]) for n in params), f"ZeRO-{stage}: export is not the fp32 masters"
        assert any(not torch.equal(state[n], lp[n]) for n in params), f"ZeRO-{stage}: masters equal bf16 values?"
        want = {n: torch.lerp(m0[n], m1[n], 0.5) for n in params}
        assert all(torch.equal(ema_state[n], want[n]) for n in params), f"ZeRO-{stage}: EMA is not of the masters"
        assert all(torch.equal(swapped[n], want[n].bfloat16().float()) for n in params), f"ZeRO-{stage}: swap"
        assert all(torch.equal(after[n], lp[n]) for n in params), f"ZeRO-{stage}: weights not restored"
    engine.destroy()
"""


@pytest.fixture(scope="module")
def two_rank_checks(tmp_path_factory):
    """MASTERS_SCRIPT and PARTITIONED_SCRIPT in one 2-rank gloo run (one start-up for both)."""
    import subprocess
    import sys

    from .conftest import REPO, free_port, subprocess_env

    script = tmp_path_factory.mktemp("two_rank") / "checks.py"
    script.write_text("import os, sys, traceback\n"
                      "for name, code in ((\"masters\", MASTERS), (\"partitioned\", PARTITIONED)):\n"
                      "    try:\n"
                      "        exec(code, {})\n"
                      "        print(f\"{name} OK rank {os.environ['RANK']}\", flush=True)\n"
                      "    except Exception:\n"
                      "        print(f\"{name} FAILED\", traceback.format_exc(), flush=True)\n"
                      "torch = __import__('torch'); torch.distributed.destroy_process_group()\n"
                      "os._exit(0)  # zero.Init's gloo work threads can abort the interpreter's exit\n")
    script.write_text(f"MASTERS = {MASTERS_SCRIPT!r}\nPARTITIONED = {PARTITIONED_SCRIPT!r}\n" + script.read_text())
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(), cwd=str(REPO))
    return proc


def _verdict(proc, name):
    assert proc.stdout.count(f"{name} OK") == 2, proc.stdout[-4000:] + proc.stderr[-3000:]


def test_bf16_exports_and_ema_use_the_fp32_masters(two_rank_checks):
    """bf16 ZeRO-1 and ZeRO-3 engines on 2 ranks: exports are the optimizer's fp32 masters bit for bit (not the
    bf16 module copies), the EMA averages the masters, and evaluating with it swaps in and out exactly."""
    _verdict(two_rank_checks, "masters")


PARTITIONED_SCRIPT = r"""
import functools, os, torch, deepspeed
from megadigpt.model.classifier import EncoderGeometry, build_classifier
from megadigpt.train.finetune import build_and_load
deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
rank = int(os.environ["RANK"])
geom = EncoderGeometry(32, 2, 2, 2.0, 8)
build = functools.partial(build_classifier, geom, 32, 5)
torch.manual_seed(3)
pretrained = build_classifier(geom, 16, 7).state_dict()  # another grid (interpolated) and another head (dropped)
for dtype, weights in ((torch.float32, pretrained), (torch.bfloat16, pretrained), (torch.float32, None)):
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
          "zero_optimization": {"stage": 3}, "bf16": {"enabled": dtype == torch.bfloat16}}
    torch.manual_seed(0)
    plain, report = build_and_load(build, weights, 0.02)
    torch.manual_seed(0)
    part, preport = build_and_load(build, weights, 0.02, ds)
    assert report == preport, (report, preport)
    assert all(p.numel() < plain.get_parameter(n).numel() for n, p in part.named_parameters() if p.ndim), "whole"
    with deepspeed.zero.GatheredParameters(list(part.parameters())):
        got = {n: p.detach().clone() for n, p in part.named_parameters()}
    bad = [n for n, p in plain.named_parameters() if not torch.equal(got[n], p.detach().to(dtype))]
    assert not bad, f"{dtype} weights={weights is not None}: initial weights differ: {bad[:4]}"
    if dtype == torch.float32 and weights is not None:  # the first loss, through a ZeRO-3 engine
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
        engine = deepspeed.initialize(model=part, optimizer=torch.optim.AdamW(part.parameters()), config=ds)[0]
        a, b = engine(x).logsumexp(-1).mean().item(), plain(x).logsumexp(-1).mean().item()
        assert abs(a - b) < 1e-6, (a, b)
        engine.destroy()
"""


def test_zero3_classifier_built_partitioned_equals_the_plain_build(two_rank_checks):
    """Under ZeRO-3 the classifier is built partitioned (timm's init module by module, the pretrained trunk
    copied in module by module) with the plain build's initial weights, in fp32 and bf16, with and without
    pretrained weights; the first loss through the engine equals the plain model's."""
    _verdict(two_rank_checks, "partitioned")


def test_compiled_classifier_matches_eager():
    """train.compile for fine-tuning: the timm classifier with its blocks compiled (as finetune applies it, after
    activation checkpointing) gives the eager forward and gradients to 1e-5."""
    import torch

    from megadigpt.distributed.parallelize import apply_compile
    from megadigpt.model.classifier import EncoderGeometry, build_classifier

    geom = EncoderGeometry(32, 2, 2, 2.0, 8)
    torch.manual_seed(0)
    eager = build_classifier(geom, 16, 5)
    compiled = build_classifier(geom, 16, 5)
    compiled.load_state_dict(eager.state_dict())
    compiled.set_grad_checkpointing(True)
    assert apply_compile(compiled) == geom.depth
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    losses = []
    for model in (eager, compiled):
        loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5, losses
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert all(getattr(blk, "_compiled_call_impl", None) is not None for blk in compiled.blocks)

"""Semantic segmentation transfer: the model's pyramid and heads at the real 512 px / patch 14 and 16 geometry,
mmseg's metric arithmetic on planted cases, sliding-window inference, and the whole loop (real DeepSpeed engines
on gloo, real checkpoints, SIGTERM and resume, 2 ranks) on a real composite set: Fashion-MNIST items on CIFAR-10
photos (skipped where the Debian package dataset-fashion-mnist or the shared CIFAR-10 shards are absent)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megadigpt.model.segmentation import (Segmentor, SegmentorArgs, default_feature_blocks, encoder_size,
                                          segment_param_groups, segmentation_loss)
from megadigpt.train.seg_metrics import confusion, metrics_from_confusion, reduce_zero_label

from .conftest import REPO, free_port, subprocess_env


def _tiny(patch, crop=512, classes=7, aux=True, depth=4):
    torch.manual_seed(0)
    args = SegmentorArgs(embed_dim=16, depth=depth, num_heads=2, mlp_ratio=2.0, patch_size=patch, crop_size=crop,
                         num_classes=classes, feature_blocks=tuple(default_feature_blocks(depth)), channels=16,
                         aux_channels=8)
    return Segmentor(args, aux=aux)


# ----------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("patch", [14, 16])
def test_pyramid_shapes_at_512(patch):
    """The 4 levels sit at 1/4, 1/8, 1/16, 1/32 of the 512 crop for patch 16 (exact) and patch 14 (the encoder
    at 518 = 37 x 14, its 37 x 37 grid, the levels resized to the strides)."""
    model = _tiny(patch).eval()
    assert model.backbone.patch_embed.grid_size == ((37, 37) if patch == 14 else (32, 32))
    assert encoder_size(512, patch) == (518 if patch == 14 else 512)
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, encoder_size(512, patch), encoder_size(512, patch)))
        levels = model.levels(torch.randn(2, 3, 512, 512))
    g = 512 // patch if patch == 16 else 37
    assert [tuple(f.shape) for f in feats] == [(1, 16, g, g)] * 4
    assert [tuple(x.shape) for x in levels] == [(2, 16, 512 // s, 512 // s) for s in (4, 8, 16, 32)]
    assert default_feature_blocks(12) == [3, 5, 7, 11] and default_feature_blocks(24) == [7, 11, 15, 23]


def test_upernet_output_and_auxiliary_loss():
    model = _tiny(16, crop=128).train()
    x = torch.randn(2, 3, 128, 128)
    y = torch.randint(0, 7, (2, 128, 128))
    y[:, :20] = 255  # ignored rows
    out, aux = model(x)
    assert out.shape == (2, 7, 32, 32) and aux.shape == (2, 7, 8, 8)
    total, main, a = segmentation_loss(out, aux, y, aux_weight=0.4)
    up = lambda t: F.interpolate(t, size=(128, 128), mode="bilinear", align_corners=False)  # noqa: E731
    want_main = F.cross_entropy(up(out), y, ignore_index=255)
    want_aux = F.cross_entropy(up(aux), y, ignore_index=255)
    assert torch.allclose(main, want_main, atol=1e-5) and torch.allclose(a, want_aux, atol=1e-5)
    assert torch.allclose(total, want_main + 0.4 * want_aux, atol=1e-5)
    total.backward()
    assert model.auxiliary_head.conv_seg.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    assert model.predict(torch.randn(1, 3, 96, 160)).shape == (1, 7, 96, 160)  # whole image, non-square
    no_aux = _tiny(16, crop=128, aux=False).train()
    assert no_aux(x)[1] is None
    groups = segment_param_groups(model, 0.05, 0.5)
    head = [g for g in groups if any(p is model.decode_head.conv_seg.weight for p in g["params"])][0]
    emb = [g for g in groups if any(p is model.backbone.patch_embed.proj.weight for p in g["params"])][0]
    assert head["lr_scale"] == 1.0 and emb["lr_scale"] == pytest.approx(0.5 ** 5)


# ----------------------------------------------------------------------------------------- metrics

def test_miou_matches_a_direct_computation_with_ade20k_protocol():
    """Raw ADE20K-style masks (0 = other, ignored; k -> k - 1) over two images: a class only in image 1, a
    class predicted but never present (IoU 0, counted), a class nowhere (NaN, left out), a 255 pixel."""
    rng = np.random.default_rng(0)
    K = 6
    raw = [rng.integers(0, 5, (12, 9)).astype(np.uint8), rng.integers(0, 4, (7, 11)).astype(np.uint8)]
    raw[0][0, :4] = 5  # class 5 -> 4, only in image 0
    raw[1][3, 3] = 255
    labels = [reduce_zero_label(r) for r in raw]
    assert (labels[0][raw[0] == 0] == 255).all() and (labels[0][raw[0] == 3] == 2).all()
    assert labels[1][3, 3] == 255
    preds = [np.where(rng.random(lab.shape) < 0.6, lab, rng.integers(0, 4, lab.shape)).astype(np.int64)
             for lab in labels]
    preds[1][0, 0] = 3  # predicted in image 1 (where 3 may be absent from its ground truth)
    conf = sum(confusion(torch.from_numpy(p), torch.from_numpy(lab.astype(np.int64)), K)
               for p, lab in zip(preds, labels))
    got = metrics_from_confusion(conf)
    valid = [lab != 255 for lab in labels]
    P = np.concatenate([p[v] for p, v in zip(preds, valid)])
    L = np.concatenate([lab[v] for lab, v in zip(labels, valid)]).astype(np.int64)
    ious = []
    for c in range(K):
        inter, union = np.sum((P == c) & (L == c)), np.sum((P == c) | (L == c))
        ious.append(np.nan if union == 0 else inter / union)
    assert np.isnan(ious[5]) and got["IoU"][5] is None  # class 5: nowhere
    assert got["mIoU"] == pytest.approx(100 * np.nanmean(ious))
    assert got["aAcc"] == pytest.approx(100 * np.mean(P == L))
    assert got["pixels"] == len(L) and got["classes_present"] == 5
    for c in range(5):
        assert got["IoU"][c] == pytest.approx(100 * ious[c])


def test_sliding_window_equals_whole_image_where_the_window_covers_it():
    from megadigpt.data.segmentation import num_windows, slide_windows
    from megadigpt.train.segment import infer_slide, infer_whole

    model = _tiny(16, crop=64).eval()
    img = torch.randn(3, 64, 64)
    with torch.no_grad():
        a = infer_slide(model, img, torch.float32, 64, 43, 4)
        b = infer_whole(model, img, torch.float32)
    assert a.shape == b.shape == (7, 64, 64)
    assert torch.allclose(a, b, atol=1e-5)
    # mmseg's window grid: a 512 x 683 image, 512 windows, stride 341 -> 1 x 2 windows, the last one at the edge
    assert slide_windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert num_windows(600, 1100, 512, 341) == len(slide_windows(600, 1100, 512, 341)) == 2 * 3
    cover = np.zeros((600, 1100), int)
    for y1, y2, x1, x2 in slide_windows(600, 1100, 512, 341):
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1


def test_training_augmentation_is_a_function_of_seed_epoch_index():
    from megadigpt.data.pretrain_loader import sample_rng
    from megadigpt.data.segmentation import SegAugment, augment

    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (60, 90), dtype=np.uint8)
    aug = SegAugment(crop=32, scale=(128, 48))
    a = augment(sample_rng(0, 1, 7), img, mask, aug)
    b = augment(sample_rng(0, 1, 7), img, mask, aug)
    c = augment(sample_rng(0, 2, 7), img, mask, aug)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c) if x.shape == y.shape) or a[0].shape != c[0].shape
    assert a[0].shape[:2] == a[1].shape and max(a[1].shape) <= 32


# ----------------------------------------------------------------------------------------- the loop

@pytest.fixture(scope="module")
def composite(cifar_dir, tmp_path_factory):
    from megadigpt.data import composite_seg

    if not (composite_seg.FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST absent (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("composite")
    return composite_seg.build(root, cifar_dir, n_train=32, n_val=5, size=32)


SEG = ["--config", "segment_composite", "model.arch=vit_tiny", "model.embed_dim=16", "model.depth=2",
       "model.num_heads=2", "model.patch_size=4", "model.crop_size=32", "model.channels=16", "model.aux_channels=8",
       "data.scale=[128,32]", "data.num_workers=0", "train.global_batch=8", "train.micro_batch=4",
       "train.log_every=1", "segment.eval_stride=22", "segment.eval_batch=4", "optim.warmup_steps=2"]


def _segment(args, nproc=1, check=True, **env):
    cmd = [sys.executable, "-m", "megadigpt.train.segment"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "-m", "megadigpt.train.segment"]
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600, env=subprocess_env(**env),
                          cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"segment failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train_loss" in r:
            out[r["step"]] = r["train_loss"]
    return out


def test_train_evaluate_and_resume_after_sigterm(composite, tmp_path):
    """End to end on the composite set: train, evaluate (sliding windows), export; a run stopped by SIGTERM at
    step 2 checkpoints and exits 75, and the same command resumes it to the uninterrupted run's losses, metrics
    and weights."""
    from safetensors.torch import load_file

    common = ["--train", str(composite), "--val", str(composite), "model.num_classes=11", "train.max_steps=4",
              "segment.eval_every=4"] + SEG
    _segment(["--run-dir", str(tmp_path / "a")] + common)
    res = json.loads((tmp_path / "a" / "eval" / "step00000004.json").read_text())["result"]
    assert res["images"] == 5 and res["pixels"] == 5 * 32 * 32 and 0 <= res["mIoU"] <= 100
    cfg = json.loads((tmp_path / "a" / "last" / "config.json").read_text())
    assert cfg["megadigpt"]["metrics"]["mIoU"] == pytest.approx(res["mIoU"])
    proc = _segment(["--run-dir", str(tmp_path / "b")] + common, check=False, MEGADIGPT_FAULTS="term=2")
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert not (tmp_path / "b" / "last").exists()
    _segment(["--run-dir", str(tmp_path / "b")] + common)
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(la) == [1, 2, 3, 4] and la == lb
    a, b = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    rb = json.loads((tmp_path / "b" / "eval" / "step00000004.json").read_text())["result"]
    assert rb["mIoU"] == res["mIoU"]


def test_two_ranks_count_every_validation_image_once(composite, tmp_path):
    """2 gloo ranks, 5 validation images (3 + 2): the confusion matrix covers each image's pixels once, and the
    metrics equal a single-process evaluation of the exported model."""
    from megadigpt.data.segmentation import find_pairs
    from megadigpt.segment_config import load_segment_config
    from megadigpt.train.segment import evaluate, load_export

    run = tmp_path / "r2"
    overrides = ["model.num_classes=11", "train.max_steps=2", "segment.eval_every=2"] + SEG[2:]
    _segment(["--run-dir", str(run), "--train", str(composite), "--val", str(composite)] + ["--config",
             "segment_composite"] + overrides, nproc=2)
    res = json.loads((run / "eval" / "step00000002.json").read_text())["result"]
    assert res["images"] == 5 and res["pixels"] == 5 * 32 * 32
    model = load_export(run / "last")
    cfg = load_segment_config("segment_composite", overrides)
    pairs, _ = find_pairs(str(composite), "validation")
    one = evaluate(model, pairs, cfg, model.args, torch.device("cpu"), torch.float32, 0, 1)
    assert one["pixels"] == res["pixels"] and one["mIoU"] == pytest.approx(res["mIoU"], abs=1e-9)
    assert one["IoU"] == pytest.approx(res["IoU"], abs=1e-9)


def test_bad_config_is_one_line(tmp_path, composite, capsys):
    """Before any process group: a bad value and a folder of another layout are one line, exit 2."""
    from megadigpt.train.segment import main

    base = ["--run-dir", str(tmp_path / "x"), "--val", str(composite)] + SEG[:3]
    assert main(base + ["--train", str(composite), "segment.eval_mode=tiles"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megadigpt: error: segment.eval_mode must be one of"), err
    assert main(base + ["--train", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a segmentation folder" in err[0], err
    assert main(base + ["--train", str(composite), "train.micro_batch=1", "train.global_batch=1"]) == 2
    assert "needs >= 2 images per rank" in capsys.readouterr().err


def test_memory_plan_of_the_segmentation_step(capsys):
    """The planner's rows for a segmentation step: parameters of the whole Segmentor, activations traced at the
    crop growing with the micro-batch and shrinking with activation checkpointing."""
    from megadigpt.perf import segment_memory
    from megadigpt.segment_config import load_segment_config

    cfg = load_segment_config("segment_ade20k_vitb16", ["model.embed_dim=64", "model.depth=4", "model.num_heads=2",
                                                        "model.crop_size=128", "model.channels=32"])
    rows = segment_memory.plan(cfg, 8, 80.0, [("vit_base", 16)], stages=(1,), ckpts=(False, True), micro_batch=2)
    off, on = rows
    assert off.teacher_gib == 0 and off.params_gib > 0 and off.fits and off.max_micro_batch > 2
    assert on.activations_gib < off.activations_gib
    geom = segment_memory._geometry(cfg, "vit_base", 16)
    P, _ = segment_memory.segment_params(cfg, geom)
    model = Segmentor(SegmentorArgs(64, 4, 2, 4.0, 16, 128, 150, (0, 1, 2, 3), channels=32))
    assert P == sum(p.numel() for p in model.parameters())
    a2, a4 = (segment_memory.trace_segment_step(cfg, geom, b, "bf16") for b in (2, 4))
    assert a4 > a2 > 0
    import argparse

    over = ["model.embed_dim=64", "model.depth=4", "model.num_heads=2", "model.crop_size=128", "model.channels=32"]
    assert segment_memory.is_segment_config("segment_ade20k_vitb16") and not segment_memory.is_segment_config("demo")
    ns = argparse.Namespace(config="segment_ade20k_vitb16", overrides=over, models="vit_base/16", gpus=8,
                            gpu_mem=80.0, zero="1", ckpt="off,on", offload="off", micro_batch=2, precision="bf16",
                            reserve=4.0, json=None)
    assert segment_memory.cmd_plan_segment(ns) == 0
    out = capsys.readouterr().out
    assert "crop 128" in out and out.count("| seg:vit_base/16 | 1 |") == 2

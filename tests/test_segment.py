"""Semantic segmentation transfer: the model's pyramid and heads at the real 512 px / patch 14 and 16 geometry,
mmseg's metric arithmetic on planted cases, sliding-window inference, and the whole loop (real DeepSpeed engines
on gloo, real checkpoints, SIGTERM and resume, 2 ranks) on a real composite set: Fashion-MNIST items on CIFAR-10
photos (skipped where the Debian package dataset-fashion-mnist or the shared CIFAR-10 shards are absent). Also the
segmentation stage of `megadigpt submit` (dry runs: the scripts, the chain's dependency and init-from) and the
segmentation step in `megadigpt bench` (real engines, 2 gloo ranks)."""

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
    # 24 training images: 3 steps an epoch on 1 rank (batch 8 = 4 x 2 accumulated) and on 2; a run of 4 steps
    # stopped at step 2 resumes inside its first epoch and goes on into the second
    return composite_seg.build(root, cifar_dir, n_train=24, n_val=5, size=32)


SEG = ["--config", "segment_composite", "model.arch=vit_tiny", "model.embed_dim=16", "model.depth=2",
       "model.num_heads=2", "model.patch_size=4", "model.crop_size=32", "model.channels=16", "model.aux_channels=8",
       "data.scale=[128,32]", "data.num_workers=0", "train.global_batch=8", "train.micro_batch=4",
       "train.log_every=1", "segment.eval_stride=22", "segment.eval_batch=4", "optim.warmup_steps=2"]


def _segment(args, nproc=1, check=True, **env):
    """``python -m megadigpt.train.segment ARGS`` as ``nproc`` ranks, each process given its rank, world size and
    rendezvous in the environment (as torchrun or srun give them, without a launcher process of its own).
    -> (exit code, rank 0's stderr): the first non-zero exit code of the ranks."""
    import tempfile

    cmd = [sys.executable, "-m", "megadigpt.train.segment"] + list(args)
    port = str(free_port())
    procs = []
    for r in range(nproc):
        e = subprocess_env(**env)
        if nproc > 1:
            e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        err = tempfile.TemporaryFile("w+")  # (files, not pipes: a rank blocked on a full pipe would stall the rest)
        procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=e,
                                       cwd=str(REPO)), err))
    codes = []
    for proc, _ in procs:
        try:
            codes.append(proc.wait(timeout=600))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise
    errs = []
    for _, err in procs:
        err.seek(0)
        errs.append(err.read())
        err.close()
    code = next((c for c in codes if c), 0)
    if check and code != 0:
        raise AssertionError(f"segment failed ({codes}):\n{errs[0][-4000:]}")
    return code, errs[0]


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
    code, err = _segment(["--run-dir", str(tmp_path / "b")] + common, check=False, MEGADIGPT_FAULTS="term=2")
    assert code == 75, err[-2000:]
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

    over = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.crop_size=128", "model.channels=32"]
    cfg = load_segment_config("segment_ade20k_vitb16", over)
    rows = segment_memory.plan(cfg, 8, 80.0, [("vit_base", 16)], stages=(1,), ckpts=(False, True), micro_batch=2)
    off, on = rows
    assert off.teacher_gib == 0 and off.params_gib > 0 and off.fits and off.max_micro_batch > 2
    assert on.activations_gib < off.activations_gib
    geom = segment_memory.encoder_geometry(cfg, "vit_base", 16)
    P, _ = segment_memory.segment_params(cfg, geom)
    model = Segmentor(SegmentorArgs(64, 2, 2, 4.0, 16, 128, 150, tuple(default_feature_blocks(2)), channels=32))
    assert P == sum(p.numel() for p in model.parameters())
    a2, a3 = (segment_memory.trace_segment_step(cfg, geom, b, "bf16") for b in (2, 3))  # (traced by plan above)
    assert a3 > a2 > 0
    import argparse

    assert segment_memory.is_segment_config("segment_ade20k_vitb16") and not segment_memory.is_segment_config("demo")
    ns = argparse.Namespace(config="segment_ade20k_vitb16", overrides=over, models="vit_base/16", gpus=8,
                            gpu_mem=80.0, zero="1", ckpt="off,on", offload="off", micro_batch=2, precision="bf16",
                            reserve=4.0, json=None)
    assert segment_memory.cmd_plan_segment(ns) == 0
    out = capsys.readouterr().out
    assert "crop 128" in out and out.count("| seg:vit_base/16 | 1 |") == 2


# ----------------------------------------------------------------------------------------- SLURM stage

def _ade_root(tmp_path):
    """An ADE20K-shaped folder: what a dry run checks of segmentation data (the layout, nothing decoded)."""
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    return root


def _submit(args, capfd):
    """``megadigpt submit ARGS`` in this process -> (exit code, stdout, stderr lines)."""
    from megadigpt.cli import main

    capfd.readouterr()
    code = main(["submit"] + [str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err.strip().splitlines()


def test_submit_chains_pretrain_to_segment(tmp_path, capfd, monkeypatch):
    """A chain pretrain -> segment: the segmentation stage waits on the pretraining job (afterok, cancelled if it
    fails), starts from its run directory (which does not exist yet: a pending input, not an error), writes to
    its own, and is planned for the job's ranks and device (CPU tasks here: BatchNorm needs 2 images per rank;
    GPUs: SyncBatchNorm counts the whole batch). A bad segmentation override is one line, exit 2, nothing
    written."""
    import yaml

    from .conftest import TINY

    ade, root = _ade_root(tmp_path), tmp_path / "runs"
    seg_args = ["--train", str(ade), "--val", str(ade), "train.global_batch=4", "train.micro_batch=2"]

    def chain(seg_extra=(), seg_slurm=None):
        path = tmp_path / "chain.yaml"
        path.write_text(yaml.safe_dump({"run_root": str(root), "slurm": {"gpus_per_node": 0, "time": "00:10:00",
                                                                          "signal_seconds": 60},
            "stages": [{"name": "pretrain", "command": "pretrain", "args": ["--data", str(tmp_path / "train.jsonl")]
                        + TINY + ["train.global_batch=8", "train.micro_batch=4", "train.max_steps=6"]},
                       {"name": "ade", "command": "segment", "config": "segment_ade20k_vitb16",
                        "init_from": "{pretrain}", "args": seg_args + list(seg_extra),
                        "slurm": seg_slurm or {"ntasks_per_node": 2}}]}))
        return path

    code, out, err = _submit(["--dry-run", "--partition", "cpu", chain()], capfd)
    assert code == 0, err
    assert out.count("#!/bin/bash") == 2 and out.count("#SBATCH --partition=cpu") == 2
    seg = out.split("# ---- stage ade: ")[1]
    assert seg.startswith(f"sbatch --dependency=afterok:<job of pretrain> --kill-on-invalid-dep=yes "
                          f"{root / 'ade' / 'slurm' / 'job.sbatch'}")
    assert "# megadigpt segment (ade)" in seg and "#SBATCH --ntasks-per-node=2" in seg
    assert (f"segment --init-from {root / 'pretrain'} --run-dir {root / 'ade'} --config segment_ade20k_vitb16 "
            f"--train {ade} --val {ade} train.global_batch=4 train.micro_batch=2") in seg
    assert "srun --kill-on-bad-exit=1" in seg and "#SBATCH --signal=USR1@60" in seg and "#SBATCH --requeue" in seg
    assert not any("init_from" in ln for ln in err), err  # the pretraining run is pending, not missing
    assert not root.exists()

    # planned for the job's device: 1 image per rank on CPU tasks is refused, on GPUs (SyncBatchNorm) it is not
    one = ["train.global_batch=2", "train.micro_batch=1"]
    code, _, err = _submit(["--dry-run", chain(one)], capfd)
    assert code == 2 and len(err) == 1 and "needs >= 2 images per rank" in err[0], err
    code, _, err = _submit(["--dry-run", chain(one, {"gpus_per_node": 2})], capfd)
    assert code == 0, err
    # a bad override of the segmentation stage: one line, exit 2, before anything is written
    code, out, err = _submit(["--dry-run", chain(["segment.eval_mode=tiles"])], capfd)
    assert code == 2 and len(err) == 1 and err[0].startswith("megadigpt: error: segment.eval_mode must be one of")
    assert "#!/bin/bash" not in out and not root.exists()

    # the shipped chain (slurm/chains/vitl14_ade20k.yaml): the paper's L, pretraining -> ADE20K, one afterok
    from megadigpt.launch.slurm import SLURM_DIR

    monkeypatch.chdir(tmp_path)
    code, out, err = _submit(["--dry-run", Path(SLURM_DIR) / "chains" / "vitl14_ade20k.yaml"], capfd)
    assert code == 0, err
    shipped = tmp_path / "runs" / "vitl14_merged"
    ade = out.split("# ---- stage ade20k: ")[1]
    assert ade.startswith("sbatch --dependency=afterok:<job of pretrain> --kill-on-invalid-dep=yes")
    assert f"segment --init-from {shipped / 'pretrain'} --run-dir {shipped / 'ade20k'} --config " \
           "segment_ade20k_vitl14" in ade and "#SBATCH --nodes=1" in ade and "#SBATCH --gpus-per-node=8" in ade
    assert not (tmp_path / "runs").exists()


def test_submit_a_single_segment_stage(tmp_path, capfd):
    """``megadigpt submit segment ...``: the config's run directory unless --run-dir, made absolute; weights not
    on this machine are a warning in a dry run (the cluster has them); a bad value is one line, exit 2."""
    from megadigpt.launch import slurm

    ade = _ade_root(tmp_path)
    base = ["--dry-run", "--gpus-per-node", 0, "--ntasks-per-node", 2, "segment", "--train", ade, "--val", ade,
            "train.global_batch=4", "train.micro_batch=2"]
    code, out, err = _submit(base + ["--init-from", tmp_path / "elsewhere" / "run", "--run-dir", tmp_path / "seg"],
                             capfd)
    assert code == 0, err
    assert out.count("#!/bin/bash") == 1 and "--dependency" not in out
    assert f"segment --run-dir {tmp_path / 'seg'} --train {ade}" in out
    assert any(ln.startswith("megadigpt submit: warning: train.init_from not found") for ln in err), err
    # data not on this machine (the cluster mounts it): a warning in a dry run, an error in a real submission
    gone = tmp_path / "not_here"
    code, out, err = _submit(base + ["--val", gone, "model.arch=vit_tiny"], capfd)
    assert code == 0 and out.count("#!/bin/bash") == 1, err
    assert any(ln.startswith(f"megadigpt submit: warning: data source not found: {gone}") for ln in err), err
    code, out, err = _submit(base[1:] + ["--val", gone, "model.arch=vit_tiny"], capfd)
    assert code == 2 and len(err) == 1 and f"data source not found: {gone}" in err[0], err
    stage = slurm.single_stage("segment", ["--config", "segment_ade20k_vitl14", "model.arch=vit_tiny"], {})
    assert stage.run_dir == str(Path("runs/segment_ade20k_vitl14").resolve())
    code, out, err = _submit(base + ["model.arch=vit_tiny", "model.crop_size=0"], capfd)
    assert code == 2 and len(err) == 1 and err[0].startswith("megadigpt: error: model.crop_size"), err
    assert "#!/bin/bash" not in out
    # the shipped script of the stage (slurm.TEMPLATES): one node of 8 GPUs x micro-batch 2 = the recipe's 16
    script = slurm.render_template("segment_ade20k")
    assert "megadigpt segment --config segment_ade20k_vitl14" in script and "#SBATCH --nodes=1\n" in script
    assert '"$@"' in script and "--init-from RUN" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


# ----------------------------------------------------------------------------------------- bench

TINY_SEG = ["model.embed_dim=16", "model.depth=2", "model.num_heads=2", "model.crop_size=32", "model.channels=16",
            "model.aux_channels=8"]


def test_bench_measures_the_segmentation_step(tmp_path, capfd):
    """``megadigpt bench --config segment_ade20k_vitb16``: the Segmentor's training step on 2 gloo ranks (real
    engines), its images/s, step-time breakdown, peak memory beside the segmentation planner's, and MFU, in the
    bench table; the crop is the config's. Bad input fails before any work."""
    from megadigpt.cli import main

    out = tmp_path / "bench"
    args = ["bench", "--config", "segment_ade20k_vitb16", "--models", "vit_tiny/4", "--micro-batch", "2",
            "--ranks", "2", "--steps", "2", "--warmup", "1", "--rounds", "1", "--no-baseline", "--out", str(out)]
    assert main(args[:-2] + ["--data", "torch", "--out", str(tmp_path / "x")] + TINY_SEG) == 2
    assert main(args[:-2] + ["--micro-batch", "1", "--out", str(tmp_path / "x")] + TINY_SEG) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert "synthetic inputs only" in err[0] and "needs >= 2 images per rank" in err[1], err
    assert not (tmp_path / "x").exists()
    assert main(args + TINY_SEG) == 0
    printed = capfd.readouterr().out
    rep = json.loads((out / "bench.json").read_text())
    [row] = rep["rows"]
    c, x = row["case"], row["result"]
    assert c["task"] == "segment" and c["img_size"] == 32 and c["teacher"] == "none", c
    assert x["status"] == "ok", x
    assert x["world_size"] == 2 and x["images_per_s"] == pytest.approx(2 * 2 / x["step_s"])
    assert sum(x["phases_s"].values()) == pytest.approx(x["synced_step_s"], rel=0.1)
    assert x["phases_s"]["teacher"] < 0.01 * x["synced_step_s"] and x["flops_teacher_fwd"] == 0
    assert x["comm_s"] > 0 and x["student_params"] > 0 and np.isfinite(x["loss"])
    assert 0 < x["mfu_student"] < 1 and x["flops_student_fwd"] > 0
    assert x["peak_gib"] > 0 and x["planned_gib"] > 0 and 0.5 <= x["measured_over_planned"] <= 1.5, x
    md = (out / "bench.md").read_text()
    assert "| seg:vit_tiny/4@32 | none | z1 sdpa |" in md and md in printed

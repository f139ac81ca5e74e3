"""``megadigpt clip``: image-text contrastive fine-tuning as a task of the run harness (issue 31).

Real components: open_clip's text tower, tokenizer, ``ClipLoss`` and zero-shot classifier builder; DeepSpeed
engines on 2 gloo ranks under ZeRO-1 and ZeRO-3; captioned webdataset shards written as img2dataset writes them,
from real CIFAR-10 JPEGs."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import REPO, free_port, run_cli, subprocess_env

TINY = ["model.arch=vit_tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4",
        "text.width=32", "text.layers=1", "text.heads=2", "text.embed_dim=16", "text.context_length=16",
        "data.num_workers=0", "optim.warmup_steps=1", "train.log_every=1", "train.progress=off",
        "train.tensorboard=false", "train.device=cpu", "train.precision=fp32", "train.global_batch=8",
        "train.micro_batch=4", "train.max_steps=4", "train.ckpt_every=1000"]


@pytest.fixture(scope="module")
def pairs(cifar_dir, tmp_path_factory):
    """Captioned CIFAR-10 (open_clip's simple templates of the class names), 48 training and 16 held-out pairs,
    with .cls labels and classes.txt, so the held-out shard is also the zero-shot set."""
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    from megadigpt.data.captions import caption_labelled

    root = tmp_path_factory.mktemp("pairs")
    train = caption_labelled(str(cifar_dir / "train-000000.tar"), root, SIMPLE_IMAGENET_TEMPLATES, limit=48,
                             name="train")[0]
    val = caption_labelled(str(cifar_dir / "test-000000.tar"), root, SIMPLE_IMAGENET_TEMPLATES, limit=16, seed=1,
                           name="val")[0]
    return {"train": train, "val": val, "root": root}


def _args(pairs, run_dir, *extra):
    return ["clip", "--config", "clip_cifar10", "--train", pairs["train"], "--val", pairs["val"], "--zeroshot",
            pairs["val"], "--run-dir", str(run_dir), *TINY, *extra]


def _losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train_loss" in r:
            out[r["step"]] = r["train_loss"]
    return out


LOSS_CHECK = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from open_clip import ClipLoss
    from megadigpt.train.clip import masked_clip_loss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    B, D = 6, 8
    img_all = torch.nn.functional.normalize(torch.randn(world * B, D, generator=g), dim=-1)
    txt_all = torch.nn.functional.normalize(torch.randn(world * B, D, generator=g), dim=-1)
    valid_all = torch.ones(world * B, dtype=torch.bool)
    valid_all[[2, B + 4]] = False  # one bad pair on each rank
    scale = torch.tensor(14.0)
    out = {}
    for local_loss in (True, False):
        for masked in (False, True):
            img = img_all[rank * B:(rank + 1) * B].clone().requires_grad_(True)
            txt = txt_all[rank * B:(rank + 1) * B].clone().requires_grad_(True)
            valid = valid_all[rank * B:(rank + 1) * B] if masked else torch.ones(B, dtype=torch.bool)
            fn = ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world)
            loss = masked_clip_loss(fn, img, txt, scale, valid, world, rank)
            n = torch.tensor([float(valid.sum())])
            both = torch.stack([loss.detach() * n[0], n[0]])
            dist.all_reduce(both)
            out[f"local={local_loss},masked={masked}"] = (both[0] / both[1]).item()
    if rank == 0:  # the references: OpenCLIP's loss on the whole gathered batch, in one process
        ref = ClipLoss()
        out["ref_all"] = ref(img_all, txt_all, scale).item()
        out["ref_valid"] = ref(img_all[valid_all], txt_all[valid_all], scale).item()
        print(json.dumps(out))
    dist.destroy_process_group()
""")


def test_loss_is_openclips_on_the_features_gathered_across_ranks(tmp_path):
    """2 gloo ranks, OpenCLIP's ClipLoss with gather_with_grad and local_loss on and off: the ranks' loss (weighted
    by their valid pairs) equals ClipLoss on the whole batch in one process; with a bad pair on each rank, it
    equals ClipLoss on the valid pairs alone (their rows dropped, their columns no negatives)."""
    script = tmp_path / "loss_check.py"
    script.write_text(LOSS_CHECK)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script)], capture_output=True, text=True, timeout=300,
                       env=subprocess_env(), cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    for local in (True, False):
        assert got[f"local={local},masked=False"] == pytest.approx(got["ref_all"], rel=1e-6), got
        assert got[f"local={local},masked=True"] == pytest.approx(got["ref_valid"], rel=1e-6), got
    assert abs(got["ref_valid"] - got["ref_all"]) > 1e-3  # the bad pairs made a difference to leave out


@pytest.fixture(scope="module")
def resumed_runs(pairs, tmp_path_factory):
    """2 gloo ranks, one process pair for the three runs (tests/config_matrix_runner.py): ZeRO-1 uninterrupted,
    and ZeRO-3 stopped by SIGTERM after step 2, then resumed by the same command."""
    root = tmp_path_factory.mktemp("clip_runs")
    a, b = root / "zero1", root / "zero3"
    plan = [{"name": "zero1", "argv": _args(pairs, a, "train.zero_stage=1"), "env": {"MEGADIGPT_FAULTS": ""}},
            {"name": "zero3.preempted", "argv": _args(pairs, b, "train.zero_stage=3"),
             "env": {"MEGADIGPT_FAULTS": "term=2"}},
            {"name": "zero3.resumed", "argv": _args(pairs, b, "train.zero_stage=3"), "env": {"MEGADIGPT_FAULTS": ""}}]
    (root / "plan.json").write_text(json.dumps(plan))
    out = root / "results.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(REPO / "tests" / "config_matrix_runner.py"), str(root / "plan.json"),
                        str(out)], capture_output=True, text=True, timeout=1200, env=subprocess_env(), cwd=str(REPO))
    results = json.loads(out.read_text()) if out.is_file() else {}
    assert len(results) == len(plan), f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return root, results


def test_two_rank_runs_under_zero1_and_zero3_resume_after_sigterm_with_the_same_losses(resumed_runs):
    """2 gloo ranks, fp32: ZeRO-3 stopped by SIGTERM after step 2 (checkpoint, exit 75) and resumed by the same
    command logs the losses of the uninterrupted ZeRO-1 run (the ZeRO stage changes no numerics in fp32); zero-shot
    top-1 and retrieval are logged, best/ and last/ exported and loadable."""
    import torch

    from megadigpt.train.clip import load_export

    root, res = resumed_runs
    assert res["zero1"]["exit"] == 0, res["zero1"]
    assert res["zero3.preempted"]["exit"] == 75, res["zero3.preempted"]
    assert res["zero3.resumed"]["exit"] == 0, res["zero3.resumed"]
    a, b = _losses(root / "zero1"), _losses(root / "zero3")
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (a, b)
    for run in ("zero1", "zero3"):
        recs = [json.loads(ln) for ln in (root / run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in recs if "zeroshot_top1" in r and "event" not in r][-1]
        assert last["step"] == 4 and last["zeroshot_images"] == 16 and last["val_pairs"] == 16
        assert 0 <= last["zeroshot_top1"] <= last["zeroshot_top5"] <= 100
        model, tokenizer = load_export(root / run / "last")
        with torch.no_grad():
            f = model.encode_text(tokenizer(["a photo of a cat."]), normalize=True)
        assert f.shape == (1, 16) and torch.isfinite(f).all()


def test_zero_shot_of_a_planted_case_is_exact():
    """Text features built to be the class prototypes and images whose features are their class's prototype
    (plus a little noise), except 3 of 20 planted on another class: open_clip's classifier builder and fine-tuning's
    evaluate give exactly 17/20 top-1."""
    import torch

    from megadigpt.train.clip import ZeroShotHead
    from megadigpt.train.finetune import evaluate

    K, D = 5, 16
    protos = torch.nn.functional.normalize(torch.randn(K, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    names = [f"class{i}" for i in range(K)]

    class Planted(torch.nn.Module):  # our model: text -> its class's prototype, image -> a planted feature
        def encode_text(self, tokens, normalize=False):
            return protos[tokens[:, 0]]

        def encode_image(self, x):
            return x[:, 0, 0, :D]

    def tokenize(texts):
        return torch.tensor([[int(t.split("class")[1].split()[0].strip(".,"))] for t in texts])

    from open_clip import build_zero_shot_classifier

    classifier = build_zero_shot_classifier(Planted(), tokenize, names, ["a photo of a {}.", "{}"],
                                            num_classes_per_batch=2, device="cpu")
    labels = torch.arange(20) % K
    planted = labels.clone()
    planted[[1, 7, 13]] = (labels[[1, 7, 13]] + 1) % K
    feats = protos[planted] + 0.01 * torch.randn(20, D, generator=torch.Generator().manual_seed(1))
    x = torch.zeros(20, 3, 1, D)
    x[:, 0, 0] = feats
    batches = [{"image": x[i:i + 4], "label": labels[i:i + 4], "valid": torch.ones(4, dtype=torch.bool)}
               for i in range(0, 20, 4)]
    res = evaluate(ZeroShotHead(Planted(), classifier), batches, 5, 4, torch.device("cpu"), torch.float32, 1)
    assert res["top1"] == pytest.approx(100 * 17 / 20) and res["images"] == 20


def test_missing_text_weights_are_one_line(pairs, tmp_path):
    for extra, msg in ((["text.random_weights=false"], "text.weights is not set"),
                       (["text.random_weights=false", f"text.weights={tmp_path / 'nope.pt'}"],
                        "text.weights not found"),
                       (["text.model=ViT-Q-99"], "is not an open_clip model")):
        p = run_cli(_args(pairs, tmp_path / "r", *extra), check=False)
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1 and msg in lines[0], p.stderr[-2000:]
        assert not (tmp_path / "r" / "checkpoints").exists()


def test_pairs_without_caption_or_with_a_bad_one_are_counted_bad_samples(cifar_dir, pairs, tmp_path):
    """A shard whose images have no .txt, and captions that are not UTF-8 or empty: each pair is a bad sample with
    its reason in bad_samples.jsonl, left out of the loss; the run completes."""
    from megadigpt.data import find_samples
    from megadigpt.data.captions import write_captioned_shard

    imgs = [s.read() for s in find_samples(str(cifar_dir / "train-000000.tar"))[:16]]
    rows = []
    for i, jpeg in enumerate(imgs):
        caption = b"a photo of a thing." if i % 4 else None  # every 4th: no caption member at all
        if i == 5:
            caption = b"caf\xe9 latin-1"
        if i == 6:
            caption = b"   "
        rows.append((f"k{i:03d}", jpeg, caption))
    shard = tmp_path / "bad-000000.tar"
    write_captioned_shard(shard, rows)
    run = tmp_path / "run"
    run_cli(["clip", "--config", "clip_cifar10", "--train", str(shard), "--run-dir", str(run), *TINY,
             "train.max_steps=2", "train.micro_batch=8", "train.global_batch=8"])
    recs = [json.loads(ln) for ln in (run / "bad_samples.jsonl").read_text().splitlines()]
    reasons = {r["key"]: r["reason"] for r in recs}
    assert reasons["k000"].startswith("no caption") and reasons["k004"].startswith("no caption")
    assert "not UTF-8" in reasons["k005"] and reasons["k006"] == "empty caption"
    assert len(reasons) == 6  # k000, k004, k005, k006, k008, k012
    losses = _losses(run)
    assert sorted(losses) == [1, 2] and all(v == v for v in losses.values())

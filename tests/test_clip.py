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
    return {"train": train, "val": val, "root": root, "cifar": str(cifar_dir / "test-000000.tar")}


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
    from open_clip.loss import SigLipLoss
    from megadigpt.train.clip import masked_siglip_loss

    bias = torch.tensor(-3.0)
    grads = {}
    for masked in (False, True):  # SigLIP: the loss and the gradients of every rank's features
        img = img_all[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        txt = txt_all[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        valid = valid_all[rank * B:(rank + 1) * B] if masked else torch.ones(B, dtype=torch.bool)
        fn = SigLipLoss(rank=rank, world_size=world)
        loss = masked_siglip_loss(fn, img, txt, scale, bias, valid, world, rank)
        n = float(valid.sum())
        (loss * n).backward()  # the ranks' summed terms: the single-process loss times its pairs
        both = torch.stack([loss.detach() * n, torch.tensor(n)])
        dist.all_reduce(both)
        out[f"siglip,masked={masked}"] = (both[0] / both[1]).item()
        g = [torch.zeros(B, D) for _ in range(world)], [torch.zeros(B, D) for _ in range(world)]
        dist.all_gather(g[0], img.grad)
        dist.all_gather(g[1], txt.grad)
        grads[masked] = (torch.cat(g[0]), torch.cat(g[1]))
    if rank == 0:  # the references: OpenCLIP's losses on the whole gathered batch, in one process
        ref = ClipLoss()
        out["ref_all"] = ref(img_all, txt_all, scale).item()
        out["ref_valid"] = ref(img_all[valid_all], txt_all[valid_all], scale).item()
        for masked, keep in ((False, torch.ones_like(valid_all)), (True, valid_all)):
            img = img_all[keep].clone().requires_grad_(True)
            txt = txt_all[keep].clone().requires_grad_(True)
            sl = SigLipLoss()(img, txt, scale, bias)
            (sl * int(keep.sum())).backward()
            out[f"siglip_ref,masked={masked}"] = sl.item()
            gi, gt = grads[masked]
            top = max(img.grad.abs().max().item(), txt.grad.abs().max().item())
            out[f"siglip_grad_err,masked={masked}"] = max((gi[keep] - img.grad).abs().max().item(),
                                                          (gt[keep] - txt.grad).abs().max().item(),
                                                          gi[~keep].abs().max().item() if (~keep).any() else 0.0,
                                                          gt[~keep].abs().max().item() if (~keep).any() else 0.0) / top
        print(json.dumps(out))
    dist.destroy_process_group()
""")


def test_loss_is_openclips_on_the_features_gathered_across_ranks(tmp_path):
    """2 gloo ranks, OpenCLIP's ClipLoss with gather_with_grad and local_loss on and off: the ranks' loss (weighted
    by their valid pairs) equals ClipLoss on the whole batch in one process; with a bad pair on each rank, it
    equals ClipLoss on the valid pairs alone (their rows dropped, their columns no negatives). The same for
    open_clip's SigLipLoss, and every feature's gradient is the single-process loss's (a bad pair's: zero)."""
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
    for masked in (False, True):  # SigLIP (open_clip's SigLipLoss, texts exchanged between neighbouring ranks)
        assert got[f"siglip,masked={masked}"] == pytest.approx(got[f"siglip_ref,masked={masked}"], rel=1e-6), got
        assert got[f"siglip_grad_err,masked={masked}"] < 1e-5, got  # relative to the largest gradient
    assert abs(got["siglip_ref,masked=True"] - got["siglip_ref,masked=False"]) > 1e-3


def _stream_shards(cifar_dir, root):
    """4 img2dataset-style shards of 12 pairs (captioned CIFAR-10); shard 0 holds 3 bad pairs: no caption, a
    caption that is not UTF-8, one of 70,000 bytes (over the 64 KiB cap: never read)."""
    from megadigpt.data import find_samples
    from megadigpt.data.captions import write_captioned_shard

    imgs = find_samples(str(cifar_dir / "train-000001.tar"))[:48]
    root.mkdir()
    for k in range(4):
        rows = [(f"s{k}_{i:03d}", imgs[12 * k + i].read(), f"a photo of thing {i % 5}.".encode()) for i in range(12)]
        if k == 0:
            rows[1], rows[2], rows[3] = ((rows[1][0], rows[1][1], None), (rows[2][0], rows[2][1], b"\xff\xfe bad"),
                                         (rows[3][0], rows[3][1], b"x" * 70000))
        write_captioned_shard(root / f"pairs-{k:06d}.tar", rows)
    return root


@pytest.fixture(scope="module")
def resumed_runs(pairs, cifar_dir, tmp_path_factory):
    """2 gloo ranks, one process pair for every run (tests/config_matrix_runner.py): ZeRO-1 uninterrupted, and
    ZeRO-3 stopped by SIGTERM after step 2, then resumed by the same command; SigLIP; stream mode over HTTP
    (preempted and resumed, the pairs each rank trained on logged)."""
    from tests.http_server import ShardServer

    root = tmp_path_factory.mktemp("clip_runs")
    a, b = root / "zero1", root / "zero3"
    shards = _stream_shards(cifar_dir, root / "stream_shards")
    plan = [{"name": "zero1", "argv": _args(pairs, a, "train.zero_stage=1"), "env": {"MEGADIGPT_FAULTS": ""}},
            {"name": "zero3.preempted", "argv": _args(pairs, b, "train.zero_stage=3"),
             "env": {"MEGADIGPT_FAULTS": "term=2"}},
            {"name": "zero3.resumed", "argv": _args(pairs, b, "train.zero_stage=3"), "env": {"MEGADIGPT_FAULTS": ""}},
            {"name": "siglip", "argv": _args(pairs, root / "siglip", "train.zero_stage=3", "clip.loss=siglip"),
             "env": {"MEGADIGPT_FAULTS": ""}}]
    with ShardServer(shards) as srv:
        stream = ["clip", "--config", "clip_cifar10", "--train", srv.url("pairs-{000000..000003}.tar"), "--run-dir",
                  str(root / "stream"), *TINY, "train.zero_stage=1", "data.shuffle_buffer=4", "train.ckpt_every=2"]
        plan += [{"name": "stream.preempted", "argv": stream,
                  "env": {"MEGADIGPT_FAULTS": "term=2", "MEGADIGPT_TRAINED_LOG": str(root / "trained_first")}},
                 {"name": "stream.resumed", "argv": stream,
                  "env": {"MEGADIGPT_FAULTS": "", "MEGADIGPT_TRAINED_LOG": str(root / "trained_second")}}]
        local = str(shards / "pairs-{000000..000003}.tar")
        plan += [{"name": "dali", "argv": ["clip", "--config", "clip_cifar10", "--train", local, "--run-dir",
                                           str(root / "dali"), *TINY, "train.zero_stage=1", "data.loader=dali",
                                           "train.max_steps=6"], "env": {"MEGADIGPT_FAULTS": ""}}]
        (root / "plan.json").write_text(json.dumps(plan))
        out = root / "results.json"
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(free_port()), str(REPO / "tests" / "config_matrix_runner.py"), str(root / "plan.json"),
                            str(out)], capture_output=True, text=True, timeout=1200, env=subprocess_env(),
                           cwd=str(REPO))
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


def test_siglip_run_learns_its_bias_and_exports_it(resumed_runs):
    """clip.loss=siglip on 2 ranks under ZeRO-3: open_clip's SigLipLoss with SigLIP's start (logit scale 10, bias
    -10), both learnt; the export carries the bias and loads back."""
    import math

    from megadigpt.train.clip import load_export

    root, res = resumed_runs
    assert res["siglip"]["exit"] == 0, res["siglip"]
    recs = [json.loads(ln) for ln in (root / "siglip" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "train_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(math.isfinite(r["train_loss"]) for r in steps)
    assert steps[0]["logit_scale"] == pytest.approx(10.0, rel=1e-2) and steps[0]["logit_bias"] < -9.0
    assert steps[-1]["logit_bias"] != steps[0]["logit_bias"]  # learnt
    model, _ = load_export(root / "siglip" / "last")
    assert model.logit_bias is not None and model.logit_bias.item() == pytest.approx(steps[-1]["logit_bias"], abs=1e-3)


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


def test_missing_text_weights_and_a_set_without_captions_are_one_line(pairs, tmp_path):
    for extra, msg in ((["text.random_weights=false"], "text.weights is not set"),
                       (["text.random_weights=false", f"text.weights={tmp_path / 'nope.pt'}"],
                        "text.weights not found"),
                       (["text.model=ViT-Q-99"], "is not an open_clip model"),
                       (["--train", pairs["cifar"]], "none of its first 16 images has a caption (no caption")):
        p = run_cli(_args(pairs, tmp_path / "r", *extra), check=False)  # (a later --train wins)
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1 and msg in lines[0], p.stderr[-2000:]
        assert not (tmp_path / "r" / "checkpoints").exists()


def test_pairs_without_caption_or_with_a_bad_one_are_counted_bad_samples(cifar_dir, pairs, tmp_path):
    """A shard whose images have no .txt, and captions that are not UTF-8 or empty: each pair is a bad sample with
    its reason in bad_samples.jsonl, left out of the loss; the run completes. (Accumulated micro-steps: warned.)"""
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
    p = run_cli(["clip", "--config", "clip_cifar10", "--train", str(shard), "--run-dir", str(run), *TINY,
                 "train.max_steps=2", "train.micro_batch=4", "train.global_batch=8"])
    # accumulation shrinks the contrastive batch: said once, at the start
    assert p.stderr.count("is reached by accumulating 2 micro-steps: each contrasts its 4 pairs") == 1, p.stderr
    recs = [json.loads(ln) for ln in (run / "bad_samples.jsonl").read_text().splitlines()]
    reasons = {r["key"]: r["reason"] for r in recs}
    assert reasons["k000"].startswith("no caption") and reasons["k004"].startswith("no caption")
    assert "not UTF-8" in reasons["k005"] and reasons["k006"] == "empty caption"
    assert len(reasons) == 6  # k000, k004, k005, k006, k008, k012
    losses = _losses(run)
    assert sorted(losses) == [1, 2] and all(v == v for v in losses.values())


def test_eval_scores_a_clip_run_zero_shot_and_by_retrieval_as_the_run_did(resumed_runs, pairs, tmp_path):
    """``megadigpt eval`` on a clip run directory (its last/): a --set's zero-shot top-1/top-5 and the --pairs
    retrieval equal what the run logged at its last evaluation on the same images (same model, templates and
    pairs); an ImageNet-family set (--a: synset folders) is scored against open_clip's ImageNet class names,
    restricted to its classes, exactly as a --set of the same images under those names; a --set without class
    names, and --pairs given for a classifier, are one line."""
    from megadigpt.data import find_samples

    root, _ = resumed_runs
    run = root / "zero1"
    logged = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "zeroshot_top1" in r and "event" not in r][-1]
    imgs = find_samples(pairs["val"])
    syn, named = tmp_path / "a", tmp_path / "named"
    for i, s in enumerate(imgs[:8]):  # n01440764 = tench, n01443537 = goldfish (open_clip's names)
        for folder in (syn / ("n01440764", "n01443537")[i % 2], named / ("tench", "goldfish")[i % 2]):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.jpg").write_bytes(s.read())
    out = tmp_path / "eval"
    run_cli(["eval", str(run), "--which", "last", "--set", f"cifar={pairs['val']}", "--pairs", f"held={pairs['val']}",
             "--a", str(syn), "--set", f"fish={named}", "--out", str(out), "--batch", "4", "--loader", "torch",
             "--workers", "0"])
    res = json.loads((out / "eval.json").read_text())
    assert res["zero_shot"]["templates"] == "simple"  # the run's clip.templates
    cifar = res["sets"]["cifar"]
    assert cifar["images"] == 16 and cifar["classes"] == 10
    assert cifar["top1"] == pytest.approx(logged["zeroshot_top1"], abs=1e-9)
    assert cifar["top5"] == pytest.approx(logged["zeroshot_top5"], abs=1e-9)
    held = res["retrieval"]["held"]
    assert held["pairs"] == 16
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert held[k] == pytest.approx(logged[f"val_{k}"], abs=1e-9), k
    a, fish = res["sets"]["a"], res["sets"]["fish"]
    assert a["images"] == fish["images"] == 8 and a["classes"] == 2
    assert (a["top1"], a["loss"]) == pytest.approx((fish["top1"], fish["loss"]), abs=1e-6)
    assert "| held |" in (out / "eval.md").read_text()

    nameless = tmp_path / "nameless-000000.tar"
    import shutil

    shutil.copy(pairs["train"], nameless)  # .cls labels, no classes.txt beside it
    for extra, msg in ((["--set", f"x={nameless}"], "names no classes"),):
        p = run_cli(["eval", str(run), "--which", "last", *extra], check=False)
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1 and msg in lines[0], p.stderr[-2000:]


def test_submit_chains_pretrain_to_clip_to_zero_shot_eval(pairs, tmp_path, capfd):
    """A chain pretrain -> clip -> eval: clip waits on the pretraining job (afterok), starts from its run directory
    (pending, not missing), is planned for the job's ranks; eval scores the clip run zero-shot with retrieval
    (pending too); a brace set in a stage's arguments is left for the command, not taken for a stage reference.
    A bad clip override is one line, exit 2, nothing written."""
    import yaml

    from megadigpt.cli import main

    from .conftest import TINY as PRETRAIN_TINY

    root = tmp_path / "runs"
    train = pairs["train"].replace("train-000000.tar", "train-{000000..000000}.tar")

    def chain(clip_extra=()):
        path = tmp_path / "chain.yaml"
        path.write_text(yaml.safe_dump({"run_root": str(root), "slurm": {"gpus_per_node": 0, "time": "00:10:00"},
            "stages": [{"name": "pretrain", "command": "pretrain", "args": ["--data", pairs["train"]] + PRETRAIN_TINY},
                       {"name": "clip", "command": "clip", "config": "clip_cifar10", "init_from": "{pretrain}",
                        "args": ["--train", train, "--zeroshot", pairs["val"], *TINY,
                                 *clip_extra], "slurm": {"ntasks_per_node": 2}},
                       {"name": "zs", "command": "eval", "model": "{clip}",
                        "args": ["--set", f"cifar={pairs['val']}", "--pairs", f"held={pairs['val']}"],
                        "slurm": {"gpus_per_node": 0, "signal_seconds": 0, "requeue": False}}]}))
        return path

    def submit(args):
        capfd.readouterr()
        code = main(["submit"] + [str(a) for a in args])
        out, err = capfd.readouterr()
        return code, out, err.strip().splitlines()

    code, out, err = submit(["--dry-run", chain()])
    assert code == 0, err
    assert out.count("#!/bin/bash") == 3
    clip_stage, zs = out.split("# ---- stage clip: ")[1], out.split("# ---- stage zs: ")[1]
    assert clip_stage.startswith("sbatch --dependency=afterok:<job of pretrain> --kill-on-invalid-dep=yes")
    assert f"clip --init-from {root / 'pretrain'} --run-dir {root / 'clip'} --config clip_cifar10 --train " \
           f"'{train}'" in clip_stage and "#SBATCH --ntasks-per-node=2" in clip_stage
    assert zs.startswith("sbatch --dependency=afterok:<job of clip> --kill-on-invalid-dep=yes")
    assert f"eval {root / 'clip'} --out {root / 'zs'} --set cifar={pairs['val']} --pairs held={pairs['val']}" in zs
    assert not any("not found" in ln for ln in err), err  # the pending runs are not missing inputs
    assert not root.exists()
    code, out, err = submit(["--dry-run", chain(["clip.loss=softmax"])])
    assert code == 2 and len(err) == 1 and err[0].startswith("megadigpt: error: clip.loss must be one of"), err
    assert "#!/bin/bash" not in out and not root.exists()


# ------------------------------------------------------------------------------------------------ plan and bench

PLAN_TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.img_size=32", "text.width=32",
             "text.layers=1", "text.heads=2", "text.embed_dim=16", "text.context_length=16"]


def test_memory_plan_of_the_clip_step(capsys):
    """The planner's rows for an image-text step: the trainable parameters of both towers (as the real model
    counts them; a frozen text tower's left out), activations traced at the image size growing with the
    micro-batch and shrinking with activation checkpointing; ``megadigpt plan`` chooses this planner for a clip
    config."""
    from megadigpt.clip_config import load_clip_config
    from megadigpt.perf import clip_memory
    from megadigpt.train.clip import build_clip, freeze_towers

    cfg = load_clip_config("clip_cifar10", PLAN_TINY)
    geom = clip_memory.encoder_geometry(cfg, "vit_tiny", 4)
    for text in ("train", "freeze"):
        cfg.clip.text = text
        real, _ = build_clip(cfg, geom)
        freeze_towers(real, cfg.clip)
        P, largest, frozen = clip_memory.clip_params(cfg, geom)
        assert P == sum(p.numel() for p in real.parameters() if p.requires_grad), text
        assert frozen == sum(p.numel() for p in real.parameters() if not p.requires_grad) and 0 < largest < P + frozen
    assert frozen > 0  # (the text tower, frozen)
    cfg.clip.text = "train"
    a1, a2, a4 = (clip_memory.trace_clip_step(cfg, geom, b, 8, "bf16") for b in (1, 2, 4))
    assert 0 < a1 < a2 < a4
    assert clip_memory.trace_clip_step(cfg, geom, 4, 8, "bf16", checkpointing=True) < a4
    off, on = clip_memory.plan(cfg, 8, 80.0, [("vit_tiny", 4)], stages=(1,), ckpts=(False, True), micro_batch=4)
    assert off.teacher_gib == 0 and off.params_gib > 0 and off.fits and on.activations_gib < off.activations_gib
    assert clip_memory.is_clip_config("clip_vitl14_laion") and not clip_memory.is_clip_config("demo")
    from megadigpt.cli import main

    assert main(["plan", "--config", "clip_cifar10", "--models", "vit_tiny/4", "--zero", "1", "--ckpt", "off",
                 "--offload", "off", *PLAN_TINY]) == 0
    out = capsys.readouterr().out
    assert "image-text step" in out and out.count("| clip:vit_tiny+ViT-B-32/4 | 1 | off | off |") == 1, out


def test_bench_measures_the_clip_step(tmp_path, capfd):
    """``megadigpt bench --config clip_cifar10``: both towers' training step on 2 gloo ranks (real engines, the
    task's loss over the gathered features), images/s, breakdown, peak memory beside the clip planner's, MFU.
    Bad input fails before any work."""
    import numpy as np

    from megadigpt.cli import main

    out = tmp_path / "bench"
    args = ["bench", "--config", "clip_cifar10", "--models", "vit_tiny/4", "--micro-batch", "4", "--ranks", "2",
            "--steps", "2", "--warmup", "1", "--rounds", "1", "--no-baseline", "--out", str(out)]
    assert main(args[:-2] + ["--data", "torch", "--out", str(tmp_path / "x")] + PLAN_TINY) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert "synthetic inputs only" in err[0], err
    assert not (tmp_path / "x").exists()
    assert main(args + PLAN_TINY) == 0
    printed = capfd.readouterr().out
    [row] = json.loads((out / "bench.json").read_text())["rows"]
    c, x = row["case"], row["result"]
    assert c["task"] == "clip" and c["img_size"] == 32 and c["teacher"] == "none", c
    assert x["status"] == "ok", x
    assert x["world_size"] == 2 and x["images_per_s"] == pytest.approx(2 * 4 / x["step_s"])
    assert x["comm_s"] > 0 and x["student_params"] > 0 and np.isfinite(x["loss"])
    assert 0 < x["mfu_student"] < 1 and x["flops_student_fwd"] > 0
    assert x["peak_gib"] > 0 and x["planned_gib"] > 0 and 0.5 <= x["measured_over_planned"] <= 1.5, x
    md = (out / "bench.md").read_text()
    assert "| clip:vit_tiny/4@32 | none | z1 sdpa |" in md and md in printed


def test_stream_mode_reads_pairs_over_http_resumes_without_repeating_one_and_counts_bad_captions(resumed_runs):
    """data.mode=auto on https-style URLs (a local HTTP server) is stream mode: 2 ranks read the 4 shards front to
    back, captions beside their images; stopped by SIGTERM after step 2 and resumed, no pair is trained on twice;
    a pair without a caption, with a non-UTF-8 one or one over 64 KiB is a bad sample named by shard URL and key."""
    root, res = resumed_runs
    assert res["stream.preempted"]["exit"] == 75, res["stream.preempted"]
    assert res["stream.resumed"]["exit"] == 0, res["stream.resumed"]
    events = [json.loads(ln) for ln in (root / "stream" / "metrics.jsonl").read_text().splitlines() if '"event"' in ln]
    start = next(e for e in events if e["event"] == "start")
    assert start["data_mode"] == "stream" and [e["step"] for e in events if e["event"] == "resume"] == [2]
    assert sorted(_losses(root / "stream")) == [1, 2, 3, 4]
    trained = []
    for name, top in (("trained_first", 2), ("trained_second", None)):
        for path in sorted(root.glob(name + ".rank*")):
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if top is None or rec["step"] <= top:
                    trained += [tuple(i) for i in rec["ids"]]
    assert len(trained) == 4 * 8 and len(set(trained)) == len(trained), "a pair was trained on twice"
    bad = [json.loads(ln) for ln in (root / "stream" / "bad_samples.jsonl").read_text().splitlines()]
    reasons = {r["key"]: r["reason"] for r in bad}
    assert all(r["path"].endswith("pairs-000000.tar") and r["path"].startswith("http") for r in bad), bad
    want = {"s0_001": "no caption", "s0_002": "not UTF-8", "s0_003": "caption of 70000 bytes"}
    for key, why in want.items():  # (each read once at most: whichever reader had shard 0 before step 4)
        if key in reasons:
            assert why in reasons[key], reasons
    assert set(reasons) <= set(want) and len(reasons) >= 1


def test_dali_decodes_the_pairs_images_and_captions_are_read_beside_them(resumed_runs):
    """data.loader=dali (on the CPU here): DALI decodes and crops the images of 2 ranks' pairs, the captions are read
    beside them; one epoch of 48 pairs trains, and the three bad captions are bad samples with their reasons."""
    import math

    root, res = resumed_runs
    assert res["dali"]["exit"] == 0, res["dali"]
    recs = [json.loads(ln) for ln in (root / "dali" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in recs if r.get("event") == "start")
    assert start["loader"] == "dali" and start["data_mode"] == "indexed"
    losses = _losses(root / "dali")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    bad = {json.loads(ln)["key"]: json.loads(ln)["reason"]
           for ln in (root / "dali" / "bad_samples.jsonl").read_text().splitlines()}
    assert bad.keys() == {"s0_001", "s0_002", "s0_003"}, bad
    assert bad["s0_001"].startswith("no caption") and "not UTF-8" in bad["s0_002"]
    assert bad["s0_003"].startswith("caption of 70000 bytes"), bad

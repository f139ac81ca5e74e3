"""``megadigpt eval`` reads its sets from any source (issue 17): class folders, local and remote shards (a real HTTP
server on 127.0.0.1), comma brace sets, ``pipe:`` commands and ImageNet-C URL templates, with each set's class
map (A/R subsets, V2's index-named classes) and the same numbers from every source of the same images."""

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from megadigpt.config import ConfigError
from tests.conftest import run_cli
from tests.http_server import Fault, ShardServer


def _write_shard(path: Path, items):
    """items: (key, jpeg bytes, label) -> a webdataset tar (key.jpg + key.cls)."""
    with tarfile.open(path, "w") as tar:
        for key, data, label in items:
            for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _folders(root: Path, items, names):
    for key, data, label in items:
        d = root / names[label]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{key}.jpg").write_bytes(data)


@pytest.fixture(scope="module")
def eval_data(cifar_dir, tmp_path_factory):
    """64 CIFAR-10 test images as class folders and as 2 shards (+ classes.txt), ImageNet-C style trees of both,
    and a tiny 10-class classifier export with CIFAR-10's label names."""
    from timm.models.vision_transformer import VisionTransformer

    from megadigpt.data import find_samples
    from megadigpt.train.finetune import export_classifier

    root = tmp_path_factory.mktemp("eval_sources")
    names = (cifar_dir / "classes.txt").read_text().split()
    items = [(s.key, s.read(), s.label) for s in find_samples(str(cifar_dir / "test-000000.tar"))[:64]]
    _folders(root / "folders", items, names)
    shards = root / "served"
    shards.mkdir()
    _write_shard(shards / "val-000000.tar", items[:40])
    _write_shard(shards / "val-000001.tar", items[40:])
    (shards / "classes.txt").write_text("\n".join(names) + "\n")
    for corr, sev in (("fog", 2), ("snow", 5)):  # two of ImageNet-C's 75 corruption/severity sources
        d = shards / "c" / corr / str(sev)
        d.mkdir(parents=True)
        _write_shard(d / "000000.tar", items)
        (d / "classes.txt").write_text("\n".join(names) + "\n")
        _folders(root / "c_local" / corr / str(sev), items, names)
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0, num_classes=10,
                global_pool="avg")
    model = VisionTransformer(**args)
    export_classifier(model.state_dict(), args, root / "model", label_names=names, run_config={})
    return root, names, items


@pytest.fixture
def clean_env(monkeypatch):
    """evaluate_sets exports RANK/WORLD_SIZE/MASTER_* (as a launched process would): restored after the test."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def _sets(out):
    return json.loads((Path(out) / "eval.json").read_text())["sets"]


def test_eval_reads_http_shards_comma_sets_pipe_and_c_templates(eval_data, tmp_path, clean_env):
    """One ``megadigpt eval`` over the same 64 images from five kinds of source gives one top-1: local class
    folders, HTTP shards by brace range, a comma set, ``pipe:cat``, an index-less subset (ImageNet-R's protocol
    over all 10 classes), and ImageNet-C from a URL template (2 of the 75 sources served, the rest 404s, listed)."""
    root, names, items = eval_data
    served = root / "served"
    with ShardServer(served) as srv:
        out = tmp_path / "eval"
        proc = run_cli(["eval", str(root / "model"), "--imagenet", str(root / "folders"),
                        "--sketch", srv.url("val-{000000..000001}.tar"),
                        "--r", srv.url("{val-000000,val-000001}.tar"),
                        "--v2", f"pipe:cat {served}/val-000000.tar",
                        "--c", srv.url("c/{corruption}/{severity}/000000.tar"),
                        "--out", str(out), "--loader", "torch", "--workers", "0", "--batch", "16",
                        "--cache-dir", str(tmp_path / "cache"), "--io-retries", "0"], check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        asked = {p for p, _ in srv.requests}
    assert "val-000001.tar" in asked and "classes.txt" in asked and "c/fog/2/000000.tar" in asked
    sets = _sets(out)
    top1 = sets["imagenet"]["top1"]
    assert sets["imagenet"]["images"] == sets["sketch"]["images"] == sets["r"]["images"] == 64
    assert sets["sketch"]["top1"] == sets["r"]["top1"] == top1
    assert sets["r"]["classes"] == 10
    # V2 names its classes 0..9 by index: the pipe'd shard has no names beside it (labels = class indices), the
    # first 40 images, which the model scores as it scored them among the 64
    assert sets["v2"]["images"] == 40
    c = sets["c"]
    assert set(c["errors"]) == {"fog", "snow"} and len(c["unreadable"]) == 73
    assert c["errors"]["fog"]["2"] == pytest.approx(1 - top1 / 100) == c["errors"]["snow"]["5"]
    assert c["missing_corruptions"] and "v2: the source names no classes" in json.loads(
        (out / "eval.json").read_text())["note"]
    assert "73 corruption/severity sources could not be read" in (out / "eval.md").read_text()
    assert "not ImageNet synsets" in (out / "eval.md").read_text()  # a CIFAR-named model under ImageNet flags: said

    # the C tree on disk gives the same errors; its unreadable list is empty
    from megadigpt.train.evaluate import evaluate_sets

    local = evaluate_sets(str(root / "model"), {"c": str(root / "c_local")}, loader="torch", num_workers=0,
                          batch=32)["sets"]["c"]
    assert local["errors"] == {"fog": {2: c["errors"]["fog"]["2"]}, "snow": {5: c["errors"]["snow"]["5"]}}
    assert local["unreadable"] == []


def test_eval_refuses_a_set_with_an_unreadable_shard(eval_data, tmp_path, monkeypatch, clean_env):
    """Training skips an unreadable shard and counts it; an evaluation scores every image of its set, so a 404 or a
    truncated remote shard is a one-line error naming it, before the model is run."""
    from megadigpt.data import remote
    from megadigpt.train.evaluate import evaluate_sets

    monkeypatch.setenv("MEGADIGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(remote, "_OPTIONS", {**remote.options(), "retries": 0})  # a 404 is not worth retrying here
    root, _, _ = eval_data
    with ShardServer(root / "served") as srv:
        srv.faults["val-000001.tar"] = Fault(status=404)
        with pytest.raises(ConfigError, match=r"--sketch: shard .*val-000001.tar could not be read.*every image"):
            evaluate_sets(str(root / "model"), {"sketch": srv.url("val-{000000..000001}.tar")}, loader="torch",
                          num_workers=0)
        srv.faults["val-000000.tar"] = Fault(status=404)
        monkeypatch.setenv("MEGADIGPT_CACHE", str(tmp_path / "cache2"))  # val-000000.tar is not cached here
        with pytest.raises(ConfigError, match="no shard of"):
            evaluate_sets(str(root / "model"), {"imagenet": srv.url("val-{000000..000001}.tar")}, loader="torch",
                          num_workers=0)
    proc = run_cli(["eval", str(root / "model"), "--c", str(root / "served" / "c" / "{corruption}")], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("megadigpt: error: --c")
    assert "{severity}" in proc.stderr


# ----------------------------------------------------------------------------------------- class maps

def _cls_folders(root: Path, classes, per=1):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per):
            (root / c / f"{i}.jpg").write_bytes(b"")


def test_imagenet_a_r_subset_mapping(tmp_path):
    """A 200-class folder maps to the model's indices of those synsets; logits outside the subset are ignored;
    shards without class names keep their labels as model indices, the subset being the labels present."""
    import timm

    from megadigpt.train.evaluate import imagenet_synsets, load_set, topk_scorer

    classes = imagenet_synsets()
    assert len(classes) == 1000 and classes[0] == "n01440764" and classes == sorted(classes)
    info = Path(timm.__file__).parent / "data" / "_info"
    a_synsets = (info / "imagenet_a_synsets.txt").read_text().split()
    a_indices = [int(v) for v in (info / "imagenet_a_indices.txt").read_text().split()]
    assert len(a_synsets) == 200 and [classes.index(s) for s in a_synsets] == a_indices
    root = tmp_path / "a"
    _cls_folders(root, (a_synsets[0], a_synsets[57]))
    es = load_set("a", str(root), classes, 1000)
    assert es.subset == sorted(classes.index(s) for s in (a_synsets[0], a_synsets[57]))
    assert es.label_map[np.asarray(es.samples.labels)].tolist() == [0, 1]  # positions in the subset
    subset = es.subset
    logits = torch.full((2, 1000), -5.0)
    logits[:, 999 if 999 not in subset else 998] = 10.0  # the global arg-max lies outside the subset
    logits[0, subset[0]] = 1.0
    logits[1, subset[0]] = 2.0
    logits[1, subset[1]] = 3.0
    y = torch.tensor([0, 1])
    counts = topk_scorer(subset)(logits, [0, 1], y, torch.ones(2, dtype=torch.bool))
    assert counts[0].item() == 2 and counts[2].item() == 2
    assert topk_scorer(None)(logits, [0, 1], torch.tensor(subset), torch.ones(2, dtype=torch.bool))[0].item() == 0
    (root / "cats").mkdir()
    with pytest.raises(ConfigError, match="not classes of the model"):
        load_set("a", str(root), classes, 1000)
    # a shard without classes.txt: labels 3 and 7 are model classes, the subset is {3, 7}
    _write_shard(tmp_path / "r.tar", [("x", b"", 7), ("y", b"", 3)])
    es = load_set("r", str(tmp_path / "r.tar"), classes, 1000)
    assert es.subset == [3, 7] and es.label_map[[7, 3]].tolist() == [1, 0] and "no classes" in es.note


def test_v2_classes_are_indices_and_full_sets_need_every_class(tmp_path):
    from megadigpt.train.evaluate import load_set

    _cls_folders(tmp_path / "v2", ("0", "2", "10", "999"))
    es = load_set("v2", str(tmp_path / "v2"), [f"c{i}" for i in range(1000)], 1000)
    assert sorted(es.label_map[np.asarray(es.samples.labels)].tolist()) == [0, 2, 10, 999]  # not string order
    with pytest.raises(ConfigError, match="does not fit a 500-class model"):
        load_set("v2", str(tmp_path / "v2"), [f"c{i}" for i in range(500)], 500)
    _cls_folders(tmp_path / "v2", ("n01440764",))
    with pytest.raises(ConfigError, match="by index"):
        load_set("v2", str(tmp_path / "v2"), [f"c{i}" for i in range(1000)], 1000)
    classes = ["b", "a", "c"]  # the model's order, not sorted
    _cls_folders(tmp_path / "full", ("a", "b"))
    with pytest.raises(ConfigError, match="2 classes, the model has 3"):
        load_set("imagenet", str(tmp_path / "full"), classes, 3)
    (tmp_path / "full" / "c").mkdir()  # an empty class folder is a class: names and labels stay aligned
    es = load_set("imagenet", str(tmp_path / "full"), classes, 3)
    got = {es.samples[i].key.split("/")[0]: int(es.label_map[es.samples.labels[i]]) for i in range(len(es.samples))}
    assert got == {"a": 1, "b": 0}
    (tmp_path / "full" / "loose.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match="loose.jpg has no class"):
        load_set("imagenet", str(tmp_path / "full"), classes, 3)


def test_mce_real_and_c_templates(tmp_path):
    from megadigpt.data.sources import Sample
    from megadigpt.train.evaluate import ALEXNET_ERR, c_sources, mce, real_labels, real_scorer

    errors = {c: {s: ALEXNET_ERR[c] / 2 for s in range(1, 6)} for c in ALEXNET_ERR}
    assert mce(errors)["mCE"] == pytest.approx(50.0) and not mce(errors)["missing_corruptions"]
    errors["fog"] = {1: 0.0, 2: 2 * ALEXNET_ERR["fog"]}  # severities are averaged before the ratio
    assert mce(errors)["CE"]["fog"] == pytest.approx(100.0)
    labels = real_labels()
    assert len(labels) == 50000 and any(len(v) == 0 for v in labels) and any(len(v) > 1 for v in labels)
    i_multi = next(i for i, v in enumerate(labels) if len(v) > 1)
    i_empty = next(i for i, v in enumerate(labels) if not v)
    # a file in a folder, and a shard member whose key is the val name
    samples = [Sample(f"/v/n0/ILSVRC2012_val_{i_multi + 1:08d}.JPEG"),
               Sample("/v/val-000003.tar", 512, 10, key=f"ILSVRC2012_val_{i_empty + 1:08d}")]
    logits = torch.zeros(2, 1000)
    logits[0, labels[i_multi][1]] = 1.0  # the second of several right answers
    out = real_scorer(samples, labels)(logits, [0, 1], torch.tensor([labels[i_multi][0], 0]),
                                       torch.ones(2, dtype=torch.bool))
    assert out[0].item() == 1 and out[1].item() == 1  # the unlabelled image is not scored
    plan = c_sources("s3://b/c/{corruption}/{severity}/{0000..0003}.tar")
    assert len(plan) == 15 and sorted(plan["fog"]) == [1, 2, 3, 4, 5]
    assert plan["fog"][3] == "s3://b/c/fog/3/{0000..0003}.tar"
    with pytest.raises(ConfigError, match="not a folder"):
        c_sources(str(tmp_path / "nowhere"))


def test_commands_without_a_config_take_the_remote_options(eval_data, tmp_path, monkeypatch):
    """``data index`` (and validate, build, merge, eval) read remote shards through --cache-dir, with the
    defaults of megadigpt.data.remote."""
    from megadigpt import cli
    from megadigpt.data import remote

    monkeypatch.setattr(remote, "_OPTIONS", remote.options())  # restored after the test
    monkeypatch.delenv("MEGADIGPT_CACHE", raising=False)
    parser = cli.build_parser()
    for cmd in (["eval", "m", "--imagenet", "x"], ["data", "index", "x", "--out", "o"], ["data", "merge", "s",
                "--out", "o"], ["data", "validate", "x", "--out", "o"], ["data", "build", "x", "--out", "o"]):
        a = parser.parse_args(cmd)
        assert (a.io_timeout, a.io_retries, a.cache_dir) == (remote.TIMEOUT_S, remote.RETRIES, None)
    root, _, _ = eval_data
    with ShardServer(root / "served") as srv:
        assert cli.main(["data", "index", srv.url("val-{000000..000001}.tar"), "--out", str(tmp_path / "idx"),
                         "--cache-dir", str(tmp_path / "mine"), "--io-retries", "1", "--workers", "1"]) == 0
    assert len(list((tmp_path / "mine").rglob("*.tar"))) == 2 and remote.options()["retries"] == 1


# ----------------------------------------------------------------------------------------- any labelled set (issue 30)

def _main(capsys, argv):
    """``megadigpt <argv>`` in this process: (exit code, the stderr lines)."""
    from megadigpt.cli import main

    code = main([str(a) for a in argv])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_eval_scores_any_labelled_set_under_its_own_name(eval_data, cifar_dir, tmp_path, clean_env, capsys):
    """``--set NAME=SOURCE``: real CIFAR-10 shards (classes.txt beside them), the same 64 test images as class
    folders and as two shards, each reported under its own name with top-1 and top-5 in eval.json and eval.md
    (no ImageNet label anywhere), the numbers those of the model run by hand (timm ``local-dir:`` and the
    export's preprocessing); a model without label names takes a set's names or a nameless set's indices."""
    import io

    import timm
    from PIL import Image

    root, names, items = eval_data
    out = tmp_path / "eval"
    code, err = _main(capsys, ["eval", root / "model", "--set", f"cifar10={cifar_dir / 'test-000000.tar'}",
                               "--set", f"cifar10-folders={root / 'folders'}",
                               "--set", f"cifar10-shards={root / 'served'}/val-{{000000..000001}}.tar",
                               "--limit", "200", "--out", out, "--loader", "torch", "--workers", "0", "--batch", "50"])
    assert code == 0, err
    res = json.loads((out / "eval.json").read_text())
    sets = res["sets"]
    assert list(sets) == ["cifar10", "cifar10-folders", "cifar10-shards"]
    for name, r in sets.items():
        assert r["label"] == name and r["classes"] == 10 and r["class_names"] == "the source's"
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["loss"] > 0
    assert sets["cifar10"]["images"] == 200 and sets["cifar10-folders"]["images"] == 64
    assert sets["cifar10"]["source"].endswith("test-000000.tar") and res["note"] is None
    for k in ("top1", "top5", "loss", "images"):
        assert sets["cifar10-folders"][k] == pytest.approx(sets["cifar10-shards"][k], rel=1e-9), k

    model = timm.create_model(f"local-dir:{root / 'model'}", pretrained=True).eval()  # by hand, the card's route
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    x = torch.stack([tf(Image.open(io.BytesIO(data)).convert("RGB")) for _, data, _ in items])
    y = torch.tensor([label for _, _, label in items])
    with torch.no_grad():
        top = model(x).topk(5, dim=1).indices
    assert sets["cifar10-folders"]["top1"] == pytest.approx(100 * (top[:, 0] == y).double().mean().item(), abs=1e-9)
    assert sets["cifar10-folders"]["top5"] == pytest.approx(100 * (top == y[:, None]).any(1).double().mean().item(),
                                                            abs=1e-9)
    md = (out / "eval.md").read_text()
    assert md.splitlines()[0] == "| set | top-1 (%) | top-5 (%) | loss | images |" and "ImageNet" not in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| cifar10-folders |"))
    assert row.split(" | ")[1:3] == [f"{sets['cifar10-folders']['top1']:.2f}", f"{sets['cifar10-folders']['top5']:.2f}"]

    # the same weights without label names: a named set gives its names (count checked), a nameless one its indices
    from safetensors.torch import load_file

    from megadigpt.train.finetune import export_classifier

    meta = json.loads((root / "model" / "config.json").read_text())
    export_classifier(load_file(str(root / "model" / "model.safetensors")), meta["model_args"], tmp_path / "anon",
                      label_names=None, run_config={})
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "val-000000.tar").write_bytes((root / "served" / "val-000000.tar").read_bytes())  # no classes.txt
    from megadigpt.train.evaluate import evaluate_sets

    got = evaluate_sets(str(tmp_path / "anon"), {}, named={"named": str(root / "served" / "val-000000.tar"),
                                                         "bare": str(bare / "val-000000.tar")},
                        loader="torch", num_workers=0, batch=16)
    assert got["sets"]["named"]["top1"] == got["sets"]["bare"]["top1"] and got["sets"]["bare"]["images"] == 40
    assert got["sets"]["bare"]["class_names"].startswith("none") and "--set bare: the source names no classes" in \
        got["note"]


def test_eval_refuses_a_set_outside_the_models_label_space(eval_data, tmp_path, clean_env, capsys, monkeypatch):
    """A set whose classes do not fit the model's head - another count, other names, the same names numbered
    otherwise, a nameless label beyond the head - and a malformed ``--set``: one ``megadigpt: error:`` line, exit
    2, before the weights are loaded and before anything is written."""
    from megadigpt.train import evaluate

    root, names, _ = eval_data

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the set's label space was checked")

    monkeypatch.setattr(evaluate, "load_classifier", no_weights)
    _cls_folders(tmp_path / "few", names[:3])
    _cls_folders(tmp_path / "other", [n + "s" for n in names])
    perm = tmp_path / "perm"
    perm.mkdir()
    (perm / "val-000000.tar").write_bytes((root / "served" / "val-000000.tar").read_bytes())
    (perm / "classes.txt").write_text("\n".join(names[::-1]) + "\n")
    _write_shard(tmp_path / "wide.tar", [("k0", b"", 3), ("k1", b"", 12)])  # no classes.txt: labels are indices
    cases = [(f"few={tmp_path / 'few'}", r"has 3 classes \('airplane', 'automobile', 'bird'\), the model's head "
                                         r"has 10"),
             (f"other={tmp_path / 'other'}", r"names other classes than the model: only the set has 'airplanes'.*"
                                             r"only the model has 'airplane'"),
             (f"perm={perm / 'val-000000.tar'}", r"numbers its classes otherwise than the model: 'truck' is 0 in the "
                                                 r"set, 9 in the model"),
             (f"wide={tmp_path / 'wide.tar'}", r"label 12 does not fit the model's 10-class head"),
             ("cifar10", r"--set takes NAME=SOURCE"), (f"imagenet={tmp_path / 'few'}", r"name of an ImageNet set"),
             (f"a b={tmp_path / 'few'}", r"a set's name is letters")]
    for spec, pattern in cases:
        code, err = _main(capsys, ["eval", root / "model", "--set", spec, "--out", tmp_path / "o", "--loader",
                                   "torch", "--workers", "0"])
        assert code == 2 and len(err) == 1 and err[0].startswith("megadigpt: error: "), (spec, err)
        assert re.search(pattern, err[0]), (spec, err[0])
    code, err = _main(capsys, ["eval", root / "model", "--set", f"x={tmp_path / 'few'}", "--set",
                               f"x={tmp_path / 'other'}"])
    assert code == 2 and "given twice" in err[0]
    code, err = _main(capsys, ["eval", root / "model", "--pairs", f"held={tmp_path / 'few'}"])
    assert code == 2 and len(err) == 1 and "--pairs and --templates are for an image-text model" in err[0], err
    assert not (tmp_path / "o" / "eval.json").exists()

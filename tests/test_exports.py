"""timm-native exports (issue 18): a pretraining run's `convert --to timm` folder and a fine-tune's `best/`/`last/`
load with `timm.create_model("local-dir:<folder>", pretrained=True)` and by name with the preprocessing they were
trained with (not timm's stock config for a name), carry an honest model name, follow the umask, and hold a model
card. A real tiny pretraining run (demo photos, non-default mean and interpolation) is converted; the fine-tune
export is `export_classifier` on a real timm classifier's state in a run directory with a real config.yaml."""

import json
import os
import stat

import pytest
import torch

from .conftest import TINY, run_cli

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def _data_cfg(model):
    import timm

    return timm.data.resolve_data_config({}, model=model)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ex") / "pre"
    run_cli(["pretrain", "--run-dir", str(run_dir), *TINY, "data.source=demo", "data.loader=torch",
             f"data.mean=[{','.join(map(str, MEAN))}]", f"data.std=[{','.join(map(str, STD))}]",
             "data.interpolation=bilinear", "train.global_batch=8", "train.micro_batch=8", "train.max_steps=3",
             "train.zero_stage=0"])
    return run_dir


@pytest.fixture(scope="module")
def export(run, tmp_path_factory):
    from megadigpt.checkpoint.convert import convert

    out = tmp_path_factory.mktemp("ex_out") / "enc"
    old = os.umask(0o022)
    try:  # what `megadigpt convert <run> --to timm --out <out>` calls (in-process: no second interpreter start)
        convert(run, "timm", out)
    finally:
        os.umask(old)
    return out


def _expect_pre(cfg):
    assert list(cfg["mean"]) == MEAN and list(cfg["std"]) == STD  # data.mean / data.std, not ImageNet's
    assert cfg["interpolation"] == "bilinear"  # data.interpolation
    assert cfg["input_size"] == (3, 32, 32)  # model.img_size
    from megadigpt.config import FinetuneDataConfig

    assert cfg["crop_pct"] == FinetuneDataConfig().crop_pct  # pretraining has no eval crop: the eval default
    assert cfg["crop_mode"] == "center"


def test_local_dir_gives_the_runs_own_preprocessing(export, run):
    import timm

    from megadigpt.checkpoint.convert import load_any

    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    _expect_pre(_data_cfg(model))
    enc = {k[len("encoder."):]: v for k, v in load_any(run).items() if k.startswith("encoder.")}
    for k, v in enc.items():  # and the weights are the run's
        assert torch.equal(model.state_dict()[k], v), k
    assert model.num_classes == 0
    fine = timm.create_model(f"local-dir:{export}", pretrained=True, num_classes=5)  # a fresh head to fine-tune
    assert fine.head.out_features == 5 and torch.equal(fine.blocks[1].mlp.fc2.weight, enc["blocks.1.mlp.fc2.weight"])


def test_by_name_gives_the_same_preprocessing(export):
    import timm

    from megadigpt.checkpoint.convert import load_timm

    a = load_timm(export).eval()
    _expect_pre(_data_cfg(a))
    cfg = json.loads((export / "config.json").read_text())
    b = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],  # the README's recipe
                          pretrained_cfg=dict(cfg["pretrained_cfg"], file=str(export / "model.safetensors")))
    _expect_pre({**_data_cfg(b), "input_size": tuple(_data_cfg(b)["input_size"])})  # JSON gives a list
    local = timm.create_model(f"local-dir:{export}", pretrained=True)
    for k, v in local.state_dict().items():
        assert torch.equal(a.state_dict()[k], v) and torch.equal(b.state_dict()[k], v), k


def test_standard_and_custom_sizes_are_named_honestly(tmp_path):
    """A 192-wide, 6-block encoder at patch 4 / 32 px is not called a standard model anywhere but the builder
    field; a ViT-Ti/16 at 224 is timm's vit_tiny_patch16_224 and loads by that name with its own preprocessing."""
    import timm

    from megadigpt.checkpoint.convert import timm_export
    from megadigpt.config import load_config
    from megadigpt.model import build_model

    torch.manual_seed(0)
    dec = ["model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2", "target.kind=pixels"]
    custom = build_model(load_config(None, ["model.arch=vit_tiny", "model.depth=6", "model.patch_size=4",
                                            "model.img_size=32", *dec]).model, 48, 8).state_dict()
    out = timm_export(custom, 3, tmp_path / "d6")
    cfg = json.loads((out / "config.json").read_text())
    name, builder = "megadigpt_vit_d6_w192_h3_p4_s32", cfg["architecture"]
    assert cfg.get("model_name") == name and cfg["pretrained_cfg"]["tag"] == name
    assert cfg["megadigpt"]["standard_timm_name"] is False and timm.is_model(builder)
    assert not timm.is_model(name)
    assert {k: cfg["model_args"][k] for k in ("depth", "embed_dim", "num_heads", "patch_size", "img_size")} == \
        {"depth": 6, "embed_dim": 192, "num_heads": 3, "patch_size": 4, "img_size": 32}
    card = (out / "README.md").read_text()
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == f"# {name}"
    assert "not a standard timm model" in card and "not a standard timm model" in cfg["pretrained_cfg"]["description"]
    # the builder is named only as the builder: no other field or line calls the model by its name
    for line in card.splitlines():
        assert builder not in line or "only as the builder" in line, line
    rest = json.dumps({k: v for k, v in cfg.items() if k not in ("architecture", "pretrained_cfg")})
    assert builder not in rest and builder not in cfg["pretrained_cfg"]["tag"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.pretrained_cfg["tag"] == name and len(model.blocks) == 6 and model.embed_dim == 192
    assert model.patch_embed.patch_size == (4, 4)

    std = build_model(load_config(None, ["model.arch=vit_tiny", "model.patch_size=16", "model.img_size=224",
                                         *dec]).model, 48, 14).state_dict()
    out = timm_export(std, 3, tmp_path / "ti")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["megadigpt"]["standard_timm_name"] is True
    assert cfg["model_name"] == "megadigpt_vit_d12_w192_h3_p16_s224"
    m = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, global_pool="avg",
                          pretrained_cfg=dict(cfg["pretrained_cfg"], file=str(out / "model.safetensors")))
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, global_pool="avg",
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))  # stock preprocessing
    assert list(_data_cfg(m)["mean"]) == cfg["pretrained_cfg"]["mean"] != list(_data_cfg(stock)["mean"])
    assert torch.equal(m.blocks[11].attn.proj.weight, std["encoder.blocks.11.attn.proj.weight"])


def test_files_follow_the_umask(export, run, tmp_path):
    from megadigpt.checkpoint.convert import convert

    for f in ("model.safetensors", "config.json", "README.md"):  # convert --to timm under umask 022
        assert stat.S_IMODE(os.stat(export / f).st_mode) == 0o644, f
    old = os.umask(0o027)
    try:  # another umask: its mode, not a fixed 0644
        convert(run, "fp32", tmp_path / "full.safetensors")
        convert(run, "reference", tmp_path / "ref.pth")
        convert(run, "timm", tmp_path / "t")
    finally:
        os.umask(old)
    for p in (tmp_path / "full.safetensors", tmp_path / "ref.pth", tmp_path / "t" / "model.safetensors",
              tmp_path / "t" / "config.json", tmp_path / "t" / "README.md"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o640, p


def test_model_card_names_the_architecture_and_the_training(export):
    card = (export / "README.md").read_text()
    cfg = json.loads((export / "config.json").read_text())
    from safetensors.torch import load_file

    n = sum(v.numel() for v in load_file(str(export / "model.safetensors")).values())
    for needle in ("**Depth:** 4 blocks", "**Width:** 64", "**Heads:** 2", "**Patch size:** 4",
                   "**Image size:** 32 x 32", f"({n:,})", "**Steps:** 3", "**Teacher / target:** pixels",
                   "**Data source:** demo", "**Objective:** digpt", "**Global batch:** 8", "**Images seen:** 24",
                   "mean (0.4, 0.5, 0.6)", "bilinear interpolation", f'timm.create_model("local-dir:',
                   "resolve_data_config({}, model=model)", "create_transform(**cfg)"):
        assert needle in card, needle
    assert cfg["megadigpt"]["step"] == 3 and cfg["megadigpt"]["parameters"] == n
    assert "gen_loss" in cfg["megadigpt"]["metrics"]  # the run's metrics at the exported step


def test_model_card_is_publishable(export, run):
    """Issue 30: the resolved precision (the run said auto; its start event says fp32), metrics by name with the
    step they were logged at (no ``gen_loss_step | 3`` rows), no local path, the D-iGPT citation, a licence in the
    front matter (megadigpt declares none: ``other``, said in the card), and megadigpt's pooling."""
    import yaml

    card = (export / "README.md").read_text()
    cfg = json.loads((export / "config.json").read_text())
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == "auto"
    assert "**Precision:** fp32" in card and "auto" not in card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "other" and front["license_name"] == "none-declared"
    assert front["library_name"] == "timm" and "arxiv:2312.02147" in front["tags"]
    assert "## Licence" in card and "megadigpt declares no licence" in card
    assert "Rejuvenating image-GPT as Strong Visual Representation Learners" in card and "@article{" in card
    rows = card.split("## Metrics", 1)[1].split("##", 1)[0]
    assert "| generative loss (training, last logged) |" in rows and "| step 3 |" in rows
    assert "_step" not in rows and "gen_loss" not in rows
    for text in (card, json.dumps(cfg)):
        assert str(run) not in text and str(export) not in text and str(run.parent) not in text
    assert "**Exported from:** `.../pre`" in card
    assert cfg["model_args"]["global_pool"] == "avg" and cfg["global_pool"] == "avg"
    assert "model.num_prefix_tokens:].mean(1)" in card and "forward_head(tokens, pre_logits=True)" in card


def test_out_named_as_the_other_kind_is_refused(run, tmp_path, capsys):
    """Issue 30: ``convert --to timm --out x.safetensors`` would make a folder of that name; a file output named
    as a folder (a trailing /) would make a file of it: one line, exit 2, nothing written."""
    from megadigpt.cli import main

    for to, out, says in (("timm", tmp_path / "enc.safetensors", "names a .safetensors file, but this writes a "
                                                                   "folder"),
                          ("timm", tmp_path / "enc.pth", "give a folder, e.g."),
                          ("fp32", f"{tmp_path / 'full'}/", "names a folder (it ends with /)"),
                          ("reference", f"{tmp_path / 'ref'}/", "writes one file")):
        code = main(["convert", str(run), "--to", to, "--out", str(out)])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("megadigpt: error: --out") and says in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_finetune_export_has_the_same_properties(export, tmp_path):
    import timm

    from megadigpt.config import FinetuneRunConfig, dump_config, load_config
    from megadigpt.model.classifier import EncoderGeometry, build_classifier
    from megadigpt.train.finetune import export_classifier

    run_dir = tmp_path / "ft"
    run_dir.mkdir()
    cfg = load_config(None, [f"data.mean=[{','.join(map(str, MEAN))}]", f"data.std=[{','.join(map(str, STD))}]",
                             "data.crop_pct=0.9", "model.img_size=48", f"train.init_from={export}",
                             "data.train=https://user:secret@example.com/train-{000..009}.tar?sig=abc"],
                      root=FinetuneRunConfig)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    geom = EncoderGeometry(embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0, patch_size=4)
    torch.manual_seed(0)
    model = build_classifier(geom, 48, 3)
    names = ["cat", "dog", "eel"]
    old = os.umask(0o022)
    try:
        out = export_classifier(model.state_dict(), geom.model_args(48, 3, "avg", 0.1), run_dir / "best", names,
                                {"top1": 61.5, "top5": 97.0, "step": 40, "epoch": 2.0, "best_top1": 61.5},
                                cfg.data.mean, cfg.data.std, cfg.data.crop_pct)
    finally:
        os.umask(old)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    d = _data_cfg(loaded)
    assert (list(d["mean"]), list(d["std"]), d["crop_pct"], d["interpolation"], tuple(d["input_size"])) == \
        (MEAN, STD, 0.9, "bicubic", (3, 48, 48))
    for f in ("model.safetensors", "config.json", "README.md"):
        assert stat.S_IMODE(os.stat(out / f).st_mode) == 0o644, f
    assert loaded.num_classes == 3 and loaded.pretrained_cfg["label_names"] == names
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    from megadigpt.checkpoint.convert import load_timm

    assert _data_cfg(load_timm(out)) == d  # exactly, types included
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_name"] == "megadigpt_vit_d4_w64_h2_p4_s48_cls3" == meta["pretrained_cfg"]["tag"]
    assert meta["megadigpt"]["metrics"]["step"] == 40
    card = (out / "README.md").read_text()
    for needle in ("# megadigpt_vit_d4_w64_h2_p4_s48_cls3", "**Depth:** 4 blocks", "**Width:** 64",
                   "| val top-1 (%) | 61.5 | step 40 (epoch 2) |", "| best val top-1 (%) | 61.5 | the run's best",
                   "**steps:** 40", "**Classes:** 3", "**Steps:** 3",  # pretraining's steps
                   "**Teacher / target:** pixels", "mean (0.4, 0.5, 0.6)", "crop_pct 0.9",
                   "https://example.com/train-{000..009}.tar", "**init from:** .../enc", "**Precision:** fp32",
                   "license: other", "@article{ren2023rejuvenating", "then `fc_norm` (LayerNorm) and the head"):
        assert needle in card, needle
    assert "secret" not in card and "sig=abc" not in card and "secret" not in json.dumps(meta)
    assert str(export) not in card and str(export) not in json.dumps(meta)  # no local path
    assert "| step |" not in card and "| epoch |" not in card
    assert "**precision:** auto (the run's log does not say" in card  # this run dir has no metrics.jsonl
    (run_dir / "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0, "precision": "bf16"}) + "\n")
    out = export_classifier(model.state_dict(), geom.model_args(48, 3, "avg", 0.1), run_dir / "last", names,
                            {"top1": 61.5, "top5": 97.0, "step": 40}, cfg.data.mean, cfg.data.std, cfg.data.crop_pct)
    assert "**precision:** bf16" in (out / "README.md").read_text()  # the run's resolved precision, not auto


def test_convert_never_destroys_what_it_points_at(run, tmp_path, capsys):
    """Issue 28: `convert` refuses, in one line and before loading anything, a path inside the run's checkpoints/
    (the run stays resumable, byte for byte), its own input (even with --force, hard links too), and a folder of
    someone else's files unless --force; megadigpt's own earlier output is replaced without --force."""
    import hashlib

    from megadigpt.checkpoint import ds_checkpoint as dc
    from megadigpt.cli import main

    def cli(*argv):
        code = main(["convert", *map(str, argv)])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 0 or (len(lines) == 1 and lines[0].startswith("megadigpt: error: ")), err
        return code, err

    tag = dc.latest_tag(run)
    ck = run / "checkpoints" / tag

    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ck.iterdir())}

    before = digest()
    for force in ([], ["--force"]):
        code, err = cli(run, "--to", "fp32", "--out", ck / "mp_rank_00_model_states.pt", *force)
        assert code == 2 and "inside the run's checkpoint folder" in err
        code, err = cli(run, "--to", "timm", "--out", run / "checkpoints", *force)
        assert code == 2 and "checkpoint folder" in err
        code, err = cli(run, "--to", "timm", "--out", run, *force)  # the run directory is the input
        assert code == 2 and "would overwrite its input" in err
    assert digest() == before and dc.verify(run, tag) is None and dc.latest_tag(run) == tag

    full = tmp_path / "full.safetensors"
    assert cli(run, "--to", "fp32", "--out", full)[0] == 0
    assert cli(run, "--to", "fp32", "--out", full)[0] == 0  # megadigpt's own fp32 export: no --force needed
    os.link(full, tmp_path / "again.safetensors")
    data = full.read_bytes()
    for out in (full, tmp_path / "again.safetensors"):  # its input, by name or by another (hard) link
        code, err = cli(full, "--to", "fp32", "--out", out, "--force")
        assert code == 2 and "which this command reads" in err
    assert full.read_bytes() == data

    ref = tmp_path / "ref.pth"
    ref.write_bytes(b"someone's file")
    code, err = cli(run, "--to", "reference", "--out", ref)
    assert code == 2 and "pass --force" in err and ref.read_bytes() == b"someone's file"
    assert cli(run, "--to", "reference", "--out", ref, "--force")[0] == 0
    assert cli(run, "--to", "reference", "--out", ref)[0] == 0  # now megadigpt's own

    user = tmp_path / "user"
    user.mkdir()
    (user / "README.md").write_text("my notes")
    (user / "config.json").write_text("{}")
    code, err = cli(run, "--to", "timm", "--out", user)
    assert code == 2 and "README.md, config.json" in err and "--force" in err
    assert (user / "README.md").read_text() == "my notes" and not (user / "model.safetensors").exists()
    assert cli(run, "--to", "timm", "--out", user, "--force")[0] == 0
    assert json.loads((user / "config.json").read_text())["megadigpt"]["step"] == 3

    t = tmp_path / "t"
    assert cli(run, "--to", "timm", "--out", t)[0] == 0
    assert cli(run, "--to", "timm", "--out", t)[0] == 0  # over megadigpt's own export: no --force needed
    (t / "README.md").write_text("edited card")  # changed since: no longer megadigpt's to replace
    code, err = cli(run, "--to", "timm", "--out", t)
    assert code == 2 and "README.md" in err and (t / "README.md").read_text() == "edited card"
    assert not list(t.glob(".*.tmp*")) and not list(tmp_path.glob(".*.tmp*"))  # no temporaries left

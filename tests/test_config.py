import subprocess
import sys
import time

import pytest

from megadigpt.config import ConfigError, load_config, reference_markdown

from .conftest import REPO, subprocess_env


def test_builtin_configs_load_and_validate(tmp_path):
    from megadigpt.train.pretrain import plan_run

    for name in ("demo", "digpt_vitb16_in1k", "digpt_vitl14_in21k", "digpt_vitl14_merged", "digpt_vith14_merged",
                 "igpt_cifar10", "digit_cifar10", "igpt_vitb2_32px_in1k", "digit_vitb14_in1k", "digit_vitl14_in1k"):
        cfg = load_config(name, [f"train.run_dir={tmp_path / name}"])
        assert cfg.model.arch.startswith("vit_")
        if name == "demo":
            plan = plan_run(cfg, world_size=1)
            assert plan.target.grid == 8 and plan.accum == 1


def test_reference_recipe_values():
    cfg = load_config("digpt_vitb16_in1k")
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.img_size) == ("vit_base", 16, 224)
    assert (cfg.target.kind, cfg.target.model) == ("open_clip", "ViT-H-14")
    assert cfg.train.global_batch == 4096 and cfg.optim.blr == 1.5e-4 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.warmup_epochs == 40 and cfg.train.epochs == 300 and cfg.optim.weight_decay == 0.05


def test_overrides_are_typed():
    cfg = load_config("demo", ["model.taps=[1,2,3,6]", "optim.betas=[0.9,0.98]", "train.max_steps=7", "optim.lr=1e-3"])
    assert cfg.model.taps == [1, 2, 3, 6] and cfg.optim.betas == (0.9, 0.98) and cfg.train.max_steps == 7
    assert cfg.optim.lr == 1e-3


@pytest.mark.parametrize("override,match", [
    ("model.detph=3", "unknown config key 'model.detph' \\(did you mean 'depth'\\?\\)"),
    ("modle.depth=3", "unknown config section 'modle' \\(did you mean 'model'\\?\\)"),
    ("train.max_steps=ten", "train.max_steps: expected an integer"),
    ("data.hflip=2", "expected true/false"),
    ("depth=3", "section.key=value"),
])
def test_bad_keys_and_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("demo", [override])


def test_unknown_config_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        load_config("dem")


def _cli_error(args, **env):
    """Run the CLI in a fresh interpreter; report (exit code, stderr lines, whether DeepSpeed was imported)."""
    code = ("import sys; from megadigpt.cli import main; rc = main(sys.argv[1:]); "
            "print('DEEPSPEED_IMPORTED' if 'deepspeed' in sys.modules else 'NO_DEEPSPEED'); sys.exit(rc)")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=str(REPO),
                       env=subprocess_env(**env), timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    return p.returncode, lines, p.stdout.strip(), time.time() - t0


@pytest.mark.parametrize("args,env,match", [
    (["pretrain", "model.dpeth=3"], {}, "did you mean 'depth'"),
    (["pretrain", "--data", "/nonexistent/shards"], {}, "data source not found: /nonexistent/shards"),
    (["pretrain", "--data", "/nonexistent/s-{000..099}.tar"], {},
     r"data source not found: /nonexistent/s-000.tar \(and 99 more of /nonexistent/s-\{000..099\}.tar\)$"),
    (["pretrain", "target.kind=timm", "target.model=vit_small_patch14_dinov2", "target.weights=/nope/w.safetensors"],
     {}, "timm teacher weights file not found: /nope/w.safetensors"),
    (["pretrain", "target.kind=open_clip", "target.model=ViT-B-16", "target.weights=/nope/clip.bin"], {},
     "open_clip (teacher )?weights file not found"),
    (["pretrain", "target.image_size=48"], {}, "teacher's 3x3 token grid"),
    (["pretrain", "train.global_batch=30", "train.micro_batch=4"], {}, "not divisible by train.micro_batch 4"),
    (["pretrain", "train.global_batch=32", "train.micro_batch=8"], {"WORLD_SIZE": "3", "RANK": "0"},
     "world size 3"),
    (["pretrain", "model.img_size=60"], {}, "not divisible by model.patch_size"),
    (["pretrain", "model.attention=flex", "train.device=cpu"], {}, "flex trains only on CUDA"),
    (["pretrain", "train.precision=fp16", "train.device=cpu"], {}, "fp16 is refused"),
    (["pretrain", "target.tokenizer=/nope/tok.pt"], {}, "target.tokenizer not found: /nope/tok.pt"),
    (["pretrain", "target.layer=stride8"], {}, "target.layer 'stride8' unknown for efficientnet_lite0"),
    (["tokenizer", "fit", "--config", "demo"], {}, "where should the tokenizer go"),
    (["tokenizer", "fit", "--config", "demo", "--out", "/nonexistent/tok.pt", "--images", "2", "--k", "4096"], {},
     "fewer than k=4096"),
])
def test_bad_input_fails_early_in_one_line(tmp_path, args, env, match):
    import re

    rc, lines, out, elapsed = _cli_error(args + [f"train.run_dir={tmp_path / 'run'}"], **env)
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("megadigpt: error:"), lines
    assert re.search(match, lines[0]), lines[0]
    assert out == "NO_DEEPSPEED"  # no DeepSpeed start, no model build
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_docs_config_reference_is_current():
    page = (REPO / "docs" / "config.md").read_text()
    assert reference_markdown() in page, "docs/config.md config reference is stale: regenerate with " \
                                         "`megadigpt config-reference`"


def _cli(argv):
    import contextlib
    import io

    from megadigpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_show_config_knows_every_tree_and_lists_the_builtins():
    """show-config resolves every built-in config (segmentation's included: it once failed on model.crop_size),
    and --list names each built-in once, under its tree, with one line."""
    import yaml

    from megadigpt.config import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    for name in names:
        code, out, err = _cli(["show-config", "--config", name])
        assert code == 0, (name, err)
        shown = yaml.safe_load(out)
        if name.startswith("segment_"):
            assert "segment" in shown and shown["model"]["crop_size"] > 0, name
        if name.startswith("clip_"):
            assert "clip" in shown and shown["text"]["model"], name
    code, out, err = _cli(["show-config", "--config", "segment_ade20k_vitb16", "model.crop_size=256"])
    assert code == 0 and yaml.safe_load(out)["model"]["crop_size"] == 256
    code, out, _ = _cli(["show-config", "--list"])
    assert code == 0
    listed = [ln.split()[0] for ln in out.splitlines() if ln.startswith("  ")]
    assert sorted(listed) == names  # each once
    trees = [ln for ln in out.splitlines() if not ln.startswith("  ")]
    assert len(trees) == 4 and "segment" in trees[2] and "clip" in trees[3]
    assert all(len(ln) < 140 for ln in out.splitlines())


def test_config_reference_covers_every_tree():
    import megadigpt.segment_config  # noqa: F401

    ref = reference_markdown()
    assert "**Semantic segmentation (`megadigpt segment`)**" in ref
    for key in ("model.crop_size", "segment.", "train.run_dir", "finetune."):
        assert f"| `{key}" in ref, key


def test_a_config_extends_a_builtin_one(tmp_path):
    """``extends:``: a built-in (or a path) as the base, key-by-key overrides, the same strict checks."""
    base = load_config("digpt_vitb16_in1k")
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: digpt_vitb16_in1k\ntrain:\n  global_batch: 2048\n")
    cfg = load_config(str(mine))
    assert cfg.train.global_batch == 2048
    assert cfg.train.epochs == base.train.epochs and cfg.target.model == base.target.model  # the rest stays
    child = tmp_path / "sub" / "child.yaml"  # a chain, by a relative path, plus overrides on top
    child.parent.mkdir()
    child.write_text("extends: ../mine.yaml\noptim:\n  blr: 2.0e-4\n")
    cfg = load_config(str(child), ["train.epochs=5"])
    assert (cfg.train.global_batch, cfg.optim.blr, cfg.train.epochs) == (2048, 2e-4, 5)
    seg = tmp_path / "seg.yaml"  # another tree's built-in: its own tree, found by show-config
    seg.write_text("extends: segment_ade20k_vitb16\nmodel:\n  crop_size: 256\n")
    code, out, err = _cli(["show-config", "--config", str(seg)])
    assert code == 0 and "crop_size: 256" in out, err
    for text, match in (("extends: digpt_vitb16_in1k\ntrain:\n  global_bach: 8\n", "global_bach"),
                        ("extends: no_such_config\n", "no_such_config"),
                        ("extends: [a, b]\n", "one config name"),
                        ("extends: loop.yaml\n", "extends itself")):
        bad = tmp_path / "loop.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config(str(bad))

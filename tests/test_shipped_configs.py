"""Every built-in config at toy size on CPU, in the configuration it trains in on a GPU: its precision (``auto`` is
bf16 there: the student and the teacher), ZeRO stage (the partitioned build under ZeRO-3), EMA, activation
checkpointing, accumulation, loader and attention backend; only sizes (model, teacher, images, batch, steps) and
data are shrunk. Each runs on 2 gloo ranks, is preempted (SIGTERM) at step 2 and checkpoints, and the same command
resumes it to step 3. Where a setting must not change numerics (the partitioned vs the plain build, activation
checkpointing, the ZeRO stage), the config's own settings in fp32 are compared with the plain path (fp32, ZeRO-0,
no checkpointing, built whole) step by step; the bf16 run's first loss is compared with the plain fp32 one to
bf16's rounding. A config added to ``megadigpt/configs/`` is picked up by itself.

Configs whose GPU settings coincide (the same command, precision, ZeRO stage, checkpointing, EMA, accumulation,
loader, attention, compile, teacher kind, tokenizer, objective) share one set of runs: the matrix runs once per
distinct setting, in one process per rank (``tests/config_matrix_runner.py``), so the suite pays the start-up once.

On CPU, FlexAttention (no CPU backward) and fp16 (DeepSpeed refuses it) are refused in one line; tested here too."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, free_port, run_cli, subprocess_env

CONFIGS = sorted(p.stem for p in (REPO / "megadigpt" / "configs").glob("*.yaml"))
WORLD, STEPS, TERM_AT = 2, 3, 2


def kind_of(name: str) -> str:
    top = yaml.safe_load((REPO / "megadigpt" / "configs" / f"{name}.yaml").read_text())
    if "text" in top or "clip" in top:
        return "clip"
    return "segment" if "segment" in top else "finetune" if "finetune" in top else "pretrain"


def load(name: str):
    from megadigpt.config import FinetuneRunConfig, load_config

    kind = kind_of(name)
    if kind == "segment":
        from megadigpt.segment_config import load_segment_config

        return kind, load_segment_config(name)
    if kind == "clip":
        from megadigpt.clip_config import load_clip_config

        return kind, load_clip_config(name)
    return kind, load_config(name, root=FinetuneRunConfig if kind == "finetune" else None)


def _named_patch(name: str) -> int:
    """A fine-tuning or segmentation config takes its geometry from ``--init-from`` (``arch: auto``); its name says
    which pretraining it follows (``finetune_vitl14_*`` after ``digpt_vitl14_*``)."""
    import re

    m = re.search(r"vit[a-z]+?(\d+)", name)
    return int(m.group(1)) if m else 16


def gpu_settings(name: str) -> dict:
    """What a GPU run of ``name`` trains with, as far as the code path goes (sizes excluded)."""
    kind, cfg = load(name)
    t = cfg.train
    prec = "bf16" if t.precision == "auto" else t.precision  # auto: bf16 on bf16 GPUs (A100, H100)
    per_node = t.micro_batch * 8  # one 8-GPU node
    s = {"kind": kind, "precision": prec, "zero": t.zero_stage, "ckpt": bool(t.activation_checkpointing),
         "compile": bool(t.compile), "accum": t.global_batch > per_node, "loader": getattr(cfg.data, "loader", None),
         "patch": cfg.model.patch_size or _named_patch(name)}
    if kind == "pretrain":
        tg = cfg.target
        s.update(attention=cfg.model.attention, objective=cfg.model.objective, target=tg.kind,
                 target_dtype="bf16" if tg.dtype == "auto" else tg.dtype, tokenizer=tg.tokenizer is not None,
                 layer=tg.layer, target_patch=tg.patch_size)
    elif kind in ("finetune", "segment"):
        s["ema"] = bool(getattr(cfg.finetune if kind == "finetune" else cfg.segment, "ema_decay", 0) or 0)
    else:
        s.update(ema=False, text=cfg.text.model)
    return s


def groups() -> dict:
    """{representative config: [configs with the same GPU settings]}, the first name of each group leading."""
    out, seen = {}, {}
    for name in CONFIGS:
        key = json.dumps(gpu_settings(name), sort_keys=True)
        lead = seen.setdefault(key, name)
        out.setdefault(lead, []).append(name)
    return out


# ============================================================================ the shrunk commands


TEACHERS = {  # the smallest teacher of the same kind (random weights: the code path, not the features, is tested)
    "open_clip": ["target.model=ViT-S-16", "target.weights=null", "target.random_weights=true",
                  "target.image_size=64"],
    "timm": ["target.model=vit_small_patch14_reg4_dinov2", "target.weights=null", "target.random_weights=true",
             "target.image_size=56"],
}


def pretrain_args(name: str, s: dict, data: str) -> list:
    p = s["patch"]
    img = max(4 * p, 32)  # a 4 x 4 patch grid (4 segments of 2 x 2); 32 px at least: a stride-16 teacher needs 2 x 2
    ov = ["--config", name, "--data", data, f"model.img_size={img}", "model.embed_dim=32", "model.depth=2",
          "model.num_heads=2", "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
          "data.num_workers=0", "optim.warmup_steps=1"]
    ov += TEACHERS.get(s["target"], [])
    if s["target"] in ("pixels", "efficientnet_lite0"):
        ov.append(f"target.image_size={img}")
    return ov


def finetune_args(name: str, s: dict, init: Path, small: Path) -> list:
    p = s["patch"]
    return ["--config", name, "--init-from", str(init), "--train", str(small / "train.jsonl"), "--val",
            str(small / "val.jsonl"), f"model.img_size={8 * p}",  # twice the pretraining grid: interpolated
            "data.num_workers=0", "optim.warmup_steps=1", "finetune.eval_every=1"]


def segment_args(name: str, s: dict, init: Path, composite: Path) -> list:
    p = s["patch"]
    return ["--config", name, "--init-from", str(init), "--train", str(composite), "--val", str(composite),
            f"model.crop_size={4 * p}", "model.channels=16", "model.aux_channels=8", "model.num_classes=11",
            f"data.scale=[{16 * p},{4 * p}]", "data.num_workers=0", "optim.warmup_steps=1",
            f"segment.eval_every={STEPS}", f"segment.eval_stride={3 * p}", "segment.eval_batch=2"]


def clip_args(name: str, s: dict, init: Path, pairs: Path) -> list:
    """The shipped image-text config from a pretraining run, on captioned CIFAR-10 pairs (also its zero-shot set),
    with a 1-layer 32-wide text tower of random weights."""
    p = s["patch"]
    return ["--config", name, "--init-from", str(init), "--train", str(pairs), "--val", str(pairs), "--zeroshot",
            str(pairs), f"model.img_size={8 * p}", "text.weights=null", "text.random_weights=true", "text.width=32",
            "text.layers=1", "text.heads=2", "text.embed_dim=16", "text.context_length=16", "data.num_workers=0",
            "optim.warmup_steps=1", "clip.zeroshot_every=0"]


def common(run_dir: Path, micro: int, accum: bool, steps: int, extra=()) -> list:
    return ["--run-dir", str(run_dir), f"train.micro_batch={micro}", f"train.global_batch={micro * WORLD * (2 if accum else 1)}",
            f"train.max_steps={steps}", "train.log_every=1", "train.ckpt_every=1000", "train.tensorboard=false",
            "train.progress=off", *extra]


def variants(s: dict) -> dict:
    """The runs of one setting: "gpu" (its own settings; preempted at step 2, then resumed), "fp32" (its own
    settings in fp32) and "plain" (fp32, ZeRO-0, no checkpointing, built whole)."""
    shipped = [f"train.precision={s['precision']}", f"train.zero_stage={s['zero']}",
               f"train.activation_checkpointing={str(s['ckpt']).lower()}"]
    if s["kind"] == "pretrain" and s["target"] not in ("pixels",):
        shipped.append(f"target.dtype={s['target_dtype']}")
    fp32 = ["train.precision=fp32", f"train.zero_stage={s['zero']}",
            f"train.activation_checkpointing={str(s['ckpt']).lower()}"]
    plain = ["train.precision=fp32", "train.zero_stage=0", "train.activation_checkpointing=false"]
    if s["kind"] == "pretrain" and s["target"] not in ("pixels",):
        fp32.append("target.dtype=fp32")
        plain.append("target.dtype=fp32")
    return {"gpu": shipped, "fp32": fp32, "plain": plain}


@pytest.fixture(scope="module")
def matrix(cifar_small, cifar_dir, tmp_path_factory):
    """Every distinct setting's runs, in one 2-rank process pair (and the tokenizers they need, fitted first)."""
    from megadigpt.data import composite_seg

    root = tmp_path_factory.mktemp("matrix")
    data = str(cifar_small / "train.jsonl")
    comp = None
    if any(kind_of(n) == "segment" for n in CONFIGS):
        if not (composite_seg.FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
            pytest.fail("Fashion-MNIST absent (apt-get install dataset-fashion-mnist): the segmentation configs")
        comp = composite_seg.build(root / "composite", cifar_dir, n_train=16, n_val=3, size=64)
    pairs = None
    if any(kind_of(n) == "clip" for n in CONFIGS):
        from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

        from megadigpt.data.captions import caption_labelled

        pairs = caption_labelled(str(cifar_dir / "train-000000.tar"), root / "pairs", SIMPLE_IMAGENET_TEMPLATES,
                                 limit=32, name="pairs")[0]
    leads = groups()
    settings = {n: gpu_settings(n) for n in leads}

    # tokenizers first (one process: a fit is not distributed), for the shrunk teacher each config trains against
    fits = []
    for name, s in settings.items():
        if s["kind"] == "pretrain" and s["tokenizer"]:
            tok = root / f"{name}.tok.pt"
            shrunk = pretrain_args(name, s, data)[4:]  # the overrides, without --config/--data
            fits.append({"name": f"fit:{name}", "argv": ["tokenizer", "fit", "--config", name, "--data", data,
                                                          "--k", "8", "--images", "32", "--iters", "5", "--out",
                                                          str(tok), *shrunk, "target.tokenizer=null"]})
            settings[name]["tok"] = str(tok)
    plan, runs = [], {}
    order = sorted(settings, key=lambda n: ["pretrain", "finetune", "segment", "clip"].index(settings[n]["kind"]))
    inits = {}  # patch size -> a pretraining run's directory (finetune and segment start from it)
    for name in order:
        s = settings[name]
        for variant, prec in variants(s).items():
            run_dir = root / f"{name}.{variant}"
            if s["kind"] == "pretrain":
                args = pretrain_args(name, s, data) + ([f"target.tokenizer={s['tok']}"] if s["tokenizer"] else [])
                micro = 2
            else:
                init = inits.get(s["patch"])
                if init is None:
                    pytest.fail(f"{name}: no built-in pretraining config of patch {s['patch']} to start from")
                args = (finetune_args(name, s, init, cifar_small) if s["kind"] == "finetune" else
                        segment_args(name, s, init, comp) if s["kind"] == "segment" else
                        clip_args(name, s, init, pairs))
                micro = 2
            steps = STEPS if variant == "gpu" else 2
            argv = [s["kind"], *args, *common(run_dir, micro, s["accum"], steps, prec)]
            runs[(name, variant)] = run_dir
            if variant == "gpu":  # preempted at step 2 (checkpoint, exit 75), then the same command resumes
                plan.append({"name": f"{name}.gpu.preempted", "argv": argv, "env": {"MEGADIGPT_FAULTS": f"term={TERM_AT}"}})
                plan.append({"name": f"{name}.gpu.resumed", "argv": argv, "env": {"MEGADIGPT_FAULTS": ""}})
            else:
                plan.append({"name": f"{name}.{variant}", "argv": argv, "env": {"MEGADIGPT_FAULTS": ""}})
        if s["kind"] == "pretrain":
            inits.setdefault(s["patch"], runs[(name, "gpu")])
    results = {}
    for label, entries, nproc in (("fits", fits, 1), ("runs", plan, WORLD)):
        if not entries:
            continue
        (root / f"{label}.json").write_text(json.dumps(entries))
        out = root / f"{label}.results.json"
        cmd = [sys.executable, str(REPO / "tests" / "config_matrix_runner.py"), str(root / f"{label}.json"), str(out)]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   str(free_port()), *cmd[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=subprocess_env(), cwd=str(REPO))
        got = json.loads(out.read_text()) if out.is_file() else {}
        missing = [e["name"] for e in entries if e["name"] not in got]
        assert not missing, f"{label}: {missing} never ran\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        results.update(got)
    return {"settings": settings, "groups": leads, "runs": runs, "results": results}


def _records(run_dir: Path, key: str) -> dict:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if key in r and "event" not in r:
            out[r["step"]] = r[key]
    return out


def _events(run_dir: Path, name: str) -> list:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("event") == name]


def test_every_config_is_in_the_matrix():
    """Each built-in config falls in exactly one group, whose settings are its own."""
    g = groups()
    assert sorted(n for members in g.values() for n in members) == CONFIGS
    for lead, members in g.items():
        assert all(gpu_settings(m) == gpu_settings(lead) for m in members)
    # the configuration users run first is covered: bf16 under ZeRO-3 with checkpointing, EMA in fine-tuning
    all_s = [gpu_settings(n) for n in CONFIGS]
    assert any(s["kind"] == "pretrain" and s["zero"] == 3 and s["ckpt"] and s["precision"] == "bf16" for s in all_s)
    assert any(s["kind"] == "finetune" and s["zero"] == 3 and s.get("ema") for s in all_s)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_trains_preempts_and_resumes_in_its_own_settings(matrix, name):
    lead = next(k for k, v in matrix["groups"].items() if name in v)
    s, res = matrix["settings"][lead], matrix["results"]
    for fit in (f"fit:{lead}",) if s.get("tokenizer") else ():
        assert res[fit]["exit"] == 0, res[fit]
    pre, post = res[f"{lead}.gpu.preempted"], res[f"{lead}.gpu.resumed"]
    assert pre["exit"] == 75, (lead, pre)  # checkpointed on SIGTERM, "resume me"
    assert post["exit"] == 0, (lead, post)
    run = matrix["runs"][(lead, "gpu")]
    start = next(e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if e.get("event") == "start")
    assert start.get("precision", s["precision"]) == s["precision"], start
    assert [e["step"] for e in _events(run, "signal")] == [TERM_AT]
    assert len(_events(run, "resume")) == 1 or any("resume" in json.dumps(e) for e in _events(run, "start")[1:])
    key = "gen_loss" if s["kind"] == "pretrain" else "train_loss"
    got = _records(run, key)
    assert sorted(got) == list(range(1, STEPS + 1)), got
    assert all(v is not None and math.isfinite(v) for v in got.values()), got
    if s["kind"] == "finetune":
        assert (run / "last" / "model.safetensors").is_file()
        assert (run / "last_ema" / "model.safetensors").is_file() == bool(s["ema"])
        val = _records(run, "val_top1")
        assert STEPS in val
        if s["ema"]:
            assert STEPS in _records(run, "val_ema_top1")
    if s["kind"] == "segment":
        assert STEPS in _records(run, "val_mIoU")
    if s["kind"] == "clip":
        assert (run / "last" / "model.safetensors").is_file()
        assert STEPS in _records(run, "zeroshot_top1") and STEPS in _records(run, "val_recall_mean")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_settings_match_the_plain_path(matrix, name):
    """fp32: the config's ZeRO stage, partitioned build and activation checkpointing give the plain path's losses
    (ZeRO-0, whole build, no checkpointing); bf16's first loss is the plain one to bf16's rounding."""
    lead = next(k for k, v in matrix["groups"].items() if name in v)
    s, res = matrix["settings"][lead], matrix["results"]
    for v in ("fp32", "plain"):
        assert res[f"{lead}.{v}"]["exit"] == 0, (lead, v, res[f"{lead}.{v}"])
    keys = ("gen_loss", "dis_loss") if s["kind"] == "pretrain" else ("train_loss",)
    for key in keys:
        own, plain = (_records(matrix["runs"][(lead, v)], key) for v in ("fp32", "plain"))
        gpu = _records(matrix["runs"][(lead, "gpu")], key)
        assert sorted(own) == sorted(plain) == [1, 2]
        for step in (1, 2):
            assert own[step] == pytest.approx(plain[step], rel=1e-5, abs=1e-6), (lead, key, step, own, plain)
        if s["precision"] == "bf16":
            assert gpu[1] == pytest.approx(plain[1], rel=3e-2), (lead, key, gpu, plain)
        else:
            assert gpu[1] == pytest.approx(plain[1], rel=1e-5), (lead, key, gpu, plain)


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp16", r"fp16"),
    ("model.attention=flex", r"flex"),
])
def test_gpu_only_settings_are_refused_on_cpu_in_one_line(cifar_small, tmp_path, override, message):
    p = run_cli(["pretrain", "--config", "demo", "--data", str(cifar_small / "train.jsonl"), "--run-dir",
                 str(tmp_path / "r"), "train.device=cpu", override], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("megadigpt: error:"), p.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("name", [n for n in CONFIGS if kind_of(n) == "pretrain"])
def test_shipped_pretraining_checkpoint_converts_to_its_fp32_masters(matrix, name):
    """What fine-tuning, export and conversion read from a pretraining run in its GPU settings: the optimizer's fp32
    masters, whichever DeepSpeed optimizer holds them (ZeRO-3's partitions; under bf16 with ZeRO-0/1 DeepSpeed's
    BF16_Optimizer, whose files ``zero_to_fp32`` refuses); where the module states hold the bf16 weights whole,
    they are the masters rounded."""
    import torch

    from megadigpt.checkpoint.convert import load_deepspeed
    from megadigpt.checkpoint.safe_load import load

    lead = next(k for k, v in matrix["groups"].items() if name in v)
    run = matrix["runs"][(lead, "gpu")]
    sd = load_deepspeed(run)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    tag = sorted((run / "checkpoints").glob("step_*"))[-1]
    module = load(sorted(tag.glob("*model_states.pt"))[0])["module"]  # ZeRO-3: one per rank, partitions
    whole = {k: v for k, v in module.items() if k in sd and v.shape == sd[k].shape}
    if matrix["settings"][lead]["zero"] < 3:
        assert set(whole) == set(sd), sorted(set(sd) ^ set(whole))[:5]
    for k, v in whole.items():
        assert torch.equal(sd[k].to(v.dtype), v), k


def test_damaged_bf16_optimizer_checkpoint_is_one_line(matrix, tmp_path):
    """A BF16_Optimizer checkpoint from someone else: a fragment pointing outside its partition, or a rank's file
    missing, is a one-line error naming the folder, not a traceback or a silently wrong tensor."""
    import shutil

    import torch

    from megadigpt.checkpoint.convert import load_deepspeed
    from megadigpt.checkpoint.safe_load import load
    from megadigpt.config import ConfigError

    lead = next(n for n, s in matrix["settings"].items()
                if s["kind"] == "pretrain" and s["precision"] == "bf16" and s["zero"] in (0, 1))
    src = matrix["runs"][(lead, "gpu")]
    for damage in ("fragment", "missing rank"):
        run = tmp_path / damage.replace(" ", "_")
        shutil.copytree(src, run)
        tag = sorted((run / "checkpoints").glob("step_*"))[-1]
        rank1 = tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
        if damage == "fragment":
            state = load(rank1)
            mapping = state["optimizer_state_dict"]["param_slice_mappings"][0]
            name, frag = next(iter(mapping.items()))
            mapping[name] = type(frag)(numel=frag.numel, start=10 ** 9)
            torch.save(state, rank1)
        else:
            rank1.unlink()
        (tag / "megadigpt.json").unlink(missing_ok=True)  # the damage is what is tested, not the checksum record
        with pytest.raises(ConfigError) as e:
            load_deepspeed(run, tag.name)
        assert "\n" not in str(e.value) and str(tag) in str(e.value), str(e.value)

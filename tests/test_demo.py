"""The embedded default: the demo config (real photos from a wheel, the real EfficientNet-Lite0 teacher) trains
end to end on CPU and its loss falls; every promised metric is logged; a finished run directory resumes to nothing."""

import json

from .conftest import losses, run_cli


def test_demo_trains_and_loss_falls(tmp_path):
    run_dir = tmp_path / "demo"
    run_cli(["pretrain", "--run-dir", str(run_dir), "train.max_steps=40", "train.log_every=5", "train.ckpt_every=20",
             "optim.warmup_steps=5"])
    curve = losses(run_dir)
    assert sorted(curve) == [5, 10, 15, 20, 25, 30, 35, 40]
    gen0, dis0 = curve[5]
    gen1, dis1 = curve[40]
    assert gen1 < 0.8 * gen0 and dis1 < 0.8 * dis0, curve

    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("step") == 40 and "gen_loss" in r][-1]
    for key in ("gen_loss", "dis_loss", "lr", "grad_norm", "images_per_s", "mfu_student", "mfu_total", "bad_samples"):
        assert last.get(key) is not None, key
    assert 0 < last["mfu_student"] < last["mfu_total"] < 1
    start = next(r for r in records if r.get("event") == "start")
    assert start["flops_student_fwd"] > 0 and start["flops_teacher_fwd"] > 0
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    assert (run_dir / "config.yaml").is_file()

    # rerunning the same command finds the finished run and trains nothing more
    run_cli(["pretrain", "--run-dir", str(run_dir), "train.max_steps=40", "train.log_every=5", "train.ckpt_every=20",
             "optim.warmup_steps=5"])
    assert losses(run_dir) == curve

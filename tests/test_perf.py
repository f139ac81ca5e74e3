"""The planner and the benchmark: the meta-device memory trace against real tensors, the ZeRO model-state formulas
against DeepSpeed's own estimator, ``megadigpt plan`` and a real two-rank ``megadigpt bench`` sweep."""

import json

import pytest
import torch

from .conftest import TINY, run_cli

TINY_MODEL = [o for o in TINY if o.startswith(("model.", "target."))]


def test_live_bytes_counts_storages_once_and_frees_them():
    from megadigpt.perf.memory import LiveBytes

    with LiveBytes() as tr:
        a = torch.empty(1000)  # 4000 B
        v = a.view(10, 100)  # a view: same storage
        a.add_(1)  # in place: same storage
        b = torch.empty(500, dtype=torch.float64)  # 4000 B
        assert tr.live == 8000
        del a, v
        c = torch.empty(250)  # 1000 B after a's 4000 B were freed
        assert tr.live == 5000
    assert tr.peak == 8000
    del b, c


@pytest.mark.parametrize("attention,ckpt", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_meta_trace_equals_the_real_step_on_cpu(attention, ckpt):
    """The planner's activation trace (meta device, fused-attention model) against the same micro-step on real
    CPU tensors, counted by the same tracker."""
    from megadigpt.config import load_config
    from megadigpt.distributed.parallelize import apply_activation_checkpointing
    from megadigpt.model import build_model
    from megadigpt.perf.memory import LiveBytes, trace_micro_step
    from megadigpt.targets import build_target

    cfg = load_config(None, ["model.arch=vit_tiny", "model.img_size=64", "model.patch_size=8", "model.depth=3",
                             "model.decoder_dim=64", "model.decoder_heads=4", "target.kind=efficientnet_lite0",
                             f"model.attention={attention}"])
    B = 3
    teacher = build_target(cfg.target, cfg.model)
    model = build_model(cfg.model, teacher.spec.dim, teacher.spec.grid)
    if ckpt:
        apply_activation_checkpointing(model)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    x = torch.randn(B, 3, 64, 64)
    order = torch.stack([torch.randperm(4) for _ in range(B)])
    with LiveBytes() as tr:
        with torch.no_grad():
            tok, cls = teacher(x)
        gen, dis = model(x, tok, cls, order)
        (gen.mean() + dis.mean()).backward()
    planned = trace_micro_step(cfg, B, "fp32", "fp32", ckpt, attention)
    assert abs(planned - tr.peak) / tr.peak < 0.02, (planned, tr.peak)


def test_zero_states_agree_with_deepspeeds_estimator():
    """With 16-bit gradient accumulation (what DeepSpeed's estimator assumes), ZeRO-2 without buffers is its own
    2P + 18P/N; ZeRO-3 is ours = its 18P/N + the 2-byte gradient partition it leaves out (stage3.py allocates
    grad_partitions_flat_buffer). megadigpt's default, fp32 accumulation for 16-bit runs, adds 2 bytes per
    gradient element held (ZeRO-2/3: the partition; ZeRO-1's BF16_Optimizer: a full fp32 accumulator)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from megadigpt.perf.memory import ZeroBuffers, model_states

    P, largest, N = 304_000_000, 12_600_000, 16
    bf16_accum = ZeroBuffers(contiguous_gradients=False, grad_accum="bf16", comm_dtype="bf16")
    fp32_accum = ZeroBuffers(contiguous_gradients=False)

    def total(s):
        return s["params"] + s["grads"] + s["optimizer"] + s["fp32_grads"]

    s2 = model_states(P, largest, N, 2, "bf16", buffers=bf16_accum)
    _, ds2 = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=N, cpu_offload=False)
    assert abs(total(s2) - ds2) <= N * 20
    assert total(model_states(P, largest, N, 2, "bf16", buffers=fp32_accum)) - total(s2) == 2 * -(-P // N)
    s3 = model_states(P, largest, N, 3, "bf16", buffers=bf16_accum)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(P, largest, num_gpus_per_node=N, cpu_offload=False)
    assert abs(total(s3) - (ds3 - 4 * largest) - 2 * P / N) <= N * 20
    assert total(model_states(P, largest, N, 3, "bf16", buffers=fp32_accum)) - total(s3) == 2 * -(-P // N)
    # more ranks, less per rank; stage 1 keeps whole gradients (BF16_Optimizer: 16-bit + a full fp32
    # accumulator), stage 3 whole parameters only while gathered
    s1 = model_states(P, largest, N, 1, "bf16", buffers=bf16_accum)
    assert s1["grads"] == 2 * P and s2["grads"] < s1["grads"] and s3["params"] < s2["params"]
    assert model_states(P, largest, N, 1, "bf16", buffers=fp32_accum)["grads"] == 6 * P
    off = model_states(P, largest, N, 3, "bf16", offload=True, buffers=bf16_accum)
    assert off["optimizer"] == 0 and off["host"] == s3["optimizer"] + s3["fp32_grads"]


def test_auto_buckets_follow_the_model():
    """ds_configs' "auto" bucket sizes are an eighth of the student (bounded), not 5e8 elements: a ViT-L student
    gets several buckets for overlap_comm to overlap, a tiny one no 1-2 GB buffer; explicit values win; the
    planner sizes the buckets it counts from the same resolved values."""
    from megadigpt.config import load_config
    from megadigpt.distributed.engine import BUCKET_MAX, BUCKET_MIN, build_ds_config
    from megadigpt.perf.memory import ds_buffers, student_params

    def cfg_for(arch, stage, extra=()):
        return load_config(None, [f"model.arch={arch}", "target.kind=pixels", f"train.zero_stage={stage}",
                                  "train.global_batch=64", "train.micro_batch=32", *extra])

    for arch in ("vit_large", "vit_tiny"):
        for stage in (1, 2, 3):
            cfg = cfg_for(arch, stage)
            P = student_params(cfg)
            z = build_ds_config(cfg, 2, "bf16")["zero_optimization"]
            keys = ("reduce_bucket_size", "allgather_bucket_size") if stage < 3 else (
                "reduce_bucket_size", "stage3_prefetch_bucket_size")
            for k in keys:
                assert BUCKET_MIN <= z[k] <= BUCKET_MAX and P / 8 <= z[k] < P / 8 + BUCKET_MIN, (arch, k, z[k], P)
            assert z["reduce_bucket_size"] < P  # several buckets per backward, whatever the model
            assert ds_buffers(cfg, stage, P).reduce_bucket == z["reduce_bucket_size"]
    large, tiny = (build_ds_config(cfg_for(a, 2), 2, "bf16")["zero_optimization"]["reduce_bucket_size"]
                   for a in ("vit_large", "vit_tiny"))
    assert large > tiny


def test_explicit_bucket_sizes_win(tmp_path):
    from megadigpt.config import load_config
    from megadigpt.distributed.engine import DS_CONFIG_DIR, build_ds_config
    from megadigpt.perf.memory import ds_buffers

    ds = json.loads((DS_CONFIG_DIR / "zero2.json").read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = 123456
    path = tmp_path / "z2.json"
    path.write_text(json.dumps(ds))
    cfg = load_config(None, ["model.arch=vit_tiny", "target.kind=pixels", "train.zero_stage=2",
                             f"train.ds_config={path}", "train.global_batch=64", "train.micro_batch=32"])
    z = build_ds_config(cfg, 2, "bf16")["zero_optimization"]
    assert z["reduce_bucket_size"] == 123456 and z["allgather_bucket_size"] != "auto"
    assert ds_buffers(cfg, 2, 10 ** 6).reduce_bucket == 123456


def test_plan_cli(tmp_path):
    from megadigpt.cli import RESERVE_GIB as CLI_RESERVE_GIB
    from megadigpt.perf.memory import RESERVE_GIB

    assert CLI_RESERVE_GIB == RESERVE_GIB >= 3  # CUDA context + NCCL + DALI pools: 3-4 GiB on H100 nodes
    out = tmp_path / "plan.json"
    proc = run_cli(["plan", "--config", "demo", "--models", "vit_small/16,vit_base/16", "--gpus", "4", "--gpu-mem",
                    "9", "--zero", "1,3", "--ckpt", "off,on", "--offload", "off", "--json", str(out),
                    "train.global_batch=256"])
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * 2 and "| vit_base/16 | 3 | on |" in proc.stdout
    by = {(r["arch"], r["stage"], r["checkpointing"]): r for r in rows}
    for (arch, stage, ck), r in by.items():
        assert r["max_micro_batch"] >= r["recommended_micro_batch"] >= 1
        assert (256 // 4) % r["recommended_micro_batch"] == 0
        assert r["fits"] == (r["total_gib"] <= 9 - RESERVE_GIB)  # the default reserve outside torch's tensors
        assert by[(arch, stage, True)]["activations_gib"] < by[(arch, stage, False)]["activations_gib"]
        assert by[(arch, 3, ck)]["grads_gib"] < by[(arch, 1, ck)]["grads_gib"]
    assert by[("vit_small", 3, True)]["max_micro_batch"] > by[("vit_base", 3, True)]["max_micro_batch"]
    # bad input: one line, before any work
    bad = run_cli(["plan", "--models", "vit_enormous/16"], check=False)
    assert bad.returncode == 2 and "unknown model" in bad.stderr


def test_bench_two_ranks_with_baseline(tmp_path):
    """A real sweep: the reference-style baseline and ZeRO-1 / ZeRO-3 cases, two gloo ranks each."""
    out = tmp_path / "bench"
    proc = run_cli(["bench", "--models", "vit_tiny/4", "--img-size", "32", "--teacher", "pixels", "--zero", "1,3",
                    "--micro-batch", "4", "--ranks", "2", "--steps", "2", "--warmup", "1", "--rounds", "2",
                    "--out", str(out),
                    *TINY_MODEL], timeout=900)
    rep = json.loads((out / "bench.json").read_text())
    rows = rep["rows"]
    assert [(r["case"]["baseline"], r["case"]["zero"]) for r in rows] == [(True, 0), (False, 1), (False, 3)]
    # interleaved: round 1 runs every case, then round 2 runs every case again
    assert rep["schedule"] == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    # one peak rate for the whole sweep: every case's MFU is against the same number
    assert len({r["result"]["peak_tflops"] for r in rows}) == 1
    assert "once for the sweep" in rows[0]["result"]["peak_tflops_source"]
    base = rows[0]["result"]
    assert rows[0]["case"]["attention"] == "eager" and base["precision"] == "fp32"
    for r in rows:
        x = r["result"]
        assert x["status"] == "ok", x
        assert x["world_size"] == 2 and x["images_per_s"] > 0
        assert x["images_per_s"] == pytest.approx(8 / x["step_s"])
        assert sum(x["phases_s"].values()) == pytest.approx(x["synced_step_s"], rel=0.1)
        assert x["comm_s"] > 0 and x["comm_ops_s"]  # gloo collectives, timed by DeepSpeed's logger
        assert x["skipped_warmup_steps"] == x["skipped_timed_steps"] == 0  # fp32: no loss scale, nothing skipped
        assert 0 < x["mfu_student"] < 1 and x["flops_teacher_fwd"] == 0  # pixels: no teacher FLOPs
        assert x["mfu_total"] == pytest.approx(x["mfu_student"])
        assert len(x["rounds_images_per_s"]) == 2 and x["images_per_s"] in x["rounds_images_per_s"]
        lo, hi = x["images_per_s_spread"]
        assert lo == min(x["rounds_images_per_s"]) <= x["images_per_s"] <= hi == max(x["rounds_images_per_s"])
        pairs = [a / b for a, b in zip(x["rounds_images_per_s"], base["rounds_images_per_s"])]
        assert x["vs_baseline"] == pytest.approx(sum(pairs) / 2)  # the median of the per-round ratios
        assert x["vs_baseline_spread"] == pytest.approx([min(pairs), max(pairs)])
        if not r["case"]["baseline"]:  # the planner against the measured peak of the real engine
            assert 0.85 <= x["measured_over_planned"] <= 1.15, x
    # ds_configs' "auto" buckets follow the model: the tiny student's ZeRO-1 case no longer carries DeepSpeed's
    # 5e8-element fp32 bucket (1.86 GiB, allocated whole; the planner follows the resolved size, checked above)
    assert rows[1]["result"]["peak_gib"] < 5e8 * 4 / 2 ** 30 / 4
    md = (out / "bench.md").read_text()
    assert md.count("| vit_tiny/4@32 |") == 3 and "baseline" in md and md in proc.stdout
    assert (out / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("args,msg", [(["--teacher", "clip"], "unknown teacher"),
                                      (["--attention", "flex"], "FlexAttention"),
                                      (["--ckpt", "yes"], "expected on or off"),
                                      (["--models", "vit_base/x"], "arch/patch")])
def test_bench_bad_input_fails_before_any_work(tmp_path, args, msg):
    proc = run_cli(["bench", "--out", str(tmp_path / "b"), *args], check=False, timeout=120)
    assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "b").exists()



def test_bench_table_shows_device_used_when_recorded():
    """GPU rows carry torch.cuda.mem_get_info's device-wide use beside the allocator's peak; CPU rows do not, and
    their table has no such column."""
    from dataclasses import asdict

    from megadigpt.perf.bench import PHASES, Case, markdown

    x = {"status": "ok", "precision": "bf16", "images_per_s": 10.0, "step_s": 1.0, "world_size": 1,
         "phases_s": dict.fromkeys(PHASES, 0.1), "comm_s": 0.0, "peak_gib": 3.0, "planned_gib": 3.1,
         "measured_over_planned": 0.97}
    cpu = markdown([{"case": asdict(Case()), "result": x}])
    gpu = markdown([{"case": asdict(Case()), "result": {**x, "device_used_gib": 5.5}}])
    assert "device used GiB" not in cpu and "device used GiB" in gpu
    head, _, row = gpu.splitlines()
    cells = [c.strip() for c in row.split("|")]
    assert cells[[c.strip() for c in head.split("|")].index("device used GiB")] == "5.50"
    assert head.count("|") == row.count("|")


WARMUP_SCRIPT = r"""
import json, os, torch, deepspeed
from megadigpt.distributed.engine import micro_step
from megadigpt.perf.bench import warm_up
deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1},
      "steps_per_print": 10 ** 9}
engine = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)[0]
nonfinite, calls = torch.zeros(1), []

def step(bad):  # the first `bad` steps overflow: DeepSpeed skips their update, as for an fp16 overflow
    loss = engine(torch.randn(2, 4)).pow(2).mean()
    calls.append(micro_step(engine, loss * (float("inf") if len(calls) < bad else 1.0), nonfinite, last=True).applied)

out = {"skipped": warm_up(lambda: step(3), engine.was_step_applied, 2), "calls": list(calls),
       "ds_skipped": engine.skipped_steps, "global_steps": engine.global_steps}
try:
    warm_up(lambda: step(10 ** 6), engine.was_step_applied, 2, max_skipped=4)
except RuntimeError as e:
    out["never"] = str(e)
open(os.environ["OUT"], "w").write(json.dumps(out))
"""


def test_bench_warmup_counts_applied_steps_only(tmp_path):
    """fp16 (refused by DeepSpeed on CPU) starts its loss scale at 2^16: the first steps overflow and DeepSpeed
    skips them. The warm-up goes on until ``--warmup`` steps were applied (DeepSpeed's ``was_step_applied``, here
    on a real engine whose first 3 steps are skipped by megadigpt's non-finite path, which sets the same flag)
    and returns the skipped ones for the row; a scale that never settles stops it."""
    import subprocess
    import sys

    from .conftest import REPO, subprocess_env

    out, script = tmp_path / "warmup.json", tmp_path / "warmup.py"
    script.write_text(WARMUP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=str(REPO), capture_output=True, text=True, timeout=300,
                          env=subprocess_env(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", OUT=out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["calls"] == [False, False, False, True, True] and r["skipped"] == 3
    assert r["ds_skipped"] == 3 and r["global_steps"] == 5
    assert "4 optimizer steps skipped in the warm-up" in r["never"] and "did not settle" in r["never"]

"""A non-finite loss skips the whole step on every rank, identically: real DeepSpeed engines (ZeRO 0-3, fp32 and
bf16) on 2 gloo ranks, and the pretraining loop on 2 ranks with a NaN on the last micro-batch of an accumulated
step (issue 16, defect 5: that micro-batch's skipped backward also skipped ZeRO-0/1's all-reduce, and each rank
stepped with its own gradients)."""

import json
import os

import torch

from .conftest import TINY, free_port, run_cli

ACCUM, STEPS, NAN_STEP, NAN_RANK, ZERO_STEP = 2, 4, 2, 1, 4  # ZERO_STEP: every rank's gradients are all zero
# (ZeRO stage, precision, optimizer): torch's fused AdamW (what megadigpt builds) is told the verdict on the device
# (``found_inf``) and the step is queued before the host knows it; the unfused one takes the verdict on the host first
CASES = [(0, "fp32", "fused"), (1, "fp32", "fused"), (2, "fp32", "fused"), (3, "fp32", "fused"), (0, "bf16", "fused"),
         (1, "bf16", "fused"), (3, "bf16", "fused"), (0, "fp32", "loop"), (1, "bf16", "loop"), (3, "bf16", "loop")]


def _flat(engine, zero_stage):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
        return torch.cat([p.detach().float().reshape(-1) for p in params]).clone()


def _zero_section(zero_stage):
    """megadigpt's own template (overlapped, contiguous, bucketed reductions), its "auto" sizes left to DeepSpeed."""
    from megadigpt.distributed.engine import template_path

    z = json.loads(template_path(zero_stage).read_text()).get("zero_optimization", {})
    return {**{k: v for k, v in z.items() if v != "auto"}, "stage": zero_stage}


def _rank(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from megadigpt.distributed.engine import grad_norm, micro_step

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, rank=rank, world_size=world)
    report = {}
    for zero_stage, precision, kind in CASES:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05,
                                **({"fused": True} if kind == "fused" else {"foreach": False}))
        cfg = {"train_batch_size": 2 * ACCUM * world, "train_micro_batch_size_per_gpu": 2,
               "gradient_accumulation_steps": ACCUM, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
               "zero_optimization": _zero_section(zero_stage), "bf16": {"enabled": precision == "bf16"}}
        if precision == "bf16" and zero_stage > 0:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}  # what megadigpt's build_ds_config sets
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data: unreduced gradients differ
        nonfinite = torch.zeros(1)
        snaps, applied, norms = [_flat(engine, zero_stage)], [], []
        for step in range(1, STEPS + 1):
            for micro in range(ACCUM):
                x = torch.randn(2, 8, generator=gen).to(dtype)
                loss = engine(x).float().pow(2).mean()
                if (step, rank, micro) == (NAN_STEP, NAN_RANK, ACCUM - 1):  # the last micro-batch, one rank
                    loss = loss * float("nan")
                if step == ZERO_STEP:  # finite, with zero gradients: a real step whose norm is 0, not a skip
                    loss = loss * 0.0
                r = micro_step(engine, loss, nonfinite, last=micro == ACCUM - 1)
            applied.append(r.applied)
            norms.append(grad_norm(engine))
            snaps.append(_flat(engine, zero_stage))
        mine = torch.stack(snaps)
        everyone = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        report[f"{zero_stage}-{precision}-{kind}"] = {
            "applied": applied, "grad_norms": norms, "global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
            "micro_steps": engine.micro_steps,
            "replicas_differ": max((e - mine).abs().max().item() for e in everyone),
            "skipped_step_change": (snaps[NAN_STEP] - snaps[NAN_STEP - 1]).abs().max().item(),
            "other_steps_change": min((snaps[s] - snaps[s - 1]).abs().max().item()
                                      for s in range(1, STEPS + 1) if s != NAN_STEP)}
        engine.destroy()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


def test_nonfinite_step_is_skipped_identically_on_every_rank_under_every_zero_stage(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "report.json"
    mp.spawn(_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    report = json.loads(out.read_text())
    assert sorted(report) == sorted(f"{s}-{p}-{k}" for s, p, k in CASES)
    for case, r in report.items():
        assert r["applied"] == [s != NAN_STEP for s in range(1, STEPS + 1)], (case, r)
        assert r["replicas_differ"] == 0.0, (case, r)  # bit-identical replicas on both ranks, every step
        assert r["skipped_step_change"] == 0.0, (case, r)  # the skipped step changed no weight
        assert r["other_steps_change"] > 0, (case, r)  # the others did train
        # the skipped step has no norm (DeepSpeed's -1 mask is not logged as a norm), the zero-gradient step has 0
        assert r["grad_norms"][NAN_STEP - 1] is None, (case, r)
        if case.startswith("0-fp32"):  # DeepSpeed's ZeRO-0 fp32 engine around a torch optimizer reports no norm
            continue
        assert r["grad_norms"][ZERO_STEP - 1] == 0.0, (case, r)
        assert all(n > 0 for s, n in enumerate(r["grad_norms"], 1) if s not in (NAN_STEP, ZERO_STEP)), (case, r)
        # DeepSpeed's counters as after any skipped (fp16-overflow) step: the boundaries stay where they were
        assert (r["global_steps"], r["skipped_steps"], r["micro_steps"]) == (STEPS, 1, STEPS * ACCUM), (case, r)


def _module(run_dir, step):
    from megadigpt.checkpoint.safe_load import deepspeed_loads

    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    with deepspeed_loads():
        return torch.load(path, map_location="cpu", weights_only=True)["module"]


def test_nan_on_the_last_micro_batch_skips_the_step_in_pretraining(cifar_dir, tmp_path):
    """ZeRO-0, 2 ranks, 2 micro-batches per step; rank 1's second micro-batch of step 2 is NaN: step 2 changes no
    weight (before, rank 0 stepped with its own unreduced first micro-batch), is counted, and step 3 trains."""
    run_dir = tmp_path / "nan0"
    run_cli(["pretrain", "--data", str(cifar_dir / "train-000000.tar"), "--run-dir", str(run_dir), *TINY,
             "train.global_batch=8", "train.micro_batch=2", "train.max_steps=3", "train.zero_stage=0",
             "train.ckpt_every=1", "train.log_every=1"], nproc=2, MEGADIGPT_FAULTS="nan=2:1:1")
    w = {s: _module(run_dir, s) for s in (1, 2, 3)}
    assert w[1].keys() == w[2].keys()
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1])  # the skipped step changed nothing
    assert any(not torch.equal(w[2][k], w[3][k]) for k in w[2])
    ev = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ev if e.get("event") == "nonfinite_loss"] == [2]
    logged = {e["step"]: e for e in ev if "gen_loss" in e}
    assert logged[2]["gen_loss"] is None and logged[3]["nonfinite_steps"] == 1
    assert all(logged[s]["gen_loss"] == logged[s]["gen_loss"] for s in (1, 3))  # finite, not NaN

"""The GPU acceptance run: every check that needs a GPU, in one prepared script, within a time budget.

GPU time comes rarely and in minutes (one H100/H200 for about 15 minutes, start-up and installs included), so
this runs once, top to bottom, and every minute of it produces a recorded number. Each check is independent: one
that fails or runs out of time is recorded and the next one runs. Results go to ``--out`` (``$OUT`` under
acceptance.sh): ``acceptance.json`` (everything), ``acceptance.md`` (the tables for the docs), ``bench.json`` /
``bench.md`` (the throughput sweep).

Checks
    environment       torch / CUDA / device / versions; DALI cannot travel to a bare GPU image (its wheel is
                      ~200 MB), so its GPU checks are skipped there and say so
    attention         every backend (sdpa, prefix, flex, eager) agrees in bf16 forward and backward with an fp32
                      eager oracle at ViT-L/14's shapes; then their speed (benchmarks/attention_backends.py)
    cpu_gpu_loss      the same tiny model and batch give the same fp32 loss on the GPU and on the CPU
    engine_bf16       the bf16 DeepSpeed engine runs ZeRO-1 and ZeRO-3 pretraining steps (real CLI, 1 rank)
    optimizer         torch's fused AdamW vs DeepSpeed's FusedAdam vs the per-parameter loop on ViT-L-sized
                      parameters (which one the GPU path should use)
    throughput        `megadigpt bench`: D-iGPT-B/16 and D-iGPT-L/14 with an OpenCLIP ViT-H/14-shaped teacher
                      (random weights: the speed does not depend on them), bf16, each attention backend, compile
                      off/on, and the reference-style baseline, interleaved; images/s, MFU (student and total),
                      peak memory against `megadigpt plan`, device memory in use
    segment_step      `megadigpt bench --config segment_ade20k_vitb16`: the segmentation training step (ViT + neck +
                      UperNet + aux FCN) of B/16 and L/14 at ADE20K's 512 px crop, micro-batch 2 (the recipe's
                      8 x 2), bf16, ZeRO-1, L/14 also with activation checkpointing; images/s and peak memory
                      against the segmentation planner (perf.segment_memory)
    targets           on an H100/H200: >= 45% total MFU for D-iGPT-L/14 with the H/14 teacher, >= 2x the baseline

``--dry-run`` (CPU): every check's CPU-runnable part at toy sizes, so that this script cannot rot
(tests/test_gpu_acceptance.py runs it in the suite).
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def deadline(self, reserve: float = 0.0) -> float:
        return self.t0 + self.seconds - reserve


# ============================================================================ checks


def check_environment(a):
    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0], "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                    bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
    for mod in ("deepspeed", "timm", "open_clip"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"missing ({type(e).__name__})"
    try:
        import nvidia.dali as dali

        info["dali"] = dali.__version__
    except ImportError:
        info["dali"] = ("not installed: its ~200 MB wheel cannot travel to a bare GPU image, so DALI's GPU path "
                        "(mixed decoding) is not checked here")
    return {"status": "ok", **info}


def check_attention(a):
    """bf16 forward/backward of each backend against an fp32 eager oracle, then the interleaved timing table."""
    import torch

    from megadigpt.model.attention import AttentionMask, masked_attention
    from megadigpt.model.masks import SegmentLayout

    dev = a.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    grid, heads, hd, batch = (16, 16, 64, 8) if not a.dry_run else (8, 2, 8, 2)  # ViT-L/14 at 224: 193 tokens
    lay = SegmentLayout(grid, 2)
    mask = AttentionMask(lay.mask()).to(dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, w = (torch.randn(batch, heads, lay.seq_len, hd, generator=g) for _ in range(4))
    ref_in = [t.to(dev).double().requires_grad_() for t in (q, k, v)]
    ref = masked_attention(*ref_in, mask, "eager")
    ref_grads = torch.autograd.grad((ref * w.to(dev).double()).sum(), ref_in)
    backends = ["sdpa", "prefix", "eager"] + (["flex"] if dev == "cuda" else [])
    rows = {}
    for b in backends:
        x = [t.to(dev, dtype).requires_grad_() for t in (q, k, v)]
        out = masked_attention(*x, mask, b)
        grads = torch.autograd.grad((out * w.to(dev, dtype)).sum(), x)
        rows[b] = {"forward_max_err": (out.double() - ref).abs().max().item(),
                   "backward_max_err": max((gr.double() - rg).abs().max().item() for gr, rg in zip(grads, ref_grads))}
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
    ok = all(r["forward_max_err"] <= tol and r["backward_max_err"] <= 4 * tol for r in rows.values())
    if dev != "cuda":
        rows["flex"] = {"skipped": "FlexAttention has no CPU backward"}
    import attention_backends

    buf = io.StringIO()
    args = (["--device", "cuda", "--dtype", "bf16", "--rounds", "20", "--backends", "eager,sdpa,prefix,flex"]
            if dev == "cuda" else ["--device", "cpu", "--rounds", "2", "--batch", "2", "--shapes", "vit_tiny/16",
                                   "--img-size", "64"])
    with contextlib.redirect_stdout(buf):
        attention_backends.main(args)
    return {"status": "ok" if ok else "fail", "dtype": str(dtype), "tolerance": tol, "backends": rows,
            "speed_table": buf.getvalue()}


def _tiny_model():
    import torch

    from megadigpt.model.digpt import DiGPT
    from megadigpt.model.vit import ViTEncoder

    torch.manual_seed(0)
    enc = ViTEncoder(32, 4, 64, 4, 2)
    return DiGPT(enc, 2, 24, 8, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def check_cpu_gpu_loss(a):
    """The same weights, batch and segment orders: fp32 loss on the device equals the CPU's (TF32 off)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(1)
    images, tokens, cls = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 64, 24, generator=g), \
        torch.randn(4, 24, generator=g)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(4)])
    losses = {}
    for dev in ("cpu", a.device):
        m = _tiny_model().to(dev).eval()
        with torch.no_grad():
            gen, dis = m(images.to(dev), tokens.to(dev), cls.to(dev), order.to(dev))
        losses[dev] = [gen.mean().item(), dis.mean().item()]
    diff = max(abs(x - y) for x, y in zip(losses["cpu"], losses[a.device]))
    return {"status": "ok" if diff <= 1e-4 else "fail", "losses": losses, "max_abs_diff": diff,
            "note": "the dry run compares the CPU with itself" if a.device == "cpu" else ""}


def check_engine_bf16(a):
    """Real `megadigpt pretrain` (1 rank, no launcher) in bf16 under ZeRO-1 and ZeRO-3: finite, falling losses."""
    out = {}
    for stage in (1, 3):
        run = Path(a.work) / f"engine_z{stage}"
        cmd = [sys.executable, "-m", "megadigpt", "pretrain", "--data", "demo", "--run-dir", str(run),
               "model.arch=vit_tiny", "model.embed_dim=64", "model.depth=4", "model.num_heads=2", "model.img_size=32",
               "model.patch_size=4", "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
               "target.kind=pixels", "target.patch_size=4", "data.num_workers=0", "data.loader=torch",
               "optim.lr=1e-3", "optim.warmup_steps=1", "train.log_every=1", "train.tensorboard=false",
               "train.progress=off", "train.global_batch=8", "train.micro_batch=8", f"train.zero_stage={stage}",
               "train.precision=bf16", f"train.max_steps={3 if a.dry_run else 6}"]
        env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
        env.pop("RANK", None)
        env.pop("WORLD_SIZE", None)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO))
        recs = []
        if (run / "metrics.jsonl").is_file():
            recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in recs if r.get("loss") is not None]
        start = next((r for r in recs if r.get("event") == "start"), {})
        out[f"zero{stage}"] = {"exit": proc.returncode, "seconds": round(time.monotonic() - t0, 1), "losses": losses,
                               "precision": start.get("precision"), "grad_accum_dtype": start.get("grad_accum_dtype"),
                               "stderr_tail": proc.stderr[-600:] if proc.returncode else ""}
    ok = all(v["exit"] == 0 and v["losses"] and v["precision"] == "bf16" for v in out.values())
    return {"status": "ok" if ok else "fail", **out}


def check_optimizer(a):
    """torch's fused AdamW (what build_optimizer uses) against DeepSpeed's FusedAdam (JIT-built here) and the
    per-parameter loop, interleaved, on ViT-L-sized fp32 parameters: which one the GPU path should use."""
    import statistics

    import torch

    dev = a.device
    shapes = [(1024, 4096)] * 48 + [(4096, 1024)] * 48 + [(1024, 3072)] * 24 if not a.dry_run else [(64, 64)] * 8
    params = [torch.randn(s, device=dev, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    makers = {"torch_fused": lambda: torch.optim.AdamW(params, lr=1e-4, fused=True),
              "torch_loop": lambda: torch.optim.AdamW(params, lr=1e-4, foreach=False)}
    notes = {}
    if dev == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            makers["deepspeed_fused"] = lambda: FusedAdam(params, lr=1e-4, adam_w_mode=True)
        except Exception as e:  # noqa: BLE001 - the JIT build needs nvcc and ninja
            notes["deepspeed_fused"] = f"not built: {type(e).__name__}: {str(e)[:200]}"
    opts = {k: f() for k, f in makers.items()}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    times = {k: [] for k in opts}
    for _ in range(2):
        for o in opts.values():
            o.step()
    for _ in range(10 if not a.dry_run else 2):
        for k, o in opts.items():
            sync()
            t0 = time.perf_counter()
            o.step()
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"status": "ok", "params": sum(p.numel() for p in params), "median_ms": med,
            "fastest": min(med, key=med.get), **({"notes": notes} if notes else {})}


def check_throughput(a, budget: Budget):
    from megadigpt.perf.bench import Case, run_bench

    if a.dry_run:
        models, teacher, img, mb, backends, compiled = [("vit_tiny", 4)], "pixels", 32, 4, ["prefix"], []
        overrides = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.decoder_dim=32",
                     "model.decoder_depth=1", "model.decoder_heads=2", "target.patch_size=4", "data.num_workers=0"]
        steps, warmup, rounds = 1, 1, 2
    else:
        models, teacher, img, mb = [("vit_base", 16), ("vit_large", 14)], "open_clip:ViT-H-14", 224, 64
        backends, compiled, overrides = ["sdpa", "prefix", "flex"], ["prefix", "sdpa"], []
        steps, warmup, rounds = 8, 3, 2
    cases = []
    for arch, patch in models:
        for b in backends:
            cases.append(Case(arch, patch, img, teacher, 1, False, b, mb, "bf16" if not a.dry_run else "fp32"))
        if arch != "vit_base" or a.dry_run:  # compile costs a minute per case: spent where the target is (L/14)
            for b in compiled:
                cases.append(Case(arch, patch, img, teacher, 1, False, b, mb, "bf16", True))
    work = Path(a.work) / "bench"
    rep = run_bench(cases, 1, work, None, overrides, steps, warmup, None, timeout=max(60.0, budget.left()),
                    baseline=True, comm_steps=0, rounds=rounds, deadline=budget.deadline(reserve=30.0))
    for f in ("bench.json", "bench.md"):
        (Path(a.out) / f).write_text((work / f).read_text())
    rows = rep["rows"]
    ok_rows = [r for r in rows if r["result"]["status"] == "ok"]
    return {"status": "ok" if ok_rows else "fail", "cases": len(rows), "ok": len(ok_rows),
            "rounds_done": max((len(r["result"].get("rounds_images_per_s") or []) for r in rows), default=0),
            "table": (work / "bench.md").read_text(), "rows": rows}


def check_segment_step(a, budget: Budget):
    """The segmentation step at 512 px (1 rank, no baseline: only its speed and memory are owed). Capped at
    ~90 s of the budget, so the throughput sweep after it keeps most of the run."""
    from megadigpt.perf.bench import Case, as_task, run_bench

    base = "segment_ade20k_vitb16"
    if a.dry_run:
        shapes, mb, prec = [("vit_tiny", 4, False)], 2, "fp32"
        overrides = ["model.embed_dim=16", "model.depth=2", "model.num_heads=2", "model.crop_size=32",
                     "model.channels=16", "model.aux_channels=8", "data.num_workers=0"]
        steps, warmup = 1, 1
    else:
        shapes, mb, prec, overrides = [("vit_base", 16, False), ("vit_large", 14, False), ("vit_large", 14, True)], \
            2, "bf16", []
        steps, warmup = 5, 2
    cases = as_task([Case(arch, patch, 0, "none", 1, ckpt, "sdpa", mb, prec) for arch, patch, ckpt in shapes],
                    base, overrides)
    work = Path(a.work) / "segment"
    rep = run_bench(cases, 1, work, base, overrides, steps, warmup, None, timeout=max(60.0, budget.left()),
                    baseline=False, comm_steps=0, rounds=1,
                    deadline=min(budget.deadline(reserve=30.0), time.monotonic() + 90.0))
    for f in ("bench.json", "bench.md"):
        (Path(a.out) / f"segment_{f}").write_text((work / f).read_text())
    rows = rep["rows"]
    ok_rows = [r for r in rows if r["result"]["status"] == "ok"]
    return {"status": "ok" if ok_rows else "fail", "cases": len(rows), "ok": len(ok_rows),
            "table": (work / "bench.md").read_text(), "rows": rows}


def check_targets(a, throughput):
    """D-iGPT-L/14 with the H/14 teacher: best total MFU and best ratio to the baseline over the cases that ran."""
    rows = [r for r in (throughput or {}).get("rows", []) if r["result"]["status"] == "ok"
            and not r["case"]["baseline"] and r["case"]["arch"] == ("vit_large" if not a.dry_run else "vit_tiny")]
    if not rows:
        return {"status": "fail", "error": "no D-iGPT-L/14 case ran"}
    best_mfu = max(rows, key=lambda r: r["result"].get("mfu_total") or 0)
    best_x = max(rows, key=lambda r: r["result"].get("vs_baseline") or 0)
    mfu, x = best_mfu["result"].get("mfu_total"), best_x["result"].get("vs_baseline")
    res = {"best_mfu_total": mfu, "best_mfu_case": best_mfu["case"], "best_vs_baseline": x,
           "best_vs_baseline_case": best_x["case"], "target_mfu_total": 0.45, "target_vs_baseline": 2.0}
    if a.dry_run:
        return {"status": "ok", "note": "targets apply to an H100/H200; the dry run only computes them", **res}
    met = (mfu or 0) >= 0.45 and (x or 0) >= 2.0
    return {"status": "ok" if met else "fail", **res}


# ============================================================================ report


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    lines = [f"# GPU acceptance run, {results['date']}, {env.get('device', 'CPU (dry run)')}", "",
             f"torch {env.get('torch')}, DeepSpeed {env.get('deepspeed')}, timm {env.get('timm')}, open_clip "
             f"{env.get('open_clip')}; DALI: {env.get('dali')}; {results['seconds']:.0f} s in all"
             f"{' (DRY RUN on CPU: toy sizes, no GPU numbers)' if results['dry_run'] else ''}", "",
             "| check | status | seconds | summary |", "|---|---|---|---|"]
    for name in ("environment", "attention", "cpu_gpu_loss", "engine_bf16", "optimizer", "segment_step", "throughput",
                 "targets"):
        r = results.get(name, {"status": "not run"})
        summary = ""
        if name == "attention" and "backends" in r:
            summary = "; ".join(f"{b}: fwd {v['forward_max_err']:.1e} bwd {v['backward_max_err']:.1e}"
                                for b, v in r["backends"].items() if "forward_max_err" in v)
        elif name == "cpu_gpu_loss" and "max_abs_diff" in r:
            summary = f"max |loss diff| {r['max_abs_diff']:.1e}"
        elif name == "engine_bf16":
            summary = "; ".join(f"{k}: exit {v['exit']}, losses {[round(x, 3) for x in v['losses']]}"
                                for k, v in r.items() if isinstance(v, dict) and "exit" in v)
        elif name == "optimizer" and "median_ms" in r:
            summary = ", ".join(f"{k} {v:.2f} ms" for k, v in r["median_ms"].items()) + f"; fastest {r['fastest']}"
        elif name in ("throughput", "segment_step") and "cases" in r:
            summary = f"{r['ok']}/{r['cases']} cases" + (f", {r['rounds_done']} round(s)" if "rounds_done" in r else "")
        elif name == "targets" and "best_mfu_total" in r:
            summary = (f"best total MFU {_pct(r['best_mfu_total'])} (target 45%), best vs baseline "
                       f"{_x(r['best_vs_baseline'])} (target 2x)")
        if r.get("error"):
            summary = (summary + " " + r["error"]).strip()[:300]
        lines.append(f"| {name} | {r.get('status')} | {r.get('seconds', '')} | {summary} |")
    if "attention" in results and results["attention"].get("speed_table"):
        lines += ["", "## Attention backends", "", results["attention"]["speed_table"].strip()]
    if "segment_step" in results and results["segment_step"].get("table"):
        lines += ["", "## Segmentation step at 512 px (megadigpt bench --config segment_ade20k_vitb16)", "",
                  results["segment_step"]["table"].strip()]
    if "throughput" in results and results["throughput"].get("table"):
        lines += ["", "## Throughput (megadigpt bench, interleaved rounds)", "", results["throughput"]["table"].strip()]
    return "\n".join(lines) + "\n"


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}%"


def _x(v):
    return "–" if v is None else f"{v:.2f}x"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/acceptance"))
    ap.add_argument("--work", default=None, help="scratch folder (default: a folder beside --out)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="time for all checks (the sweep gets the rest)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: every check's CPU-runnable part")
    a = ap.parse_args(argv)
    import torch

    a.device = "cuda" if torch.cuda.is_available() and not a.dry_run else "cpu"
    if not a.dry_run and a.device != "cuda":
        print("acceptance: no GPU visible; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.work = a.work or str(Path("/tmp") / f"megadigpt_acceptance_{os.getpid()}")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    budget = Budget(a.budget_s)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": a.dry_run}
    checks = [("environment", check_environment), ("attention", check_attention),
              ("cpu_gpu_loss", check_cpu_gpu_loss), ("engine_bf16", check_engine_bf16), ("optimizer", check_optimizer),
              ("segment_step", lambda a: check_segment_step(a, budget)),
              ("throughput", lambda a: check_throughput(a, budget)),
              ("targets", lambda a: check_targets(a, results.get("throughput")))]
    for name, fn in checks:
        t0 = time.monotonic()
        print(f"[acceptance] {name} ({budget.left():.0f} s left)", flush=True)
        try:
            res = fn(a)
        except Exception as e:  # noqa: BLE001 - recorded; the next check runs
            res = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        res["seconds"] = round(time.monotonic() - t0, 1)
        results[name] = res
        print(f"[acceptance] {name}: {res['status']} in {res['seconds']} s", flush=True)
        (out / "acceptance.json").write_text(json.dumps(results, indent=1, default=str))  # kept if killed later
    results["seconds"] = time.monotonic() - budget.t0
    (out / "acceptance.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "acceptance.md").write_text(markdown(results))
    print(markdown(results))
    return 0 if all(results[n]["status"] == "ok" for n, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

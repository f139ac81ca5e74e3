"""The GPU acceptance run: every check that needs a GPU, in one prepared script, within a time budget.

GPU time comes rarely and in minutes (one H100/H200 for about 15 minutes, start-up and installs included), so
this runs once, top to bottom, and every minute of it produces a recorded number. Each check is independent: one
that fails or runs out of time is recorded and the next one runs. Each check has its own time cap (``CAPS``,
recorded in the JSON as ``cap_s``): it ends at the cap or when the budget is spent, whichever comes first, so no
check eats the time of the ones after it. The order puts first what the run is for: correctness, then D-iGPT-L/14
with the H/14-shaped teacher (the 45% MFU / 2x targets), then B/16 and segmentation as time allows. Results go to
``--out`` (``$OUT`` under acceptance.sh): ``acceptance.json`` (everything), ``acceptance.md`` (the tables for the
docs), ``bench_l14.json``, ``bench_b16.json``, ``segment_bench.json`` (the sweeps), ``acceptance.log``.

Checks, in this order
    environment       torch / CUDA / device / versions; DALI cannot travel to a bare GPU image (its wheel is
                      ~200 MB), so its GPU checks are skipped there and say so
    attention         every backend (sdpa, prefix, flex, eager) agrees in bf16 forward and backward with an fp32
                      eager oracle at ViT-L/14's shapes; then their speed (benchmarks/attention_backends.py)
    cpu_gpu_loss      the same tiny model and batch give the same fp32 loss on the GPU and on the CPU
    engine_bf16       the bf16 DeepSpeed engine runs ZeRO-1 and ZeRO-3 pretraining steps (real CLI, 1 rank)
    throughput_l14    `megadigpt bench`: D-iGPT-L/14 with an OpenCLIP ViT-H/14-shaped teacher (random weights: the
                      speed does not depend on them), bf16, micro-batch 64: the reference-style baseline, sdpa,
                      prefix, prefix + torch.compile, sdpa under ZeRO-3, interleaved in rounds; images/s, MFU
                      (student and total), peak memory against `megadigpt plan`, device memory in use
    targets           on an H100/H200: >= 45% total MFU for D-iGPT-L/14 with the H/14 teacher, >= 2x the baseline
    optimizer         torch's fused AdamW vs DeepSpeed's FusedAdam vs the per-parameter loop on ViT-L-sized
                      parameters (which one the GPU path should use)
    throughput_b16    the same for D-iGPT-B/16 (baseline, sdpa, prefix), as time allows
    segment_step      `megadigpt bench --config segment_ade20k_vitb16`: the segmentation training step (ViT + neck +
                      UperNet + aux FCN) of B/16 and L/14 at ADE20K's 512 px crop, micro-batch 2 (the recipe's
                      8 x 2), bf16, ZeRO-1, L/14 also with activation checkpointing; images/s and peak memory
                      against the segmentation planner (perf.segment_memory), as time allows

``--dry-run`` (CPU): every check's CPU-runnable part at toy sizes, so that this script cannot rot
(tests/test_gpu_acceptance.py runs it in the suite; ``acceptance.sh --rehearse`` runs it in a fresh venv that holds
only the GPU image's packages and the carried wheels). The dry run leaves out the compile case: a cold compile
costs minutes on a CPU (tests/test_deepspeed.py covers ``train.compile`` there).
"""

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Each check's time cap in seconds, (GPU, dry run), in the order the checks run. GPU: with the default 420 s
# budget the correctness checks take ~2 minutes, L/14 gets the bulk (its 5 cases x 2 rounds at ~20-40 s a case,
# the compile case's first round ~1 min more), B/16 and segmentation what is left. Dry run: a loaded 2-core CPU,
# toy sizes, where each bench case is a fresh process importing torch and DeepSpeed (~15-25 s).
CAPS = {
    "environment": (30, 120),
    "attention": (90, 300),
    "cpu_gpu_loss": (30, 120),
    "engine_bf16": (150, 600),
    "throughput_l14": (270, 900),
    "targets": (10, 30),
    "optimizer": (45, 120),
    "throughput_b16": (90, 600),
    "segment_step": (90, 400),
}
# no new bench case starts in the last this-many seconds of its check's cap (GPU): about one case's time, so that
# a sweep ends at its cap with every started case finished instead of being cut mid-case
CASE_RESERVE_S = {"throughput_l14": 45, "throughput_b16": 20, "segment_step": 25}
MIN_CHECK_S = 5.0  # a check offered less than this by the budget is recorded as skipped
ALWAYS = {"targets"}  # computes the verdict from what ran, in no time: it runs even when the budget is spent


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def deadline(self, reserve: float = 0.0) -> float:
        return self.t0 + self.seconds - reserve


class CheckTimeout(BaseException):
    """Raised by SIGALRM at a check's cap. A BaseException, so that no ``except Exception`` inside a check (or a
    library) swallows it."""


class Clock:
    """One check's time: it ends at its cap or at the end of the budget, whichever is first."""

    def __init__(self, cap: float, budget: Budget):
        self.t0 = time.monotonic()
        self.end = min(self.t0 + cap, budget.deadline())

    def left(self) -> float:
        return self.end - time.monotonic()


def _on_alarm(signum, frame):
    raise CheckTimeout()


def _kill_children():
    """Kill what a check left running (a bench case's workers interrupted at the cap): only this process's own
    descendants, so that the next check has the GPU to itself."""
    try:
        import psutil
    except ImportError:
        return
    kids = psutil.Process().children(recursive=True)
    for k in kids:
        with contextlib.suppress(psutil.Error):
            k.kill()
    psutil.wait_procs(kids, timeout=10)


# ============================================================================ checks


def check_environment(a):
    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0], "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                    bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
    for mod in ("deepspeed", "timm", "open_clip", "triton", "pydantic", "braceexpand", "hjson"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "present")
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


def check_engine_bf16(a, clock: Clock):
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
        try:  # each run gets what is left of the cap: the second must not start the check's overrun
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO),
                                  timeout=max(1.0, clock.left()))
            code, err = proc.returncode, proc.stderr[-600:] if proc.returncode else ""
        except subprocess.TimeoutExpired:
            code, err = None, f"killed at the check's cap after {time.monotonic() - t0:.0f} s"
        recs = []
        if (run / "metrics.jsonl").is_file():
            recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in recs if r.get("loss") is not None]
        start = next((r for r in recs if r.get("event") == "start"), {})
        out[f"zero{stage}"] = {"exit": code, "seconds": round(time.monotonic() - t0, 1), "losses": losses,
                               "precision": start.get("precision"), "grad_accum_dtype": start.get("grad_accum_dtype"),
                               "stderr_tail": err}
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


# The sweeps. Case(arch, patch, img_size, teacher, zero, ckpt, attention, micro_batch, precision, compile, ...);
# run_bench adds each group's reference-style baseline first and runs the cases interleaved, round after round.
_TOY = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.decoder_dim=32", "model.decoder_depth=1",
        "model.decoder_heads=2", "target.patch_size=4", "data.num_workers=0"]


def sweep_plans(dry_run: bool) -> dict:
    """Every sweep's cases, base config, overrides, steps and rounds, by check name; the dry run's at toy sizes
    (L/14 -> a 64-wide ViT with patch 4 at 32 px, B/16 -> the same with patch 8, pixel targets, fp32)."""
    from megadigpt.perf.bench import Case

    if dry_run:
        l14 = [Case("vit_tiny", 4, 32, "pixels", 1, False, "sdpa", 4, "fp32"),
               Case("vit_tiny", 4, 32, "pixels", 1, False, "prefix", 4, "fp32"),
               Case("vit_tiny", 4, 32, "pixels", 3, False, "sdpa", 4, "fp32")]
        b16 = [Case("vit_tiny", 8, 32, "pixels", 1, False, "sdpa", 4, "fp32")]
        seg = [Case("vit_tiny", 4, 0, "none", 1, False, "sdpa", 2, "fp32")]
        seg_ov = ["model.embed_dim=16", "model.depth=2", "model.num_heads=2", "model.crop_size=32",
                  "model.channels=16", "model.aux_channels=8", "data.num_workers=0"]
        return {"throughput_l14": dict(cases=l14, base=None, overrides=_TOY, steps=1, warmup=1, rounds=2,
                                       baseline=True),
                "throughput_b16": dict(cases=b16, base=None, overrides=_TOY[:-2] + ["target.patch_size=8",
                                                                                  "data.num_workers=0"],
                                       steps=1, warmup=1, rounds=1,
                                       baseline=True),
                "segment_step": dict(cases=seg, base="segment_ade20k_vitb16", overrides=seg_ov, steps=1, warmup=1,
                                     rounds=1, baseline=False)}
    h14, mb = "open_clip:ViT-H-14", 64
    l14 = [Case("vit_large", 14, 224, h14, 1, False, "sdpa", mb, "bf16"),
           Case("vit_large", 14, 224, h14, 1, False, "prefix", mb, "bf16"),
           Case("vit_large", 14, 224, h14, 1, False, "prefix", mb, "bf16", True),  # the one compile case
           # the one ZeRO-3 case, compiled: whole blocks as ZeRO-3 leaves (distributed.parallelize), never yet run
           # on a GPU, and the path the ZeRO-3 configs take with train.compile
           Case("vit_large", 14, 224, h14, 3, False, "sdpa", mb, "bf16", True)]
    b16 = [Case("vit_base", 16, 224, h14, 1, False, "sdpa", mb, "bf16"),
           Case("vit_base", 16, 224, h14, 1, False, "prefix", mb, "bf16")]
    # the segmentation step at the config's 512 px crop (img_size 0), the recipe's micro-batch 2, no teacher
    seg = [Case("vit_base", 16, 0, "none", 1, False, "sdpa", 2, "bf16"),
           Case("vit_large", 14, 0, "none", 1, False, "sdpa", 2, "bf16"),
           Case("vit_large", 14, 0, "none", 1, True, "sdpa", 2, "bf16")]
    return {"throughput_l14": dict(cases=l14, base=None, overrides=[], steps=8, warmup=3, rounds=2, baseline=True),
            "throughput_b16": dict(cases=b16, base=None, overrides=[], steps=8, warmup=3, rounds=2, baseline=True),
            "segment_step": dict(cases=seg, base="segment_ade20k_vitb16", overrides=[], steps=5, warmup=2, rounds=1,
                                 baseline=False)}


SWEEP_FILES = {"throughput_l14": "bench_l14.json", "throughput_b16": "bench_b16.json",
               "segment_step": "segment_bench.json"}


def _salvage(work: Path):
    """The rows of a sweep cut at its cap: every case round that finished wrote its result.json."""
    from megadigpt.perf.bench import Case, aggregate, attach_speedups, markdown

    rows = []
    for cdir in sorted(work.glob("case*")):
        case, results = None, []
        for rdir in sorted(cdir.glob("round*")):
            if (rdir / "job.json").is_file():
                case = json.loads((rdir / "job.json").read_text())["case"]
            if (rdir / "result.json").is_file():
                results.append(json.loads((rdir / "result.json").read_text()))
        if case and results:
            rows.append({"case": case, "result": aggregate(Case(**case), results)})
    attach_speedups(rows)
    return rows, markdown(rows)


def check_sweep(a, name: str, clock: Clock):
    """One `megadigpt bench` sweep (1 rank): no case starts in the last CASE_RESERVE_S of the cap; one cut at the
    cap anyway (SIGALRM) is killed and the finished rounds are kept."""
    from megadigpt.perf.bench import run_bench

    plan = sweep_plans(a.dry_run)[name]
    work = Path(a.work) / name
    reserve = 0.0 if a.dry_run else CASE_RESERVE_S[name]
    status = None
    try:
        rep = run_bench(plan["cases"], 1, work, plan["base"], plan["overrides"], plan["steps"], plan["warmup"], None,
                        timeout=max(10.0, clock.left()), baseline=plan["baseline"], comm_steps=0,
                        rounds=plan["rounds"], deadline=clock.end - reserve)
        rows, table = rep["rows"], (work / "bench.md").read_text()
        (Path(a.out) / SWEEP_FILES[name]).write_text((work / "bench.json").read_text())
    except CheckTimeout:
        _kill_children()
        rows, table = _salvage(work)
        (Path(a.out) / SWEEP_FILES[name]).write_text(json.dumps({"rows": rows, "cut_at_cap": True}, indent=1))
        status = "timeout"
    ok_rows = [r for r in rows if r["result"]["status"] == "ok"]
    # ok: some case beside the baseline ran and none failed (an error or OOM is a finding, recorded as a fail);
    # cases that the cap left unstarted are "skipped", not failures
    failed = [r for r in rows if r["result"]["status"] not in ("ok", "skipped")]
    ran = [r for r in ok_rows if not r["case"]["baseline"]]
    return {"status": status or ("ok" if ran and not failed else "fail"), "cases": len(rows), "ok": len(ok_rows),
            "planned": [f"{c.arch}/{c.patch} {c.label}" for c in plan["cases"]],
            "rounds_done": max((len(r["result"].get("rounds_images_per_s") or []) for r in rows), default=0),
            "table": table, "rows": rows}


def check_targets(a, l14):
    """D-iGPT-L/14 with the H/14 teacher: best total MFU and best ratio to the baseline over the cases that ran."""
    rows = [r for r in (l14 or {}).get("rows", []) if r["result"]["status"] == "ok" and not r["case"]["baseline"]]
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
             f"{env.get('open_clip')}; DALI: {env.get('dali')}; {results['seconds']:.0f} s in all "
             f"(budget {results['budget_s']:.0f} s)"
             f"{' (DRY RUN on CPU: toy sizes, no GPU numbers)' if results['dry_run'] else ''}", "",
             "| check | status | seconds | cap (s) | summary |", "|---|---|---|---|---|"]
    for name in CAPS:
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
        elif name in SWEEP_FILES and "cases" in r:
            summary = f"{r['ok']}/{r['cases']} cases, {r['rounds_done']} round(s)"
        elif name == "targets" and "best_mfu_total" in r:
            summary = (f"best total MFU {_pct(r['best_mfu_total'])} (target 45%), best vs baseline "
                       f"{_x(r['best_vs_baseline'])} (target 2x)")
        if r.get("error"):
            summary = (summary + " " + r["error"]).strip()[:300]
        cap = r.get("cap_s", "")
        if cap != "" and r.get("cap_effective_s", cap) < cap:  # the budget gave it less than its cap
            cap = f"{cap} ({max(0, r['cap_effective_s']):.0f} left)"
        lines.append(f"| {name} | {r.get('status')} | {r.get('seconds', '')} | {cap} | {summary} |")
    if "attention" in results and results["attention"].get("speed_table"):
        lines += ["", "## Attention backends", "", results["attention"]["speed_table"].strip()]
    titles = {"throughput_l14": "Throughput, D-iGPT-L/14 with the H/14-shaped teacher (megadigpt bench, interleaved)",
              "throughput_b16": "Throughput, D-iGPT-B/16 (megadigpt bench, interleaved)",
              "segment_step": "Segmentation step at 512 px (megadigpt bench --config segment_ade20k_vitb16)"}
    for name, title in titles.items():
        if name in results and results[name].get("table"):
            lines += ["", f"## {title}", "", results[name]["table"].strip()]
    return "\n".join(lines) + "\n"


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}%"


def _x(v):
    return "–" if v is None else f"{v:.2f}x"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # bad input: one line and exit 2, like acceptance.sh
        print(f"acceptance: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/acceptance"))
    ap.add_argument("--work", default=None, help="scratch folder (default: a fresh folder under /tmp)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time for all checks (default 420 on the GPU, 3600 for the dry run); each check also "
                         "stops at its own cap")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: every check's CPU-runnable part")
    a = ap.parse_args(argv)
    if a.budget_s is not None and a.budget_s <= 0:
        ap.error(f"--budget-s {a.budget_s:g}: must be > 0")
    budget_s = a.budget_s if a.budget_s is not None else (3600.0 if a.dry_run else 420.0)
    import torch

    a.device = "cuda" if torch.cuda.is_available() and not a.dry_run else "cpu"
    if not a.dry_run and a.device != "cuda":
        print("acceptance: error: no GPU visible; use --dry-run (or acceptance.sh --rehearse) on a CPU machine",
              file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.work = a.work or str(Path("/tmp") / f"megadigpt_acceptance_{os.getpid()}")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    budget = Budget(budget_s)
    mode = 1 if a.dry_run else 0
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": a.dry_run,
               "budget_s": budget_s, "caps_s": {k: v[mode] for k, v in CAPS.items()}, "order": []}
    checks = {"environment": lambda c: check_environment(a), "attention": lambda c: check_attention(a),
              "cpu_gpu_loss": lambda c: check_cpu_gpu_loss(a), "engine_bf16": lambda c: check_engine_bf16(a, c),
              "throughput_l14": lambda c: check_sweep(a, "throughput_l14", c),
              "targets": lambda c: check_targets(a, results.get("throughput_l14")),
              "optimizer": lambda c: check_optimizer(a),
              "throughput_b16": lambda c: check_sweep(a, "throughput_b16", c),
              "segment_step": lambda c: check_sweep(a, "segment_step", c)}
    assert list(checks) == list(CAPS)
    signal.signal(signal.SIGALRM, _on_alarm)
    for name, fn in checks.items():
        cap = CAPS[name][mode]
        clock = Clock(cap, budget) if name not in ALWAYS else Clock(cap, Budget(cap))
        print(f"[acceptance] {name} (cap {cap} s, {budget.left():.0f} s of the budget left)", flush=True)
        if clock.left() < MIN_CHECK_S and name not in ALWAYS:
            res = {"status": "skipped", "error": f"the budget ({budget_s:.0f} s) is spent"}
        else:
            signal.setitimer(signal.ITIMER_REAL, clock.left())  # the hard cap; a sweep ends itself before it
            try:
                res = fn(clock)
            except CheckTimeout:
                res = {"status": "timeout", "error": f"stopped at its cap ({clock.end - clock.t0:.0f} s)"}
            except Exception as e:  # noqa: BLE001 - recorded; the next check runs
                res = {"status": "error", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-3000:]}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            _kill_children()
        res.update(seconds=round(time.monotonic() - clock.t0, 1), cap_s=cap,
                   cap_effective_s=round(clock.end - clock.t0, 1), started_s=round(clock.t0 - budget.t0, 1))
        results[name] = res
        results["order"].append(name)
        print(f"[acceptance] {name}: {res['status']} in {res['seconds']} s", flush=True)
        (out / "acceptance.json").write_text(json.dumps(results, indent=1, default=str))  # kept if killed later
    results["seconds"] = time.monotonic() - budget.t0
    (out / "acceptance.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "acceptance.md").write_text(markdown(results))
    print(markdown(results))
    # exit 0: every check that ran is ok (one skipped for the budget is not a failure: B/16 and segmentation run
    # only as time allows)
    return 0 if all(results[n]["status"] in ("ok", "skipped") for n in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

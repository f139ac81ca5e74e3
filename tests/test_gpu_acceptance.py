"""benchmarks/gpu/acceptance.sh --dry-run on the CPU: every check of the GPU acceptance run executes its
CPU-runnable part (attention agreement and timing, CPU-vs-device loss, the bf16 engine under ZeRO-1 and ZeRO-3,
the segmentation step, the interleaved bench sweep with its baseline, the targets) and writes its report, so the
script cannot rot between the rare GPU sessions."""

import json
import subprocess

from .conftest import REPO, subprocess_env


def test_acceptance_dry_run_runs_every_check(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu/acceptance.sh"), "--dry-run", "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=900,
                          env=subprocess_env(OUT=str(out)), cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "acceptance.json").read_text())
    assert res["dry_run"] is True
    for check in ("environment", "attention", "cpu_gpu_loss", "engine_bf16", "optimizer", "segment_step", "throughput",
                  "targets"):
        assert res[check]["status"] == "ok", (check, res[check])
    assert set(res["attention"]["backends"]) == {"sdpa", "prefix", "eager", "flex"}
    assert set(res["optimizer"]["median_ms"]) == {"torch_fused", "torch_loop"}  # DeepSpeed's FusedAdam: CUDA only
    assert res["engine_bf16"]["zero1"]["grad_accum_dtype"] == res["engine_bf16"]["zero3"]["grad_accum_dtype"] == "fp32"
    assert res["throughput"]["rounds_done"] == 2 and res["throughput"]["ok"] == 2  # baseline + one case
    [seg] = res["segment_step"]["rows"]  # the segmentation step at the config's crop, planned memory beside it
    assert seg["case"]["task"] == "segment" and seg["case"]["img_size"] == 32, seg["case"]
    assert seg["result"]["status"] == "ok" and seg["result"]["planned_gib"] > 0, seg["result"]
    assert "seg:vit_tiny/4@32" in (out / "segment_bench.md").read_text()
    bench = json.loads((out / "bench.json").read_text())
    assert bench["schedule"] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    md = (out / "acceptance.md").read_text()
    assert "DRY RUN" in md and "| targets | ok |" in md and "vs baseline" in md
    assert (out / "acceptance.log").is_file()

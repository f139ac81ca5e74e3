"""``train.compile`` under real DeepSpeed engines (gloo, CPU): whole-block graphs at ZeRO-1 and ZeRO-3, and the
one-line refusal of a CUDA compile path without Triton's host C compiler."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO, subprocess_env

# One rank, real engines. ZeRO-3 with stage3_param_persistence_threshold 0, so that every parameter really is
# released after its module and gathered again (at toy sizes the shipped template keeps them all gathered).
# Graphs are counted with a counting backend (torch's CompileCounter; aot_eager for the checkpointed case, which
# goes through AOTAutograd's saved tensors as inductor does): no inductor compile, a few seconds per engine.
GRAPHS_SCRIPT = r"""
import functools, json, os
import torch, torch._dynamo, deepspeed
from torch._dynamo.testing import CompileCounter
from megadigpt.config import load_config
from megadigpt.distributed import engine as ds_engine
from megadigpt.distributed.parallelize import apply_activation_checkpointing, apply_compile
from megadigpt.distributed.partitioned import build_partitioned
from megadigpt.model import build_model
from megadigpt.targets import build_target, student_targets
from megadigpt.train.optim import build_optimizer

deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
TINY = ["model.arch=vit_tiny", "model.embed_dim=64", "model.depth=4", "model.num_heads=2", "model.img_size=32",
        "model.patch_size=4", "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
        "target.kind=pixels", "target.patch_size=4", "train.global_batch=4", "train.micro_batch=4"]

def run(stage, compiled, ckpt=False, explicit_stage=True):
    cfg = load_config(None, TINY + [f"train.zero_stage={stage}"])
    torch.manual_seed(0)
    teacher = build_target(cfg.target, cfg.model)
    ds = ds_engine.build_ds_config(cfg, 1, "fp32")
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    build = functools.partial(build_model, cfg.model, teacher.spec.dim, teacher.spec.grid, teacher.spec.classes)
    torch.manual_seed(0)
    model = build_partitioned(build, ds) if stage == 3 else build()  # as pretraining builds it
    if ckpt:
        apply_activation_checkpointing(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter()
    if compiled:  # pretraining passes the engine's stage; None: found from the partitioned build (fine-tuning)
        apply_compile(model, backend="aot_eager" if ckpt else counter,
                      zero_stage=ds["zero_optimization"]["stage"] if explicit_stage else None)
    engine = ds_engine.initialize(model, build_optimizer(model, cfg.optim, 1e-3, "cpu", ds_config=ds), ds)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(2):
        images = torch.randn(4, 3, 32, 32, generator=g)
        order = torch.stack([torch.randperm(4, generator=g) for _ in range(4)])
        with torch.no_grad():
            tokens, cls = student_targets(*teacher(images), torch.float32)
        gen, dis = engine(images, tokens, cls, order)
        loss = gen.mean() + dis.mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] if ckpt else counter.frame_count
    late = None
    if stage == 3:  # too late: the engine has hooked every submodule already
        try:
            apply_compile(engine.module, zero_stage=3)
        except RuntimeError as e:
            late = str(e)
    return {"losses": losses, "graphs": graphs, "late": late,
            "breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}

out = {"eager1": run(1, False), "eager3": run(3, False), "z1": run(1, True), "z3": run(3, True, explicit_stage=False),
       "z3_ckpt": run(3, True, ckpt=True)}
open(os.environ["OUT"], "w").write(json.dumps(out))
"""


def test_zero3_compiles_whole_blocks_like_zero1(tmp_path):
    """ZeRO-3's per-module hooks are compiler-disabled: a compiled block used to break at every Linear and
    LayerNorm (24 graphs, 54 graph breaks over these two steps). Each block is now a ZeRO-3 leaf with its forward
    compiled: as at ZeRO-1, one graph per block type (encoder block, decoder block) and no break, with the eager
    engine's losses, also with activation checkpointing."""
    out = tmp_path / "graphs.json"
    script = tmp_path / "graphs.py"
    script.write_text(GRAPHS_SCRIPT)
    env = subprocess_env(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", OUT=out)
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["eager1"]["losses"] == pytest.approx(r["eager3"]["losses"], abs=1e-6)
    for case, eager in (("z1", "eager1"), ("z3", "eager3"), ("z3_ckpt", "eager3")):
        assert r[case]["breaks"] == 0, (case, r[case])
        assert r[case]["graphs"] == 2, (case, r[case])  # Block and DecoderBlock: the same code for every instance
        assert r[case]["losses"] == pytest.approx(r[eager]["losses"], abs=1e-6), case
    assert "before the ZeRO-3 engine is built" in r["z3"]["late"]


def test_host_c_compiler_is_found_as_triton_finds_it(tmp_path):
    from megadigpt.distributed.parallelize import host_c_compiler

    empty = tmp_path / "empty"
    empty.mkdir()
    assert host_c_compiler({"PATH": str(empty)}) is None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    clang = bin_dir / "clang"
    clang.write_text("#!/bin/sh\n")
    clang.chmod(0o755)
    assert host_c_compiler({"PATH": str(bin_dir)}) == str(clang)
    assert host_c_compiler({"PATH": str(empty), "CC": str(clang)}) == str(clang)  # $CC first, wherever it is
    assert host_c_compiler({"PATH": str(bin_dir), "CC": "no-such-cc"}) is None  # Triton would use $CC, and fail


@pytest.mark.parametrize("compile_,attention,msg", [(True, "sdpa", "train.compile=true need"),
                                                   (False, "flex", "model.attention=flex need"),
                                                   (True, "flex", "train.compile=true and model.attention=flex")])
def test_cuda_compile_without_a_c_compiler_is_one_line(tmp_path, monkeypatch, compile_, attention, msg):
    from megadigpt.config import ConfigError
    from megadigpt.distributed.parallelize import check_host_compiler

    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without cc, gcc or clang
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(ConfigError, match=msg) as e:
        check_host_compiler("cuda", compile_, attention)
    assert "\n" not in str(e.value) and "C compiler" in str(e.value) and "set CC" in str(e.value)
    check_host_compiler("cpu", compile_, "sdpa")  # CPU: no Triton, nothing to check
    check_host_compiler("cuda", False, "sdpa")  # nothing that needs Triton
    monkeypatch.setenv("CC", sys.executable)  # any program $CC names is what Triton runs
    check_host_compiler("cuda", compile_, attention)

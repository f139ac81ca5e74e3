"""Applied to the plain model before it is handed to DeepSpeed (the torchtitan order: activation checkpointing,
then compile, then sharding by the engine). Parameter names never change."""

import functools
import os
from typing import Optional

import torch.nn as nn
import torch.utils.checkpoint as ckpt


def apply_activation_checkpointing(model, every: int = 1, preserve_rng_state: bool = True):
    """Recompute every ``every``-th encoder block in backward (non-reentrant torch checkpointing, which
    ZeRO-3 supports; the frozen teacher lives outside the engine, away from the known ZeRO-3 trap)."""
    for i, blk in enumerate(model.encoder.blocks):
        if i % every == 0:
            blk.forward = functools.partial(ckpt.checkpoint, blk.forward, use_reentrant=False,
                                          preserve_rng_state=preserve_rng_state)
    return model


def apply_compile(model, teacher=None, zero_stage: Optional[int] = None, backend=None):
    """``torch.compile`` each transformer block (every ``blocks`` ModuleList: the encoder's, the decoders', a timm
    classifier's) and the frozen teacher's forward. Per block, as torchtitan does: the blocks are alike, so the
    graphs are small and a ZeRO-3 parameter gather between blocks stays outside them. After activation
    checkpointing (the checkpointed forward is what is compiled), before the engine is built. Compilation happens
    at the first forward; the loops log the first step's time as the cold-compile cost. Returns the block count.

    ZeRO-3 (``zero_stage`` 3; None: a student built partitioned by ``deepspeed.zero.Init``, whose parameters
    carry ``ds_id``): the engine hooks every submodule to gather its parameters, and those hooks are
    ``torch.compiler.disable``d, so a compiled block broke at every Linear and LayerNorm (measured on CPU, tiny
    student, 1 rank: 24 graphs and 54 graph breaks over two steps, against 2 graphs and 0 breaks at ZeRO-1;
    ``tests/test_compile.py``). Each block is therefore made a ZeRO-3 *leaf* (DeepSpeed hooks the block alone and
    gathers all its parameters in the block's pre-forward hook, reduces their gradients after its backward) and
    its ``forward`` is compiled instead of its call, so the block's own hooks run eagerly around one whole-block
    graph. DeepSpeed's ``engine.compile()`` is no substitute here: without DeepCompile (CUDA only) it compiles
    the whole module under the same per-module hooks, and on CPU its trace failed on a partitioned (empty)
    parameter. ``backend``: torch.compile's (None: its default, inductor); tests count graphs with their own."""
    import torch

    blocks = [blk for name, m in model.named_modules() if name.split(".")[-1] == "blocks" and
              isinstance(m, (nn.ModuleList, nn.Sequential)) for blk in m]
    if zero_stage is None:
        zero_stage = 3 if any(hasattr(p, "ds_id") for p in model.parameters()) else 0
    kwargs = {} if backend is None else {"backend": backend}
    for blk in blocks:
        if zero_stage == 3:
            from deepspeed.utils import set_z3_leaf_module

            if hasattr(blk, "ds_id"):  # the engine has hooked its submodules already: the flag would change nothing
                raise RuntimeError("apply_compile must run before the ZeRO-3 engine is built (it marks each block "
                                   "a ZeRO-3 leaf, which DeepSpeed reads when it installs its hooks)")
            set_z3_leaf_module(blk, True)
            blk.forward = torch.compile(blk.forward, **kwargs)  # the block's (ZeRO-3) hooks stay outside the graph
        else:
            blk.compile(**kwargs)
    if teacher is not None:  # outside the engine: no ZeRO hooks
        teacher.compile(**kwargs)
    return len(blocks)


def set_attention_backend(model, backend: str):
    from ..model.attention import BACKENDS, MultiHead

    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    for m in model.modules():
        if isinstance(m, MultiHead):
            m.backend = backend
    return model


def host_c_compiler(environ=None) -> Optional[str]:
    """The C compiler Triton will use to build its kernel launchers, found as Triton 3.x finds it
    (``triton/runtime/build.py``): ``$CC`` if set, else ``gcc``, else ``clang`` on PATH. None: there is none
    (``$CC`` naming a program that is not there counts as none: Triton would fail on it the same way)."""
    import shutil

    environ = os.environ if environ is None else environ
    path = environ.get("PATH")
    cc = environ.get("CC")
    if cc is not None:
        return shutil.which(cc, path=path)
    return shutil.which("gcc", path=path) or shutil.which("clang", path=path)


def check_host_compiler(device_type: str, compile: bool, attention: str, environ=None) -> None:
    """On CUDA, ``train.compile`` (inductor's GPU kernels) and ``model.attention=flex`` (a compiled Triton kernel)
    need a host C compiler, which many CUDA runtime images do not ship: without one the first step dies deep in
    Triton ("Failed to find C compiler"), after the teacher, the engine and the data are up. Refuse it in one line
    instead, before anything is built. CPU runs use neither Triton path (flex is refused there anyway)."""
    from ..config import ConfigError

    wants = [w for w, on in (("train.compile=true", compile), ("model.attention=flex", attention == "flex")) if on]
    if device_type != "cuda" or not wants or host_c_compiler(environ):
        return
    cc = (os.environ if environ is None else environ).get("CC")
    found = f"CC={cc} is not an executable" if cc is not None else "CC is unset and neither gcc nor clang is on PATH"
    off = {"train.compile=true": "train.compile=false", "model.attention=flex": "model.attention=sdpa"}
    raise ConfigError(f"{' and '.join(wants)} need Triton, which needs a host C compiler, and there is none "
                      f"({found}): install one (e.g. apt-get install gcc) or set CC, or use "
                      f"{' '.join(off[w] for w in wants)}")

"""The student built partitioned under ZeRO-3, so that no rank ever holds all of it (ViT-g/14 is 4.1 GiB and
ViT-e/14 14.5 GiB in fp32: per rank, that was ~116 GiB of host memory on an 8-GPU node).

``deepspeed.zero.Init`` partitions each module's parameters as soon as that module is constructed, so building
never holds more than the module under construction in full. The model's own initialisation cannot run inside it
(it would see 1-D partitions: "Fan in and fan out can not be computed"), so the model is built with
``init_weights=False`` and its :meth:`~megadigpt.model.DiGPT.init_steps` run afterwards, one step at a time, each
with only its own parameters gathered (``GatheredParameters(modifier_rank=0)``: rank 0's values are kept and
scattered). Every rank draws the same random numbers in the plain build's order, so the initial weights equal a
plain build's for the same seed (``tests/test_partitioned.py``).

``train.init_from`` weights are read on rank 0 only (one copy per job, not per rank) and copied in module by
module the same way; other ranks receive their partitions. DeepSpeed's own ``zero.Init`` is used as it is; what is
ours is the step-wise initialisation and loading, which DeepSpeed leaves to the model.
"""

import contextlib
import ctypes
from typing import Callable, Dict, Optional

import torch


def host_peak_bytes() -> Optional[int]:
    """The process's resident-set high-water mark (Linux), for the start event's build peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_host_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass


@contextlib.contextmanager
def _unmap_freed_tensors():
    """glibc's malloc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after which
    such blocks come from the heap, and the heap keeps the pages of the whole-module tensors freed after
    partitioning: measured, ViT-g's partitioned build then peaked at 3.27 GiB per rank instead of 2.16. A fixed
    128 KiB threshold during the build returns every freed tensor to the system; afterwards the threshold is
    fixed at glibc's own maximum (32 MiB). Linux with glibc only; elsewhere nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        yield
        return
    M_MMAP_THRESHOLD = -3
    mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)


def build_partitioned(build: Callable[..., torch.nn.Module], ds_config: dict) -> torch.nn.Module:
    """``build(init_weights=False)`` under ``deepspeed.zero.Init``, then the model's initialisation step by step."""
    import deepspeed

    with _unmap_freed_tensors():
        with deepspeed.zero.Init(config_dict_or_path=ds_config):  # parameters in the engine's dtype (bf16 / fp32)
            model = build(init_weights=False)
        for params, init in model.init_steps():
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                init_in_fp32(params, init)
    return model


def init_in_fp32(params, init) -> None:
    """Run ``init`` on fp32 stand-ins of ``params`` on the CPU and round the result into them: the random draws and
    their arithmetic are the plain fp32 build's, whatever the engine's dtype (a bf16 engine casts the plain build
    the same way) and whatever the device. The plain build is made on the CPU and draws from the CPU's generator;
    stand-ins on the GPU would draw from the device's generator, another stream of numbers for the same seed."""
    held = [p.data for p in params]
    try:
        for p, d in zip(params, held):
            p.data = torch.empty(d.shape, dtype=torch.float32, device="cpu")
        init()
        for p, d in zip(params, held):
            d.copy_(p.data)
    finally:
        for p, d in zip(params, held):
            p.data = d




def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 has partitioned it (its ``data`` is then an empty placeholder)."""
    return getattr(p, "ds_shape", p.shape)


def load_partitioned(model: torch.nn.Module, load: Callable[[], Dict[str, torch.Tensor]], what: str) -> None:
    """Copy the state dict that ``load()`` returns (called on rank 0 only) into a partitioned model, module by
    module. A file that cannot be read, and names or shapes that do not fit the model's full shapes, are found on
    rank 0 and the verdict reaches every rank (ConfigError on all of them, naming the missing / unexpected /
    mis-shaped keys)."""
    import deepspeed
    import torch.distributed as dist

    from ..config import ConfigError

    rank0 = dist.get_rank() == 0
    verdict, state = [None], None
    if rank0:
        try:
            state = load()
        except ConfigError as e:
            verdict[0] = str(e)
    if rank0 and state is not None:
        own = {n: full_shape(p) for n, p in model.named_parameters()}
        own.update({n: b.shape for n, b in model.named_buffers() if n in model.state_dict()})
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k]))
        if missing or unexpected or wrong:
            verdict[0] = (f"{what} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                          f"wrong shape {wrong[:3]}")
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise ConfigError(verdict[0])
    for prefix, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if rank0:
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(state[f"{prefix}.{name}" if prefix else name].to(p.dtype))
    persistent = model.state_dict().keys()
    for name, b in model.named_buffers():  # whole on every rank: rank 0's copy is broadcast
        if name in persistent:
            if rank0:
                b.copy_(state[name])
            dist.broadcast(b, src=0)

"""Per-device memory of a pretraining step, without a GPU: ``megadigpt plan``.

    model states   counted from the model built on the meta device (nothing allocated), in bytes per parameter
                   as DeepSpeed's ZeRO stages allocate them (see ``model_states``)
    activations    the live-tensor peak of one real training micro-step (teacher forward, student forward,
                   backward) traced on the meta device with :class:`LiveBytes`: every op runs with its real
                   shapes and dtypes, so what autograd saves, the transient buffers of backward and activation
                   checkpointing's recomputation are all in it. Fused attention kernels (SDPA's flash and
                   memory-efficient kernels, FlexAttention) save only their output and the log-sum-exp; the trace
                   models them that way, the ``eager`` backend with its full L x L matrices.

The sum is checked against real peaks by ``megadigpt bench`` (CPU: the tensor storages of a real DeepSpeed
engine's process, counted by :class:`LiveBytes`; GPU: ``torch.cuda.max_memory_allocated``), which prints planned
and measured side by side.
"""

import contextlib
import math
import weakref
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ModelSizes, model_sizes and student_params: re-exported (perf/bench.py, tests)
from ..sizing import ModelSizes, meta_inputs, meta_student, meta_teacher, model_sizes, student_params  # noqa: F401
from ..targets.base import student_targets

GiB = 2 ** 30
# Device memory per GPU that torch's tensors cannot have, taken off --gpu-mem before fitting: the CUDA context with
# torch's, cuBLAS's and cuDNN's kernels and workspaces (~0.5-1 GiB), the NCCL communicators' buffers (~1-2 GiB on
# an 8-GPU NVLink node, more with several process groups), DALI's device pools (~0.5 GiB) and the caching
# allocator's slack over the allocated bytes the plan counts. Together 3-4 GiB on H100 nodes (issue 16): the
# upper end, so that a plan that fits does not OOM. Check a machine with ``megadigpt bench`` (device used GiB,
# from torch.cuda.mem_get_info, against peak GiB) and pass --reserve.
RESERVE_GIB = 4.0
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ============================================================================ tracing live bytes


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive: ``live`` now, ``peak`` the maximum.
    Views share their base's storage and in-place ops return it, so each storage counts once; tensors made before
    the mode (parameters, inputs) do not count. Works on any device, including ``meta``."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._ids = set()

    def _free(self, key, n):
        self._ids.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = id(st)
                if key in self._ids:
                    continue
                n = st.nbytes()
                self._ids.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, n)
        return out


class _FusedAttentionMemory(torch.autograd.Function):
    """The memory behaviour of a fused attention kernel (flash / memory-efficient / FlexAttention): forward keeps
    q, k, v, the output and a float32 log-sum-exp per query; backward makes dq, dk, dv. No L x L matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def fused_attention_memory():
    """Inside: ``F.scaled_dot_product_attention`` (ours, timm's, open_clip's via ``multi_head_attention_forward``)
    behaves like a fused kernel on the meta device, whatever the mask."""
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        return _FusedAttentionMemory.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


# ============================================================================ sizes


# ============================================================================ activations


_TRACES: Dict[tuple, int] = {}


def trace_micro_step(cfg, batch: int, precision: str = "bf16", teacher_dtype: str = "bf16",
                     activation_checkpointing: bool = False, attention: Optional[str] = None,
                     classes: Optional[int] = None) -> int:
    from ..config import dump_config

    key = (dump_config(cfg), batch, precision, teacher_dtype, activation_checkpointing, attention, classes)
    if key not in _TRACES:
        _TRACES[key] = _trace(cfg, batch, precision, teacher_dtype, activation_checkpointing, attention, classes)
    return _TRACES[key]


def _trace(cfg, batch, precision, teacher_dtype, activation_checkpointing, attention, classes=None) -> int:
    """Peak bytes of the tensors created by one training micro-step (teacher forward without grad, student
    forward, backward with each gradient handed off as soon as it is accumulated, as ZeRO's hooks do), traced on
    the meta device. Parameters are not included (they are model states)."""
    from ..distributed.parallelize import apply_activation_checkpointing

    attention = attention or cfg.model.attention
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    teacher, spec = meta_teacher(cfg.target, cfg.model, classes)
    teacher = teacher.to(dt[teacher_dtype])
    student = meta_student(cfg, spec, dt[precision])
    if activation_checkpointing:
        apply_activation_checkpointing(student, preserve_rng_state=False)
    for p in student.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    x, xt, order = meta_inputs(cfg, spec, batch, dt[precision], dt[teacher_dtype])
    # SDPA with our boolean mask runs a fused kernel on CPUs (measured: tests/test_perf.py) and GPUs (memory-
    # efficient attention), FlexAttention always; eager materialises the L x L scores and probabilities
    fused = attention in ("sdpa", "flex")
    for mod in student.modules():
        if hasattr(mod, "backend"):
            mod.backend = "sdpa" if fused else "eager"
    tracker = LiveBytes()
    with (fused_attention_memory() if fused else contextlib.nullcontext()), tracker:
        with torch.no_grad():
            tokens, cls = teacher(xt)
        tokens, cls = student_targets(tokens, cls, dt[precision])
        gen, dis = student(x, tokens, cls, order)
        (gen.mean() + dis.mean()).backward()
    return tracker.peak


# ============================================================================ model states


@dataclass(frozen=True)
class ZeroBuffers:
    """The DeepSpeed config values that size ZeRO's buffers (elements), as ``build_ds_config`` resolves them."""

    reduce_bucket: int = 500_000_000
    allgather_bucket: int = 500_000_000
    prefetch_bucket: int = 50_000_000
    max_live: int = 1_000_000_000
    max_reuse: int = 1_000_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    grad_accum: Optional[str] = None  # data_types.grad_accum_dtype; None: megadigpt's default (fp32 when 16-bit)
    comm_dtype: Optional[str] = None  # communication_data_type; None: likewise

    @classmethod
    def from_ds(cls, ds: dict, stage: int):
        z = ds.get("zero_optimization", {})
        d = cls(overlap_comm=stage == 3)
        return cls(int(z.get("reduce_bucket_size", d.reduce_bucket)), int(z.get("allgather_bucket_size",
                                                                               d.allgather_bucket)),
                   int(z.get("stage3_prefetch_bucket_size", d.prefetch_bucket)),
                   int(z.get("stage3_max_live_parameters", d.max_live)),
                   int(z.get("stage3_max_reuse_distance", d.max_reuse)),
                   bool(z.get("overlap_comm", d.overlap_comm)), bool(z.get("contiguous_gradients", True)),
                   ds.get("data_types", {}).get("grad_accum_dtype"), ds.get("communication_data_type"))


_DS_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
ALLREDUCE_CHUNK = 500_000_000  # deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE: the engine's all-reduce chunk


def model_states(P: int, largest: int, world: int, stage: int, precision: str, offload: bool = False,
                 buffers: ZeroBuffers = ZeroBuffers()) -> Dict[str, int]:
    """Per-rank bytes of the student's model states under DeepSpeed ZeRO (AdamW), on the device and on the host,
    as DeepSpeed 0.19's optimizers allocate them (runtime/bf16_optimizer.py, zero/stage_1_and_2.py,
    zero/stage3.py), checked against real engines by ``megadigpt bench`` (docs/benchmarks.md, "megadigpt plan").

    h = 2 (bf16/fp16) or 4 (fp32) bytes per weight; a = gradient accumulation bytes: 4 for 16-bit runs
    (``build_ds_config`` sets ``data_types.grad_accum_dtype=fp32`` for ZeRO 1-3), else h; c = the bytes of
    ``communication_data_type`` (likewise fp32); N = data-parallel ranks; rb = reduce_bucket_size.

    ``params``       h P (stage 3: h P / N, this rank's partition). ``gathered_params`` (stage 3, N > 1): the full
                     16-bit parameters ZeRO-3 keeps gathered between a module's forward and backward use unless the
                     reuse distance exceeds ``stage3_max_reuse_distance`` (default 1e9 > P: all of them), capped by
                     ``stage3_max_live_parameters``; on one rank DeepSpeed computes on the partition itself.
    ``grads``        what holds gradients through backward:
                     stage 1, bf16 + fp32 accumulation: DeepSpeed's BF16_Optimizer (the engine picks it for ZeRO-1
                       bf16 with fp32 accumulation): the 16-bit ``.grad`` of every parameter (h P, zeroed, not
                       freed, between steps) plus a flat fp32 accumulator for *all* parameters (4 P, on every rank:
                       it reduces whole gradients and steps only its partition);
                     stage 1 otherwise: every ``.grad`` (h P), plus a fp32 ``grad_accum`` copy (4 P) where the
                       accumulation dtype differs (fp16);
                     stage 2: the reduced partition, a P / N (a fp32 "compact" partition buffer with fp32
                       accumulation, else ``grads_in_partition``); the gradients waiting for reduction sit in the
                       buckets;
                     stage 3: ``grad_partitions_flat_buffer``, a P / N.
    ``optimizer``    12 P / N: the fp32 master partition and Adam's m and v (a separate fp32 master even when the
                     model is fp32).
    ``buckets``      ZeRO's contiguous-gradient buckets, allocated at their full size however small the model:
                     stage 1 (not BF16_Optimizer) and 2: rb elements of the reduction dtype (a for stage 1, h for
                     stage 2, which stages in the model dtype), two of them with ``overlap_comm``; they exist during
                     backward only (alongside the activations). Stage 3: one bucket of rb x c bytes, for good.
                     BF16_Optimizer has none.
    ``fp32_grads``   what exists only after backward has freed the activations (the plan takes the larger of the
                     two): the fp32 gradient partition that the optimizer step gets (a flattened copy, 4 P / N);
                     BF16_Optimizer instead flattens the fp32 gradients for its all-reduce, 4 min(P, 5e8) (the
                     engine's chunk; one rank too).
    ``host``         CPU offload moves the master, m, v and the fp32 gradient partition to the host."""
    h = DTYPE_BYTES[precision]
    N = world
    part = math.ceil(P / N)
    if stage not in (1, 2, 3):
        raise ValueError(f"the planner models ZeRO stages 1, 2 and 3, got {stage}")
    a = _DS_DTYPE_BYTES[buffers.grad_accum] if buffers.grad_accum else (h if precision == "fp32" else 4)
    c = _DS_DTYPE_BYTES[buffers.comm_dtype] if buffers.comm_dtype else (h if precision == "fp32" else 4)
    bf16_optimizer = stage == 1 and precision == "bf16" and a == 4 and not offload
    params = h * P if stage < 3 else h * part
    gathered = 0
    if stage == 3 and N > 1:  # one rank: DeepSpeed computes on the partition itself, nothing is gathered
        gathered = h * min(P, buffers.max_live) if buffers.max_reuse >= P else h * min(
            max(largest, buffers.prefetch_bucket), P)
    if stage == 1:
        grads = h * P + (4 * P if a != h else 0)
    else:
        grads = a * part
    optim = 12 * part
    fp32_grads = 4 * min(P, ALLREDUCE_CHUNK) if bf16_optimizer else 4 * part
    bucket = 0
    if buffers.contiguous_gradients and not bf16_optimizer:
        if stage == 3:
            bucket = c * buffers.reduce_bucket
        else:
            bucket = (a if stage == 1 else h) * buffers.reduce_bucket * (2 if buffers.overlap_comm else 1)
    host = 0
    if offload:
        host, optim, fp32_grads = optim + 4 * part, 0, 0
    return {"params": params, "gathered_params": gathered, "grads": grads, "optimizer": optim,
            "fp32_grads": fp32_grads, "buckets": bucket, "host": host}


# ============================================================================ the plan


@dataclass
class PlanRow:
    arch: str
    patch: int
    stage: int
    checkpointing: bool
    offload: bool
    micro_batch: int
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    buffers_gib: float  # ZeRO's reduce buckets
    fp32_grads_gib: float  # what exists only after the activations are freed (model_states' fp32_grads)
    activations_gib: float
    teacher_gib: float
    total_gib: float
    fits: bool
    max_micro_batch: int  # the largest that fits (0: none)
    recommended_micro_batch: int  # the largest that fits and divides train.global_batch / world
    host_gib: float  # per rank, with CPU offload
    build_host_gib: float = 0.0  # host memory per rank while the fp32 student is built (ZeRO-3: partitioned)
    teacher_host_gib: float = 0.0  # host memory per rank while the teacher is built (teacher_host_bytes)
    global_batch: int = 0  # train.global_batch the micro-batch was recommended for (0: not known)


def linear_plan_row(name: str, patch: int, P: int, largest: int, world: int, gpu_gib: float, stage: int,
                    ckpt: bool, offload: bool, micro_batch: int, global_batch: int, precision: str, reserve_gib: float,
                    buffers, trace, lo: int = 1, frozen: int = 0) -> PlanRow:
    """A plan row of a step without a teacher (segmentation, image-text) whose activation peak is traced at ``lo``
    and ``lo + 1`` images (``trace(b)`` -> bytes) and taken as linear in the micro-batch in between and beyond:
    ZeRO's model states of ``P`` trainable parameters (``model_states``), the largest micro-batch that fits the
    budget and the largest that also divides ``global_batch / world``; ``frozen`` parameters count as weights only.
    The model is built whole on each rank."""
    st = model_states(P, largest, world, stage, precision, offload, buffers)
    a_lo, a_hi = trace(lo), trace(lo + 1)
    per_image, fixed = a_hi - a_lo, a_lo - lo * (a_hi - a_lo)
    states = st["params"] + st["gathered_params"] + st["grads"] + st["optimizer"] + st["buckets"]

    def total(b):
        return states + max(fixed + per_image * b, st["fp32_grads"])

    if frozen:  # weights that do not train (a frozen tower): in the model's dtype, partitioned and gathered too
        h = DTYPE_BYTES[precision]
        st["params"] += h * (frozen if stage < 3 else math.ceil(frozen / world))
        st["gathered_params"] += h * frozen if stage == 3 and world > 1 else 0
        states += h * (frozen if stage < 3 else math.ceil(frozen / world)) + (h * frozen if stage == 3 and world > 1
                                                                              else 0)
    budget = (gpu_gib - reserve_gib) * GiB
    per_rank = global_batch // world if global_batch % world == 0 else 0
    best = max(0, int((budget - states - fixed) // per_image)) if per_image > 0 else 0
    while best > 0 and total(best) > budget:
        best -= 1
    best = min(best, 1 << 16)
    rec = max([b for b in range(1, min(best, per_rank) + 1) if per_rank % b == 0] or [0])
    tb = total(micro_batch)
    return PlanRow(arch=name, patch=patch, stage=stage, checkpointing=ckpt, offload=offload, micro_batch=micro_batch,
                   params_gib=(st["params"] + st["gathered_params"]) / GiB, grads_gib=st["grads"] / GiB,
                   optimizer_gib=st["optimizer"] / GiB, buffers_gib=st["buckets"] / GiB,
                   fp32_grads_gib=st["fp32_grads"] / GiB, activations_gib=(fixed + per_image * micro_batch) / GiB,
                   teacher_gib=0.0, total_gib=tb / GiB, fits=tb <= budget, max_micro_batch=best,
                   recommended_micro_batch=rec, host_gib=st["host"] / GiB,
                   build_host_gib=build_host_bytes(P, largest, world, 0) / GiB)


def plan_step_command(args, cfg, plan_fn, default_model: tuple, header: str) -> int:
    """``megadigpt plan`` for a step without a teacher (segmentation, image-text): ``args`` is the command's
    namespace (models, gpus, gpu_mem, zero, ckpt, offload, micro_batch, precision, reserve, json, force);
    ``plan_fn(cfg, gpus, gpu_mem, models, stages, ckpts, offloads, micro_batch, precision, reserve)`` gives the rows
    (``default_model``: (arch, patch) where ``--models`` is not given); ``header`` opens the table."""
    import json
    from dataclasses import asdict

    from ..commands import parse_csv, parse_models, parse_onoff
    from ..config import ConfigError
    from ..model.vit import VIT_SIZES

    models = parse_models(args.models) if args.models is not None else [default_model]
    for arch, _ in models:
        if arch not in VIT_SIZES:
            raise ConfigError(f"unknown model {arch!r}; choose from {', '.join(VIT_SIZES)}")
    stages = parse_csv(args.zero, int, "--zero")
    if not stages or any(z not in (1, 2, 3) for z in stages):
        raise ConfigError(f"--zero takes stages 1, 2, 3, got {args.zero}")
    if getattr(args, "json", None):
        from ..checkpoint.convert import guard_output
        from ..commands import is_plan_json

        guard_output(args.json, "file", "--json", force=getattr(args, "force", False), inputs=[args.config],
                     own=is_plan_json)
    rows = plan_fn(cfg, args.gpus, args.gpu_mem, models, stages, [parse_onoff(v) for v in parse_csv(args.ckpt)],
                   [parse_onoff(v) for v in parse_csv(args.offload)], args.micro_batch, args.precision, args.reserve)
    print(header)
    print(markdown(rows, args.gpus, args.gpu_mem))
    if getattr(args, "json", None):
        from ..checkpoint.convert import write_output

        write_output(args.json, json.dumps([asdict(r) for r in rows], indent=1), "plan")
    return 0


def build_host_bytes(P: int, largest: int, world: int, stage: int) -> int:
    """Host memory per rank while the fp32 student is built: the whole of it (4 P) for ZeRO 0-2; under ZeRO-3
    (``distributed.partitioned``) this rank's partitions (4 P / N) plus one block in full, the most that
    construction or an initialisation step holds gathered at once (an upper bound: DeepSpeed partitions each
    leaf module as it is built)."""
    if stage == 3:
        return 4 * (math.ceil(P / world) + largest)
    return 4 * P


def teacher_host_bytes(tcfg, teacher_params: int) -> int:
    """Host memory per rank while the teacher is built for a GPU (before the student; its host memory is gone
    when the student is built). open_clip: only the image tower, from the weights file's mapped tensors, each
    copied to the device in the teacher's dtype on its own (``targets.openclip.host_build_bytes``; a random one is
    built on the device: none). timm and EfficientNet are built whole in fp32 on the host and then read their
    weights file whole: two fp32 copies (``DTYPE_BYTES["fp32"]`` each). Pixels: nothing."""
    if tcfg.kind == "open_clip":
        from ..targets.openclip import host_build_bytes

        return host_build_bytes(tcfg, teacher_params, DTYPE_BYTES["fp32"])
    if tcfg.kind == "pixels":
        return 0
    return 2 * DTYPE_BYTES["fp32"] * teacher_params


def ds_buffers(cfg, stage: int, params: int) -> ZeroBuffers:
    """The bucket sizes the engine will get: the template's, with "auto" resolved as ``build_ds_config`` does."""
    import json

    from ..distributed.engine import fill_buckets, template_path

    try:
        ds = json.loads(template_path(stage, cfg.train.ds_config).read_text())
    except Exception:  # noqa: BLE001 - no template: DeepSpeed's defaults
        return ZeroBuffers(overlap_comm=stage == 3)
    return ZeroBuffers.from_ds(fill_buckets(ds, params), stage)


def plan_one(cfg, world: int, gpu_gib: float, stage: int, ckpt: bool, offload: bool, micro_batch: int,
             precision: str = "bf16", teacher_dtype: str = "bf16", reserve_gib: float = RESERVE_GIB,
             classes: Optional[int] = None) -> PlanRow:
    """One configuration. ``reserve_gib``: the device memory outside torch's tensors that a run cannot use (CUDA
    context, NCCL buffers, DALI pools, allocator slack: see ``RESERVE_GIB``), taken off ``gpu_gib`` before
    fitting. ``classes``: plan a discrete target of that many ids before its tokenizer is fit."""
    sizes = model_sizes(cfg, classes)
    st = model_states(sizes.student_params, sizes.largest_module_params, world, stage, precision, offload,
                      ds_buffers(cfg, stage, sizes.student_params))
    a1 = trace_micro_step(cfg, 1, precision, teacher_dtype, ckpt, classes=classes)
    a2 = trace_micro_step(cfg, 2, precision, teacher_dtype, ckpt, classes=classes)
    per_image, fixed_act = a2 - a1, 2 * a1 - a2

    def act(b):
        return fixed_act + per_image * b

    teacher = sizes.teacher_params * DTYPE_BYTES[teacher_dtype]
    states = st["params"] + st["gathered_params"] + st["grads"] + st["optimizer"] + st["buckets"]
    # the optimizer step's fp32 gradients exist after the activations are gone: the peak is the larger phase
    def total(b):
        return teacher + states + max(act(b), st["fp32_grads"])

    budget = (gpu_gib - reserve_gib) * GiB
    per_rank = cfg.train.global_batch // world if cfg.train.global_batch % world == 0 else 0
    best = max(0, int((budget - teacher - states - fixed_act) // per_image)) if per_image > 0 else 0
    while best > 0 and total(best) > budget:
        best -= 1
    best = min(best, 1 << 16)
    rec = max([b for b in range(1, min(best, per_rank) + 1) if per_rank % b == 0] or [0])
    tb = total(micro_batch)
    return PlanRow(cfg.model.arch, cfg.model.patch_size, stage, ckpt, offload, micro_batch,
                   (st["params"] + st["gathered_params"]) / GiB, st["grads"] / GiB,
                   st["optimizer"] / GiB, st["buckets"] / GiB, st["fp32_grads"] / GiB, act(micro_batch) / GiB,
                   teacher / GiB, tb / GiB, tb <= budget, best, rec, st["host"] / GiB,
                   build_host_bytes(sizes.student_params, sizes.largest_module_params, world, stage) / GiB,
                   teacher_host_bytes(cfg.target, sizes.teacher_params) / GiB, cfg.train.global_batch)


def plan(cfg, world: int, gpu_gib: float, archs: Sequence[str], stages=(1, 2, 3), ckpts=(False, True),
         offloads=(False, True), micro_batch: Optional[int] = None, patch: Optional[int] = None,
         precision: str = "bf16", teacher_dtype: str = "bf16", reserve_gib: float = RESERVE_GIB,
         classes: Optional[int] = None) -> List[PlanRow]:
    rows = []
    for arch in archs:
        m = replace(cfg.model, arch=arch, patch_size=patch or cfg.model.patch_size, taps=None)
        c = replace(cfg, model=m)
        for stage in stages:
            for ck in ckpts:
                for off in offloads:
                    rows.append(plan_one(c, world, gpu_gib, stage, ck, off, micro_batch or cfg.train.micro_batch,
                                         precision, teacher_dtype, reserve_gib, classes))
    return rows


def markdown(rows: List[PlanRow], world: int, gpu_gib: float) -> str:
    head = ("| model | ZeRO | act. ckpt | offload | micro-batch | params | grads | optimizer | buckets | "
            "activations | step fp32 grads | teacher | total GiB | fits | max micro-batch | recommended | "
            "host GiB/GPU | build host GiB/GPU | teacher build host GiB/GPU |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| {r.arch}/{r.patch} | {r.stage} | {'on' if r.checkpointing else 'off'} | "
                   f"{'on' if r.offload else 'off'} | {r.micro_batch} | {r.params_gib:.2f} | {r.grads_gib:.2f} | "
                   f"{r.optimizer_gib:.2f} | {r.buffers_gib:.2f} | {r.activations_gib:.2f} | "
                   f"{r.fp32_grads_gib:.2f} | {r.teacher_gib:.2f} | {r.total_gib:.2f} | {'yes' if r.fits else 'no'} | "
                   f"{r.max_micro_batch} | {r.recommended_micro_batch} | {r.host_gib:.2f} | "
                   f"{r.build_host_gib:.2f} | {r.teacher_host_gib:.2f} |")
    out.append("")
    out.append("total = params + grads + optimizer + buckets + teacher + the larger of activations and step fp32 "
               "grads (the optimizer step's fp32 gradient partition, or ZeRO-1 bf16's flattened fp32 gradients for "
               "the all-reduce, exist after the activations are freed); grads include the fp32 accumulation "
               "buffers of 16-bit runs; "
               "host GiB/GPU: optimizer states offloaded to the host; build host GiB/GPU: host memory while the "
               "fp32 student is built (ZeRO-3 builds it partitioned); teacher build host GiB/GPU: host memory "
               "while the teacher is built, before the student (open_clip: its image tower's tensors read from the "
               "weights file, none for a random one)")
    out += [""] + recommendations(rows, world)
    return "\n".join(out)


def recommend(rows: List[PlanRow]) -> Optional[PlanRow]:
    """Of one model's rows, the configuration to train with: among those whose recommended micro-batch (the
    largest that fits and divides the per-GPU batch) exists, no CPU offload first (it moves the optimizer step to
    the host), then no activation checkpointing (it recomputes every block's forward: about a third more compute),
    then the smallest ZeRO stage (less communication), then the largest micro-batch (the fewest accumulation
    steps). None when nothing fits."""
    ok = [r for r in rows if r.recommended_micro_batch > 0]
    return min(ok, key=lambda r: (r.offload, r.checkpointing, r.stage, -r.recommended_micro_batch), default=None)


def recommendations(rows: List[PlanRow], world: int) -> List[str]:
    """One line per model (in the order of ``rows``): what to train it with, as overrides to paste."""
    out, models = [], {}
    for r in rows:
        models.setdefault((r.arch, r.patch), []).append(r)
    for (arch, patch), group in models.items():
        r, gb = recommend(group), group[0].global_batch
        if r is None:
            if gb and gb % world:
                out.append(f"recommended {arch}/{patch}: none: global batch {gb} does not divide over {world} GPUs")
            else:
                out.append(f"recommended {arch}/{patch}: none: no configuration here fits micro-batch 1 (try more "
                           f"GPUs, activation checkpointing, ZeRO-3 or CPU offload)")
            continue
        mb = r.recommended_micro_batch
        accum = gb // (world * mb) if gb else None
        how = (f"ZeRO-{r.stage}, activation checkpointing {'on' if r.checkpointing else 'off'}, offload "
               f"{'on' if r.offload else 'off'}, micro-batch {mb}")
        if accum:
            how += f", accumulation {accum} ({world} GPUs x {mb} x {accum} = global batch {gb})"
        keys = (f"train.zero_stage={r.stage} train.activation_checkpointing={str(r.checkpointing).lower()} "
                f"train.micro_batch={mb}")
        if r.offload:
            keys += " train.ds_config=<a DeepSpeed config with offload_optimizer, e.g. ds_configs/zero3_offload.json>"
        out.append(f"recommended {arch}/{patch}: {how}: {keys}")
    return out

"""What a trainer needs of parameters that ZeRO-3 may have partitioned across ranks: the full state dict (for
exports), and an EMA kept on each rank's own partition.

Under ZeRO-3 every parameter's local slice is ``p.ds_tensor`` (``p.data`` is empty outside a forward); under
ZeRO 0-2 ``p.data`` is the whole parameter on every rank. Under bf16 the fp32 values are the optimizer's masters,
partitioned under ZeRO 1-3. The EMA follows this rank's fp32 masters, so it costs fp32 ``params / world_size`` per
rank under ZeRO 1-3 and never needs a collective to update.
"""

import contextlib
from pathlib import Path
from typing import Dict, List

import torch


def is_partitioned(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


# Where a parameter's fp32 values live. Under bf16/fp16 DeepSpeed's optimizer keeps fp32 masters and the module
# holds 16-bit copies: exports and the EMA read the masters (rounding them to bf16 loses 8 mantissa bits).
#   "z3":   ZeRO-3: this rank's partition (the fp32 master partition, else ``ds_tensor``)
#   "frag": ZeRO-1/2 and DeepSpeed's BF16_Optimizer: this rank's fragment of the flat fp32 partition
#   "full": anything else (fp32 ZeRO-0, no engine): ``p.data``
def _layout(p) -> str:
    if hasattr(p, "ds_id"):
        return "z3"
    return "frag" if hasattr(p, "_hp_mapping") else "full"


def _local_master(p) -> torch.Tensor:
    """This rank's fp32 values of ``p`` in its layout (a view of the live master where DeepSpeed has one)."""
    kind = _layout(p)
    if kind == "z3":
        if p.requires_grad and hasattr(p, "_z3_optimizer"):
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p)
        return p.ds_tensor
    if kind == "frag":
        if p._hp_mapping is None:  # none of this parameter lives in this rank's partition
            return torch.zeros(0, dtype=torch.float32, device=p.device)
        return p._hp_mapping.get_hp_fragment()
    return p.data


def _gather(p, local: torch.Tensor) -> torch.Tensor:
    """The whole parameter (fp32, its shape) from every rank's ``local`` of :func:`_local_master`'s layout. A
    collective in the "z3" and "frag" layouts: every rank calls it for the same parameters in the same order."""
    import torch.distributed as dist

    kind = _layout(p)
    local = local.detach().float()
    if kind == "z3":
        group = getattr(p, "ds_process_group", None)
        buf = torch.empty(dist.get_world_size(group) * local.numel(), dtype=torch.float32, device=local.device)
        dist.all_gather_into_tensor(buf, local.reshape(-1).contiguous(), group=group)
        return buf.narrow(0, 0, p.ds_numel).view(p.ds_shape)
    if kind == "frag":  # DeepSpeed's own get_full_hp_param, for any fp32 fragment (master or EMA)
        buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        if p._hp_mapping is not None:
            address = p._hp_mapping.lp_fragment_address
            buf.narrow(0, address.start, address.numel).copy_(local.reshape(-1))
        dist.all_reduce(buf, group=p._dp_group)
        return buf.view(p.shape)
    return local


def full_state_dict(module: torch.nn.Module, rank0: bool, ema: "LocalEMA" = None) -> Dict[str, torch.Tensor]:
    """fp32 CPU copies of every parameter (the optimizer's fp32 masters where DeepSpeed keeps them; the EMA's
    values for the parameters it tracks, with ``ema``) and persistent buffer, on rank 0 (empty elsewhere). A
    collective under ZeRO: every rank must call it."""
    out = {}
    shadow = {id(q): s for q, s in zip(ema.params, ema.shadow)} if ema is not None else {}
    for name, p in module.named_parameters():
        full = _gather(p, shadow[id(p)] if id(p) in shadow else _local_master(p))
        if rank0:
            out[name] = full.detach().float().cpu().clone()
        del full
    if rank0:
        persistent = set(module.state_dict().keys())
        for name, b in module.named_buffers():
            if name in persistent:
                out[name] = b.detach().float().cpu().clone()
    return out


def _module_local(p) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _held_whole(p) -> bool:
    """A ZeRO-3 parameter whose whole value is resident between forwards: those under
    ``stage3_param_persistence_threshold`` (every bias, norm, ``cls_token``; at toy sizes every parameter) are
    gathered once after each optimizer step and never re-fetched, so the forward reads ``p.data``, not the partition.
    Decided by size and by the same forwards on every rank, so every rank holds the same ones (the gather of
    :meth:`LocalEMA.swapped_in` is a collective)."""
    if not hasattr(p, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.AVAILABLE and p.data.numel() == p.ds_numel


class LocalEMA:
    """``ema = decay * ema + (1 - decay) * master`` in fp32 on each rank's local fp32 master values (see
    :func:`_layout`): no collective to update; evaluating or exporting with it gathers."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow: List[torch.Tensor] = [_local_master(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        current = [_local_master(p).float() for p in self.params]  # re-read: views of the live masters
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The module computes with the EMA weights inside the block (evaluation); the masters are untouched, so
        training goes on from them. A collective under ZeRO-1/2 (the fragments are gathered) and under ZeRO-3 where
        parameters stay gathered (see :func:`_held_whole`)."""
        held = [p for p in self.params if _held_whole(p)]
        backup = [_module_local(p).detach().clone() for p in self.params]
        backup_whole = [p.data.detach().clone() for p in held]
        shadow = {id(p): s for p, s in zip(self.params, self.shadow)}
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                value = _gather(p, s) if _layout(p) == "frag" else s
                _module_local(p).copy_(value.view_as(_module_local(p)))
            for p in held:  # the forward reads these whole copies, never the partition written above
                p.data.copy_(_gather(p, shadow[id(p)]).view_as(p.data))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    _module_local(p).copy_(b)
                for p, b in zip(held, backup_whole):
                    p.data.copy_(b)

    # one file per rank: the slices are this rank's (a different world size starts the EMA afresh, see finetune)
    def save(self, path: Path):
        torch.save({"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}, path)

    def load(self, path: Path) -> bool:
        from ..checkpoint.safe_load import load

        state = load(path, deepspeed_types=False)  # tensors only; a damaged or refused file: one line naming it
        if not (isinstance(state, dict) and isinstance(state.get("shadow"), list)):
            return False
        if len(state["shadow"]) != len(self.shadow) or any(a.shape != b.shape for a, b in
                                                           zip(state["shadow"], self.shadow)):
            return False
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
        return True

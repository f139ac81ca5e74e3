"""What a trainer needs of parameters that ZeRO-3 may have partitioned across ranks: the full state dict (for
exports), and an EMA kept on each rank's own partition.

Under ZeRO-3 every parameter's local slice is ``p.ds_tensor`` (``p.data`` is empty outside a forward); under
ZeRO 0-2 ``p.data`` is the whole parameter on every rank. The EMA follows whatever is local, so it costs fp32
``params / world_size`` per rank under ZeRO-3 and never needs a collective to update.
"""

import contextlib
from pathlib import Path
from typing import Dict, List

import torch


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def is_partitioned(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def full_state_dict(module: torch.nn.Module, rank0: bool) -> Dict[str, torch.Tensor]:
    """fp32 CPU copies of every parameter and persistent buffer, on rank 0 (empty elsewhere). A collective under
    ZeRO-3: every rank must call it."""
    out = {}
    partitioned = is_partitioned(module)
    if partitioned:
        import deepspeed

    for name, p in module.named_parameters():
        ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=None) if partitioned else contextlib.nullcontext()
        with ctx:
            if rank0:
                out[name] = p.data.detach().float().cpu().clone()
    if rank0:
        persistent = set(module.state_dict().keys())
        for name, b in module.named_buffers():
            if name in persistent:
                out[name] = b.detach().float().cpu().clone()
    return out


class LocalEMA:
    """``ema = decay * ema + (1 - decay) * param`` in fp32 on each rank's local parameter slices."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow: List[torch.Tensor] = [_local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        current = [_local(p).float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The module computes with the EMA weights inside the block (evaluation, export)."""
        backup = [_local(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                _local(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    _local(p).copy_(b)

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

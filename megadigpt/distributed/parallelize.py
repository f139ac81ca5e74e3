"""Applied to the plain model before it is handed to DeepSpeed (the torchtitan order: activation checkpointing,
then compile, then sharding by the engine). Parameter names never change."""

import functools

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


def apply_compile(model, teacher=None):
    """``torch.compile`` each transformer block (every ``blocks`` ModuleList: the encoder's, the decoders', a timm
    classifier's) and the frozen teacher's forward. Per block, as torchtitan does: the blocks are alike, so the
    graphs are small and a ZeRO-3 parameter gather between blocks stays outside them. After activation
    checkpointing (the checkpointed forward is what is compiled). Compilation happens at the first forward; the
    loops log the first step's time as the cold-compile cost."""
    blocks = [blk for name, m in model.named_modules() if name.split(".")[-1] == "blocks" and
              isinstance(m, (nn.ModuleList, nn.Sequential)) for blk in m]
    for blk in blocks:
        blk.compile()
    if teacher is not None:
        teacher.compile()
    return len(blocks)


def set_attention_backend(model, backend: str):
    from ..model.attention import BACKENDS, _MultiHead

    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    for m in model.modules():
        if isinstance(m, _MultiHead):
            m.backend = backend
    return model

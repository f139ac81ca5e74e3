import math

import pytest
import torch

from megadigpt.config import ConfigError, load_config
from megadigpt.distributed.engine import build_ds_config
from megadigpt.train.optim import lr_at, param_groups

from .test_model import tiny


def test_no_weight_decay_on_1d_params_and_biases():
    model = tiny()
    no_decay, decay = param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "encoder.blocks.0.norm1.weight" in nd and "encoder.blocks.0.attn.qkv.bias" in nd
    assert "encoder.blocks.0.attn.qkv.weight" in d and "gen_taps.proj.weight" in d
    # timm's rule, as the reference applies it: the (1, 1, C) tokens are not 1-D and do decay
    assert "encoder.cls_token" in d and "gen_decoder.query_token" in d
    assert len(nd) + len(d) == sum(1 for _ in model.parameters())
    assert "encoder.pos_embed" not in nd | d  # fixed sin-cos: a buffer, never optimised


def reference_lr(epoch, lr, min_lr, warmup_epochs, epochs):
    """The reference's util/lr_sched.adjust_learning_rate, with epoch = step / steps_per_epoch."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_lr_schedule_matches_reference():
    spe, epochs, warm = 312, 300, 40
    for step in (0, 1, 100, 40 * 312 - 1, 40 * 312, 50_000, 300 * 312 - 1):
        assert lr_at(step, 2.4e-3, warm * spe, epochs * spe, 1e-6) == pytest.approx(
            reference_lr(step / spe, 2.4e-3, 1e-6, warm, epochs), rel=1e-12, abs=1e-15)


def test_ds_config_from_run_config(tmp_path):
    cfg = load_config("demo", ["train.global_batch=64", "train.micro_batch=8", "train.zero_stage=3",
                               "optim.grad_clip=3.0"])
    ds = build_ds_config(cfg, world_size=2, precision="bf16")
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_clipping"] == 3.0
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    conflicting = tmp_path / "mine.json"
    conflicting.write_text('{"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 3}}')
    cfg.train.ds_config = str(conflicting)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16"):
        build_ds_config(cfg, world_size=2, precision="bf16")

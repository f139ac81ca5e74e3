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
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    cfg.train.zero_stage = 0  # DeepSpeed refuses fp32 accumulation of bf16 gradients without ZeRO
    assert "data_types" not in build_ds_config(cfg, world_size=2, precision="bf16")
    cfg.train.zero_stage = 3
    assert "data_types" not in build_ds_config(cfg, world_size=2, precision="fp32")
    conflicting = tmp_path / "mine.json"
    conflicting.write_text('{"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 3}}')
    cfg.train.ds_config = str(conflicting)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16"):
        build_ds_config(cfg, world_size=2, precision="bf16")


def test_fused_adamw_equals_the_loop():
    """The fused kernel (every device that has one, CPU included) takes the same steps as the per-parameter loop:
    one step agrees to an ulp (1.5e-8 measured); Adam then amplifies ulps where gradients are near zero (1e-4 in
    single weights by step 2, as a change of thread count does), so the losses are compared over 5 steps."""
    from megadigpt.config import OptimConfig
    from megadigpt.train.optim import build_optimizer

    def run(fused: bool, steps: int):
        model = tiny().train()
        opt = build_optimizer(model, OptimConfig(), 1e-3, "cpu")
        if not fused:
            opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
        assert opt.defaults.get("fused") is (True if fused else None)
        g, losses = torch.Generator().manual_seed(0), []
        images, tokens, cls = (torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 64, 24, generator=g),
                               torch.randn(2, 24, generator=g))  # one batch, fitted: the loss must fall
        order = torch.stack([torch.randperm(4, generator=g) for _ in range(2)])
        for _ in range(steps):
            gen, dis = model(images, tokens, cls, order)
            opt.zero_grad()
            loss = gen.mean() + dis.mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.cat([p.detach().flatten() for p in model.parameters()]), losses

    (fused, _), (loop, _) = run(True, 1), run(False, 1)
    assert not torch.equal(fused, torch.cat([p.detach().flatten() for p in tiny().parameters()]))  # it stepped
    torch.testing.assert_close(fused, loop, rtol=0, atol=1e-7)
    (_, fused_losses), (_, loop_losses) = run(True, 5), run(False, 5)
    assert fused_losses[-1] < fused_losses[0]
    torch.testing.assert_close(fused_losses, loop_losses, rtol=1e-5, atol=0)


def test_auto_precision_follows_the_device():
    """bf16 where the GPU has bf16 tensor cores, fp16 on older GPUs (V100, T4), fp32 on CPU."""
    from megadigpt.train.pretrain import auto_precision

    assert auto_precision("cpu") == "fp32"
    assert auto_precision("cuda", bf16_supported=True) == "bf16"
    assert auto_precision("cuda", bf16_supported=False) == "fp16"

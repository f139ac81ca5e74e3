"""The ZeRO-3 student built partitioned (deepspeed.zero.Init + step-wise initialisation): the same initial weights
as a plain build for the same seed, init_from weights loaded module by module from rank 0, bad weights refused on
every rank, weight-decay groups by the full shapes. Real DeepSpeed, 2 gloo ranks."""

import subprocess
import sys

from .conftest import REPO, free_port, subprocess_env

SCRIPT = r"""
import os, torch, deepspeed
from megadigpt.config import ConfigError, ModelConfig
from megadigpt.model import build_model
from megadigpt.distributed.partitioned import build_partitioned, load_partitioned
from megadigpt.train.optim import param_groups
deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
rank = int(os.environ["RANK"])
m = ModelConfig(arch="vit_tiny", embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=4, decoder_dim=32,
                decoder_depth=1, decoder_heads=2)
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
build = lambda **kw: build_model(m, 48, 8, **kw)

def gathered(model):
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().clone() for k, v in model.named_parameters()}

torch.manual_seed(0)
plain = build()
torch.manual_seed(0)
part = build_partitioned(build, ds)
assert all(p.numel() < plain.get_parameter(n).numel() for n, p in part.named_parameters()), "not partitioned"
got = gathered(part)
assert all(torch.equal(got[k], v) for k, v in plain.named_parameters()), "initial weights differ"
names = lambda groups, m: [sorted(n for n, p in m.named_parameters() if any(p is q for q in g["params"]))
                           for g in groups]
assert names(param_groups(part, 0.05), part) == names(param_groups(plain, 0.05), plain), "weight-decay groups"
torch.manual_seed(7)
other = build()
load_partitioned(part, lambda: other.state_dict(), "w")
got = gathered(part)
assert all(torch.equal(got[k], v) for k, v in other.named_parameters()), "loaded weights differ"
bad = {k: v for k, v in other.state_dict().items() if "gen_taps" not in k}
try:
    load_partitioned(part, lambda: bad, "train.init_from x")
    raise SystemExit("accepted a state without gen_taps")
except ConfigError as e:
    assert "missing ['gen_taps" in str(e), e
def unreadable():
    raise ConfigError("x.safetensors: damaged")
try:
    load_partitioned(part, unreadable, "w")
    raise SystemExit("accepted an unreadable file")
except ConfigError as e:
    assert "damaged" in str(e)
# bf16 (the shipped ZeRO-3 configs' precision): zero.Init casts what torch's factories make to bf16, so anything
# computed from them (the sin-cos tables, the decoders' non-persistent decoder_pos_embed above all, which no
# checkpoint or export holds) must still equal the plain build's; the engine casts parameters to bf16 and keeps
# buffers in fp32 in both builds. Grids of patch 14 and 16.
for patch, img in ((14, 56), (16, 64)):
    mb = ModelConfig(arch="vit_tiny", embed_dim=64, depth=2, num_heads=2, img_size=img, patch_size=patch,
                     decoder_dim=32, decoder_depth=1, decoder_heads=2)
    build_b = lambda **kw: build_model(mb, 48, 8, **kw)
    torch.manual_seed(0)
    plain = build_b()
    torch.manual_seed(0)
    part = build_partitioned(build_b, {**ds, "bf16": {"enabled": True}})
    got = gathered(part)
    bad = [k for k, v in plain.named_parameters() if not torch.equal(got[k], v.detach().bfloat16())]
    assert not bad, f"bf16 patch {patch}: parameters differ: {bad[:4]}"
    pb, persistent = dict(part.named_buffers()), set(part.state_dict())
    assert any(k not in persistent for k in pb), "no non-persistent buffer checked"
    bad = [(k, v.dtype, pb[k].dtype) for k, v in plain.named_buffers() if v.dtype != pb[k].dtype or
           not torch.equal(v, pb[k].to(v.device))]
    assert not bad, f"bf16 patch {patch}: buffers differ: {bad}"
print(f"rank {rank} OK", flush=True)
torch.distributed.destroy_process_group()
os._exit(0)  # without an engine, zero.Init's gloo work threads can abort the interpreter's exit ("terminate called")
"""


def test_partitioned_build_equals_plain_and_loads_from_rank0(tmp_path):
    script = tmp_path / "t.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(), cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rank 0 OK" in proc.stdout and "rank 1 OK" in proc.stdout

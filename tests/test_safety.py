"""No file megadigpt reads can run code: a pickle payload (``os.system("touch <marker>")``) planted in every kind of
file megadigpt reads — DeepSpeed model and optimizer shards (ZeRO-0 and ZeRO-1), a universal checkpoint, EMA
shards, tokenizer, reference ``.pth`` — never runs, in every command that reads them (convert to timm /
reference / fp32, pretrain ``train.init_from``, finetune ``--init-from``, probe, resume, universal conversion);
each is refused with one ``megadigpt: error:`` line naming the file, exit code 2. Damaged safetensors,
``!!python`` YAML tags and malformed label files are refused the same way. Real tiny runs, real DeepSpeed."""

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from megadigpt.checkpoint import safe_load
from megadigpt.config import ConfigError

from .conftest import TINY, run_cli


class Payload:
    """Unpickling this creates ``marker``: what an attacker's code would do, observable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def plant(path, marker, legacy=False):
    """Add a payload to a torch file. ``legacy``: torch's old non-zip format, which the static pre-scan cannot read,
    so only the ``weights_only`` loads (DeepSpeed's included) stand between it and execution."""
    obj = safe_load.load(path)
    obj = dict(obj) if isinstance(obj, dict) else {"obj": obj}
    obj["megadigpt_test_payload"] = Payload(marker)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    reseal(path)


def reseal(path):
    """An attacker edits the completeness marker too: record the planted file's new size and CRC-32, so it is the
    loading, not the integrity check, that stands in the way."""
    import zlib

    path = Path(path)
    for d in path.parents:
        m = d / "megadigpt.json"
        if m.is_file():
            marker = json.loads(m.read_text())
            rel = str(path.relative_to(d))
            if rel in marker.get("files", {}):
                data = path.read_bytes()
                marker["files"][rel] = {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
                m.write_text(json.dumps(marker))
            return


def _pre(cifar_dir, run_dir, *extra):
    return ["pretrain", "--data", str(cifar_dir / "train-000000.tar"), "--run-dir", str(run_dir), *TINY,
            "train.global_batch=8", "train.micro_batch=8", *extra]


FT = ["--config", "cifar10_finetune", "data.num_workers=0", "train.progress=off", "train.log_every=1",
      "train.tensorboard=false", "train.global_batch=16", "train.micro_batch=16", "data.loader=torch"]


def _ft(cifar_small, run_dir, *extra):
    return ["finetune", "--train", str(cifar_small / "train.jsonl"), "--val", str(cifar_small / "val.jsonl"),
            "--run-dir", str(run_dir), *FT, *extra]


FT_MODEL = ["model.arch=vit_tiny", "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.patch_size=4",
            "train.zero_stage=1", "finetune.ema_decay=0.9"]


@pytest.fixture(scope="module")
def runs(cifar_dir, cifar_small, tmp_path_factory):
    """One-step runs: pretraining under ZeRO-0 (the module and optimizer in one model-states file) and ZeRO-1
    (optimizer shards), a fine-tune with EMA shards and label names."""
    base = tmp_path_factory.mktemp("safety")
    run_cli(_pre(cifar_dir, base / "z0", "train.max_steps=1", "train.zero_stage=0"))
    run_cli(_pre(cifar_dir, base / "z1", "train.max_steps=1", "train.zero_stage=1"))
    run_cli(_ft(cifar_small, base / "ft", *FT_MODEL, "train.max_steps=1"))
    return base


def _copy(runs, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(runs / name, dst)
    return dst


def _tag(run_dir):
    return next((run_dir / "checkpoints").glob("step_*[0-9]"))


def _refused(p, path, marker, what="refused to load"):
    """One error line, exit 2, naming the file; the payload never ran."""
    lines = [l for l in p.stderr.splitlines() if l.startswith("megadigpt: error:")]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1 and str(path) in lines[0] and what in lines[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not marker.exists()


class _Proc:  # cli.main in this process, shaped like a CompletedProcess
    def __init__(self, rc, err):
        self.returncode, self.stderr = rc, err


def _main(capsys, args):
    from megadigpt.cli import main

    capsys.readouterr()
    rc = main(args)
    return _Proc(rc, capsys.readouterr().err)


def test_the_payload_is_live(tmp_path):
    """The test can fail: unpickled the unsafe way, the planted file does run its code."""
    f, marker = tmp_path / "x.pt", tmp_path / "PWNED"
    torch.save({"w": torch.zeros(1)}, f)
    plant(f, marker)
    torch.load(f, weights_only=False)
    assert marker.exists()


def test_allow_list_is_exactly_deepspeeds(runs, tmp_path):
    """Real checkpoints load under the allow-list; what it allows is what they hold (ZeRO-1 optimizer shards:
    loss scaler, stage enum, fragment addresses) plus fp16's DynamicLossScaler (GPU only), which needs nothing
    more."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    held = set()
    for f in sorted((runs / "z1" / "checkpoints").rglob("*.pt")):
        held |= set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        safe_load.load(f)
    names = {f"{t.__module__}.{t.__qualname__}" for t in safe_load.allowed_globals()}
    assert held == names - {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"}, held
    f = tmp_path / "fp16.pt"
    torch.save({"loss_scaler": DynamicLossScaler(2 ** 16, 1000, 1, 2, False)}, f)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(f)) == [
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"]
    assert safe_load.load(f)["loss_scaler"].cur_scale == 2 ** 16


@pytest.mark.parametrize("to", ["timm", "reference", "fp32"])
def test_convert_refuses_model_states(runs, tmp_path, capsys, to):
    run = _copy(runs, "z0", tmp_path)
    f, marker = _tag(run) / "mp_rank_00_model_states.pt", tmp_path / "PWNED"
    plant(f, marker)
    _refused(_main(capsys, ["convert", str(run), "--to", to, "--out", str(tmp_path / "out")]), f, marker)


@pytest.mark.parametrize("kind,legacy", [("optim_states", False), ("model_states", True)])
def test_convert_refuses_zero_shards(runs, tmp_path, capsys, kind, legacy):
    """ZeRO 1-3: DeepSpeed's zero_to_fp32 reads them (with weights_only=False of its own). A legacy-format file
    passes the static scan, so only the patched torch.load inside zero_to_fp32 refuses it."""
    run = _copy(runs, "z1", tmp_path)
    marker = tmp_path / "PWNED"
    f = next(_tag(run).glob(f"*{kind}.pt"))
    plant(f, marker, legacy=legacy)
    _refused(_main(capsys, ["convert", str(run), "--to", "fp32", "--out", str(tmp_path / "o.safetensors")]), f,
             marker)


def test_init_from_and_probe_refuse_a_run_directory(runs, cifar_dir, cifar_small, tmp_path):
    run = _copy(runs, "z0", tmp_path)
    f, marker = _tag(run) / "mp_rank_00_model_states.pt", tmp_path / "PWNED"
    plant(f, marker)
    _refused(run_cli(_pre(cifar_dir, tmp_path / "p", "train.max_steps=1", f"train.init_from={run}"), check=False),
             f, marker)
    _refused(run_cli(_ft(cifar_small, tmp_path / "f", "train.max_steps=1", "--init-from", str(run)), check=False),
             f, marker)
    _refused(run_cli(["probe", str(run), "--config", "cifar10_finetune", "--train", str(cifar_small / "train.jsonl"),
                      "--val", str(cifar_small / "val.jsonl"), "--out", str(tmp_path / "probe"),
                      "data.num_workers=0", "data.loader=torch", "probe.epochs=1"], check=False), f, marker)


@pytest.mark.parametrize("stage,kind", [(0, "model_states"), (1, "optim_states")])
def test_resume_refuses_shards(runs, cifar_dir, tmp_path, stage, kind):
    run = _copy(runs, f"z{stage}", tmp_path)
    f, marker = next(_tag(run).glob(f"*{kind}.pt")), tmp_path / "PWNED"
    plant(f, marker, legacy=stage == 1)  # ZeRO-1: through DeepSpeed's own (patched) load_checkpoint
    _refused(run_cli(_pre(cifar_dir, run, "train.max_steps=2", f"train.zero_stage={stage}", "train.allow_schedule_change=true"), check=False), f, marker)


def _as_if_two_ranks(run):
    """The marker claims 2 ranks, so a 1-rank resume goes through the universal checkpoint."""
    m = _tag(run) / "megadigpt.json"
    m.write_text(json.dumps({**json.loads(m.read_text()), "world_size": 2}))  # (the marker lists no marker)


def test_universal_conversion_and_loading(runs, cifar_dir, tmp_path):
    """The conversion subprocess (megadigpt.checkpoint.safe_universal) refuses a payload in a shard; a payload in
    a converted universal file is refused on resume; clean files convert and resume."""
    from megadigpt.checkpoint import make_universal

    run = _copy(runs, "z1", tmp_path)
    _as_if_two_ranks(run)
    tag = _tag(run)
    f, marker = next(tag.glob("*optim_states.pt")), tmp_path / "PWNED"
    clean = f.read_bytes()
    plant(f, marker, legacy=True)
    with pytest.raises(ConfigError, match="refused to load") as e:
        make_universal(run, tag.name)
    assert str(f) in str(e.value) and not marker.exists()
    assert not (run / "checkpoints" / f"{tag.name}_universal").exists()

    f.write_bytes(clean)
    reseal(f)
    uni = run / "checkpoints" / make_universal(run, tag.name)
    g = next(uni.rglob("fp32.pt"))
    plant(g, marker, legacy=True)  # read by DeepSpeed's ZeRO universal loader (weights_only=False of its own)
    args = _pre(cifar_dir, run, "train.max_steps=2", "train.zero_stage=1", "train.allow_schedule_change=true")
    _refused(run_cli(args, check=False), g, marker)

    shutil.rmtree(uni)
    run_cli(args)  # clean: converted again, resumed, trained
    ev = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"resume"' in l]
    assert ev and ev[-1]["universal"] is True and ev[-1]["step"] == 1


def test_finetune_resume_refuses_ema_shard(runs, cifar_small, tmp_path):
    run = _copy(runs, "ft", tmp_path)
    f, marker = next(_tag(run).glob("ema_rank*.pt")), tmp_path / "PWNED"
    plant(f, marker)
    _refused(run_cli(_ft(cifar_small, run, *FT_MODEL, "train.max_steps=2", "train.allow_schedule_change=true"), check=False), f, marker)


def test_other_files(runs, tmp_path, capsys):
    """Tokenizer, reference .pth, safetensors with a damaged header, a config.yaml with a !!python tag, a label
    file that is not a list of names: refused, naming the file; nothing runs."""
    from megadigpt.checkpoint.convert import load_any, load_encoder_weights, to_reference
    from megadigpt.tokenizer.codebook import load_codebook

    marker = tmp_path / "PWNED"
    tok = tmp_path / "tok.pt"
    torch.save({"centroids": torch.zeros(4, 3)}, tok)
    plant(tok, marker)
    with pytest.raises(ConfigError, match="tok.pt"):
        load_codebook(tok)

    ref = tmp_path / "ref.pth"
    torch.save(to_reference(load_any(runs / "z0")), ref)
    plant(ref, marker)
    for fn in (load_any, load_encoder_weights):
        with pytest.raises(ConfigError, match="refused to load") as e:
            fn(ref)
        assert str(ref) in str(e.value)
    _refused(_main(capsys, ["convert", str(ref), "--to", "fp32", "--out",
                            str(tmp_path / "o.safetensors")]), ref, marker)

    st = tmp_path / "bad.safetensors"
    st.write_bytes((10 ** 6).to_bytes(8, "little") + b'{"x": ')  # header length beyond the file
    for fn in (load_any, load_encoder_weights):
        with pytest.raises(ConfigError, match="not a loadable safetensors file") as e:
            fn(st)
        assert str(st) in str(e.value)

    run = _copy(runs, "ft", tmp_path)
    (run / "label_names.json").write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match="label_names.json"):
        load_encoder_weights(run)

    run = _copy(runs, "z0", tmp_path)
    (run / "config.yaml").write_text(f"model: !!python/object/apply:os.system [touch {marker}]\n")
    p = _main(capsys, ["convert", str(run), "--to", "timm", "--out", str(tmp_path / "t"), "--num-heads", "2"])
    assert not marker.exists() and p.returncode in (0, 2), p.stderr
    p = _main(capsys, ["show-config", "--config", str(run / "config.yaml")])
    assert not marker.exists() and p.returncode == 2 and p.stderr.count("megadigpt: error:") == 1, p.stderr

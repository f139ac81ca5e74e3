"""What a run shows its users (issue 30, items 1-3): W&B run the way its users run it (its environment, offline,
disabled, no credentials), one set of metric names in TensorBoard and W&B (read back from their own files), the
resolved config in both, and the terminal (a progress bar in a real pseudo-terminal, the closing line). Real
libraries and real tiny runs; W&B only offline (nothing here reaches a network)."""

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Optional

import pytest

from megadigpt.config import ConfigError, load_config
from megadigpt.train.metrics import (MetricsSink, flat_config, metric_tag, resolve_wandb_mode, show,
                                     wandb_credentials, wandb_preflight)

from .conftest import REPO, TINY, megadigpt_cmd, subprocess_env

API_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B key (40 hex digits): never sent anywhere


def clean_env(home: Optional[Path] = None, **extra) -> dict:
    """The test environment without any W&B variable of the machine running it; HOME (hence ~/.netrc and W&B's
    settings files) in ``home`` where given, torch's compiled extensions (DeepSpeed's) still found in the real
    one's cache."""
    env = {k: v for k, v in subprocess_env(**extra).items() if not (k.startswith("WANDB_") and k not in extra)}
    env.pop("NETRC", None)
    if home is not None:
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
        env["HOME"] = str(home)
    return env


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """This process's W&B environment emptied, HOME a fresh folder."""
    pytest.importorskip("wandb")
    for k in list(os.environ):
        if k.startswith("WANDB_") or k == "NETRC":
            monkeypatch.delenv(k)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # W&B's workspace settings file (`wandb offline`) is ./wandb/settings
    return home


def wandb_records(run_file: Path):
    """The records of a W&B run file (``run-<id>.wandb``: LevelDB's log format, 32 KiB blocks of chunks with a
    7-byte header, after W&B's 7-byte file header), each a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = run_file.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            buf = chunk
        else:  # middle, last
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def tensorboard_run(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# ----------------------------------------------------------------------------------------- names and units


def test_one_rule_names_every_metric_and_mfu_is_a_percentage_for_people():
    assert metric_tag("gen_loss") == "train/gen_loss" and metric_tag("lr") == "train/lr"
    assert metric_tag("val_top1") == "val/val_top1" and metric_tag("val_ema_mIoU") == "val/val_ema_mIoU"
    assert metric_tag("knn_top1") == "val/knn_top1" and metric_tag("eval_top1") == "eval/eval_top1"
    assert metric_tag("zeroshot_top1") == "val/zeroshot_top1"
    assert show("mfu_total", 0.01234) == "1.23%" and show("lr", 0.001) == "0.001"
    assert flat_config({"model": {"arch": "vit_tiny", "taps": [1, 2], "depth": 4, "patch_size": None},
                        "train": {"wandb": True}}) == {"model.arch": "vit_tiny", "model.taps": "[1, 2]",
                                                       "model.depth": 4, "train.wandb": True}


# ----------------------------------------------------------------------------------------- W&B's environment


def _cfg(*overrides):
    return load_config("demo", ["train.wandb=true"] + list(overrides))


def test_wandb_environment_wins_over_defaults_and_disabled_switches_it_off(wandb_env, tmp_path, monkeypatch):
    # nothing set: W&B's default, online, which needs credentials: refused, one line
    with pytest.raises(ConfigError, match="no W&B credentials") as e:
        wandb_preflight(_cfg())
    assert "\n" not in str(e.value) and "WANDB_MODE=offline" in str(e.value)
    assert wandb_preflight(load_config("demo", [])) is None  # train.wandb off: nothing checked
    # the environment decides what the config leaves unset; the config's explicit keys are passed on
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_preflight(_cfg()) == {"mode": "offline"}
    assert wandb_preflight(_cfg("train.wandb_tags=a, b", "train.wandb_group=g", "train.wandb_entity=team",
                                "train.wandb_name=n", "train.wandb_project=p")) == {
        "mode": "offline", "tags": ["a", "b"], "group": "g", "entity": "team", "name": "n", "project": "p"}
    assert wandb_preflight(_cfg("train.wandb_tags=[x, y]"))["tags"] == ["x", "y"]
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's old name for offline
    assert resolve_wandb_mode() == "offline"
    # an explicit config mode wins over the environment (as wandb.init's argument does) ...
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_preflight(_cfg("train.wandb_mode=offline"))["mode"] == "offline"
    # ... except disabled, the switch CI jobs use: off, whatever the config says
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_preflight(_cfg("train.wandb_mode=offline")) is None
    monkeypatch.setenv("WANDB_MODE", "offlne")
    with pytest.raises(ConfigError, match="WANDB_MODE='offlne' is not a W&B mode"):
        wandb_preflight(_cfg())
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_preflight(_cfg("train.wandb_mode=disabled")) is None
    # `wandb offline` (a settings file in the working folder) is W&B's too
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nmode = offline\n")
    assert wandb_preflight(_cfg()) == {"mode": "offline"}
    (tmp_path / "wandb" / "settings").unlink()
    # credentials: W&B's environment variable, or `wandb login`'s netrc entry, read locally
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    assert wandb_credentials() == "WANDB_API_KEY" and wandb_preflight(_cfg()) == {"mode": "online"}
    monkeypatch.setenv("WANDB_API_KEY", "short")
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        wandb_preflight(_cfg())
    monkeypatch.delenv("WANDB_API_KEY")
    (wandb_env / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {API_KEY}\n")
    (wandb_env / ".netrc").chmod(0o600)
    assert wandb_credentials() == "netrc" and wandb_preflight(_cfg())["mode"] == "online"


def test_wandb_disabled_writes_nothing(wandb_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    sink = MetricsSink(run, True, False, "off", 2, 0, wandb={"mode": "offline"})  # the environment still wins
    sink.log(1, {"loss": 1.0})
    sink.close()
    assert sink.wb is None and sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert not list(tmp_path.rglob("*.wandb"))


def test_online_run_without_credentials_is_refused_in_one_line_before_anything_starts(tmp_path):
    pytest.importorskip("wandb")
    run, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    t0 = time.monotonic()
    proc = subprocess.run(megadigpt_cmd() + ["pretrain", "--data", "demo", "--run-dir", str(run)] + TINY +
                          ["train.max_steps=2", "train.wandb=true"], capture_output=True, text=True, timeout=300,
                          env=clean_env(home), cwd=str(tmp_path))
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megadigpt: error: train.wandb=true logs to W&B online, and no "
                                                   "W&B credentials were found"), proc.stderr
    # refused in the cheap phase: no lock, no config.yaml, no engine, no metrics, no W&B files
    assert not run.exists() or not any(run.iterdir()), sorted(run.iterdir())
    assert not (tmp_path / "wandb").exists()
    assert elapsed < 60, elapsed  # (interpreter and imports only; a tiny run takes longer)


# ----------------------------------------------------------------------------------------- a real run, read back


def test_a_run_shows_the_same_names_in_tensorboard_and_wandb_with_its_config(cifar_small, tmp_path):
    """A tiny pretraining with the k-NN monitor, TensorBoard on and W&B offline through W&B's own environment
    (WANDB_MODE, WANDB_DIR, WANDB_PROJECT), group, tags and name from the config; a warm-up longer than the run."""
    pytest.importorskip("wandb")
    run, home, wdir = tmp_path / "run", tmp_path / "home", tmp_path / "wandb_dir"
    home.mkdir()
    wdir.mkdir()
    env = clean_env(home, WANDB_MODE="offline", WANDB_DIR=str(wdir), WANDB_PROJECT="from-env")
    proc = subprocess.run(
        megadigpt_cmd() + ["pretrain", "--data", str(cifar_small / "train.jsonl"), "--run-dir", str(run)] + TINY +
        ["train.max_steps=4", "train.global_batch=16", "train.micro_batch=16", "train.zero_stage=1",
         "train.probe_every=2", f"train.probe_train={cifar_small / 'train.jsonl'}",
         f"train.probe_val={cifar_small / 'val.jsonl'}", "train.tensorboard=true", "optim.warmup_steps=10",
         "train.wandb=true", "train.wandb_group=grp", "train.wandb_tags=[tiny, test]", "train.wandb_name=my-run"],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in recs if "event" not in r for k, v in r.items()
              if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"gen_loss", "loss", "lr", "knn_top1", "mfu_student"} <= logged

    # TensorBoard: every number under train/ or val/, the leaf its metrics.jsonl key
    tb = tensorboard_run(run / "tensorboard")
    tb_tags = set(tb.Tags()["scalars"])
    assert tb_tags == {metric_tag(k) for k in logged}
    assert {"train/loss", "train/lr", "train/gen_loss", "val/knn_top1", "val/knn_top5"} <= tb_tags
    assert [e.step for e in tb.Scalars("val/knn_top1")] == [2, 4]
    # ... and the resolved config in HParams, with the loss and the validation number as its metrics
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = tb.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in content.items()}
    start = next(d.session_start_info for d in data.values() if d.HasField("session_start_info"))
    assert start.hparams["model.arch"].string_value == "vit_tiny"
    assert start.hparams["model.embed_dim"].number_value == 64
    assert start.hparams["train.max_steps"].number_value == 4
    exp = next(d.experiment for d in data.values() if d.HasField("experiment"))
    assert {m.name.tag for m in exp.metric_infos} == {"train/loss", "val/knn_top1"}

    # W&B: under WANDB_DIR (nothing under the run directory), the run id kept in the run directory
    run_id = (run / "wandb_id.txt").read_text().strip()
    offline = list((wdir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and not (run / "wandb").exists()
    records = list(wandb_records(offline[0] / f"run-{run_id}.wandb"))
    info = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (info.project, info.run_group, list(info.tags), info.display_name) == ("from-env", "grp",
                                                                                  ["tiny", "test"], "my-run")
    config = {u.key: json.loads(u.value_json) for u in info.config.update}
    assert config["model"]["embed_dim"] == 64 and config["train"]["wandb_group"] == "grp"
    assert config["train"]["max_steps"] == 4 and config["optim"]["warmup_steps"] == 10
    wb_tags = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
               for i in r.history.item}
    wb_tags = {k for k in wb_tags if not k.startswith("_")}  # (W&B's own: _step, _runtime, _timestamp)
    assert wb_tags == tb_tags  # one set of names
    console = (offline[0] / "files" / "output.log").read_text()
    assert "step 4/4" in console  # console capture on

    # the warm-up longer than the run: said once, recorded in the start event
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("megadigpt: warning: the warm-up")]
    assert len(warnings) == 1 and "(10 steps) is longer than the run (4 steps)" in warnings[0]
    start_event = next(r for r in recs if r.get("event") == "start")
    assert start_event["warmup_clamped_from"] == 10
    assert start_event["wandb"] == {"mode": "offline", "group": "grp", "name": "my-run"}

    # without a terminal: one line per log step, MFU as a percentage; the closing line
    lines = [ln for ln in proc.stdout.splitlines() if " step " in ln and " eta " in ln]
    assert len(lines) == 4 + 2  # 4 steps, 2 k-NN monitors
    assert all(re.search(r" mfu_student=[0-9.e+-]+%", ln) for ln in lines if "gen_loss=" in ln), lines
    summary = proc.stdout.strip().splitlines()[-1]
    knn = [r["knn_top1"] for r in recs if "knn_top1" in r]
    assert re.fullmatch(rf"megadigpt: pretraining done: step 4/4, final loss [0-9.]+, best knn_top1 "
                        rf"{show('knn_top1', max(knn))} \(step [24]\), MFU [0-9.e+-]+%, time \d+:\d\d:\d\d; "
                        rf"outputs in {re.escape(str(run))} \(checkpoints/, metrics.jsonl, tensorboard/\)", summary), \
        summary


# ----------------------------------------------------------------------------------------- the terminal


def run_in_terminal(args, env, timeout: float = 600, cols: int = 220):
    """The command with stdin, stdout and stderr on a pseudo-terminal of ``cols`` columns -> (exit status, what
    the terminal received)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, cols, 0, 0))
    proc = subprocess.Popen(megadigpt_cmd() + list(args), stdin=slave, stdout=slave, stderr=slave, env=env,
                            cwd=str(REPO), close_fds=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            out += chunk
        else:
            proc.kill()
            raise AssertionError(f"no end within {timeout} s:\n{out.decode(errors='replace')[-3000:]}")
        return proc.wait(timeout=60), out.decode(errors="replace")
    finally:
        os.close(master)


def test_progress_bar_shows_loss_lr_and_validation_and_the_run_ends_with_a_summary_line(cifar_small, tmp_path):
    """A tiny fine-tune in a real pseudo-terminal, ``train.progress=auto``: the bar is drawn, with loss, lr and the
    latest validation top-1; the run ends with its one-line summary."""
    run = tmp_path / "ft"
    status, screen = run_in_terminal(
        ["finetune", "--config", "cifar10_finetune", "--train", str(cifar_small / "train.jsonl"), "--val",
         str(cifar_small / "val.jsonl"), "--run-dir", str(run), "model.arch=vit_tiny", "model.embed_dim=64",
         "model.depth=2", "model.num_heads=2", "model.patch_size=4", "data.num_workers=0", "data.loader=torch",
         "train.global_batch=16", "train.micro_batch=16", "train.max_steps=3", "train.log_every=1",
         "train.progress=auto", "train.tensorboard=false"], clean_env())
    assert status == 0, screen[-4000:]
    pieces = [p for p in re.split(r"[\r\n]+", screen) if "|" in p and "step" in p]
    bars = [p for p in pieces if re.search(r"\d+/3 \[", p)]
    assert bars, screen[-3000:]
    assert any(re.search(r"loss=[0-9.]+, lr=[0-9.e-]+", b) for b in bars), bars
    final = [b for b in bars if "3/3" in b][-1]
    assert re.search(r"loss=[0-9.]+, lr=[0-9.e-]+, val_top1=[0-9.]+, img/s=", final), final
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step 1/3", screen)  # the bar, not log lines
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    top1 = next(r["val_top1"] for r in recs if "val_top1" in r)
    summary = [ln for ln in screen.splitlines() if "fine-tuning done:" in ln]
    best = re.escape(show("val_top1", top1))
    assert len(summary) == 1 and re.search(
        rf"megadigpt: fine-tuning done: step 3/3, final train_loss [0-9.]+, best val_top1 {best} "
        rf"\(step 3\), time \d+:\d\d:\d\d; outputs in {re.escape(str(run))} \(best/, last/, checkpoints/, "
        rf"metrics.jsonl\)", summary[0]), summary

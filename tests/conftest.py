"""Shared test helpers. Tests use real components at tiny sizes: real DeepSpeed engines on gloo, real JPEGs,
real checkpoints on disk. Tests that read ../shared skip where it is absent, except under CI (CI=true or
MEGADIGPT_REQUIRE_SHARED=1), where its absence is an error."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import io

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEGADIGPT_SHARED", REPO.parent / "shared"))
CIFAR = SHARED / "data" / "cifar10"


def require_shared() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("MEGADIGPT_REQUIRE_SHARED") == "1"


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (CIFAR / "train-000000.tar").is_file():
        if require_shared():
            pytest.fail(f"shared CIFAR-10 shards missing at {CIFAR} (required under CI)")
        pytest.skip(f"shared CIFAR-10 shards not present at {CIFAR}")
    return CIFAR


@pytest.fixture(scope="session")
def cifar_small(cifar_dir, tmp_path_factory):
    """128 training and 64 evaluation CIFAR-10 images as sample lists, and the evaluation images as class folders."""
    from megadigpt.data import find_samples
    from megadigpt.data.sources import write_sample_list

    root = tmp_path_factory.mktemp("cifar_small")
    names = (cifar_dir / "classes.txt").read_text().split()
    train = find_samples(str(cifar_dir / "train-000000.tar"))[:128]
    val = find_samples(str(cifar_dir / "test-000000.tar"))[:64]
    write_sample_list(root / "train.jsonl", train)
    write_sample_list(root / "val.jsonl", val)
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    for s in val:
        d = root / "val_folders" / names[s.label]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{s.key}.jpg").write_bytes(s.read())
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1",
               MASTER_PORT=str(free_port()))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def megadigpt_cmd(nproc: int = 1):
    if nproc == 1:
        return [sys.executable, "-m", "megadigpt"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "megadigpt"]


def run_cli(args, nproc: int = 1, timeout: int = 600, check: bool = True, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(megadigpt_cmd(nproc) + list(args), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**env), cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"megadigpt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(run_dir) -> dict:
    """{step: (gen, dis)} from a run's metrics.jsonl, the last record of each step."""
    from megadigpt.train.metrics import read_metrics

    return {s: (r["gen_loss"], r["dis_loss"]) for s, r in read_metrics(Path(run_dir) / "metrics.jsonl").items()}


# A tiny student and a cheap target: every shape still derived from the config.
TINY = [
    "model.arch=vit_tiny", "model.embed_dim=64", "model.depth=4", "model.num_heads=2", "model.img_size=32",
    "model.patch_size=4", "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
    "target.kind=pixels", "target.patch_size=4", "data.num_workers=0", "optim.lr=1e-3", "optim.warmup_steps=2",
    "train.log_every=1", "train.tensorboard=false", "train.progress=off",
]


def make_jpeg(rng, size=(40, 30), mode="RGB", fmt="JPEG"):
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """Good images and every kind of broken one, with the validity expected of each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    good = make_jpeg(rng)
    files = {
        "cat/good.jpg": (good, True),
        "cat/gray.jpg": (make_jpeg(rng, mode="L"), True),
        "cat/cmyk.jpg": (make_jpeg(rng, mode="CMYK"), True),
        "dog/png_named.jpg": (make_jpeg(rng, fmt="PNG"), True),
        "dog/truncated.jpg": (good[: len(good) // 2], False),
        "dog/garbage.jpg": (b"not an image at all" * 10, False),
        "dog/empty.jpg": (b"", False),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return root, {n: ok for n, (_, ok) in files.items()}

"""A small real segmentation set with exact masks: Fashion-MNIST items pasted onto CIFAR-10 photos, written in
ADE20K's folder layout (``images/{training,validation}/*.jpg``, ``annotations/{training,validation}/*.png``).

Classes: 0 background, 1..10 the Fashion-MNIST classes (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal,
Shirt, Sneaker, Bag, Ankle boot); train with ``data.reduce_zero_label=false model.num_classes=11``. Each image: a
CIFAR-10 photo resized (bicubic) to ``size`` x ``size``, then 1-3 items, each scaled to 35-75 % of the side, tinted
with a random colour (the item's grey level times the colour) and pasted at a random place; an item's pixels are
those above ``threshold`` of its 28 x 28 grey image (Fashion-MNIST's background is exactly black), so the mask is
exact: every pixel is the item's colour times its grey level or the photo, and its label says which. Later items
cover earlier ones. Images are JPEG (quality 95), masks 8-bit PNG.

Sources: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
the original idx files), CIFAR-10 from webdataset shards (``<key>.jpg``). Training images use Fashion-MNIST's
training split and the CIFAR-10 training shards, validation images the test splits: no item or photo is in both.
Deterministic: everything is drawn from ``np.random.default_rng([seed, split, i])``.

    python -m megadigpt.data.composite_seg --out DIR --cifar ../shared/data/cifar10 --train 2000 --val 300
"""

import argparse
import gzip
import io
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..config import ConfigError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("background", "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip or plain): magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dims, data."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path}: not a uint8 idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path}: {data.size} values, the header says {dims}")
    return data.reshape(dims)


def fashion_mnist(split: str, root: Path = FASHION_DIR):
    prefix = "train" if split == "training" else "t10k"
    found = [root / f"{prefix}-{k}-idx{n}-ubyte{ext}" for k, n in (("images", 3), ("labels", 1))
             for ext in (".gz", "")]
    imgs = next((p for p in found[:2] if p.is_file()), None)
    labels = next((p for p in found[2:] if p.is_file()), None)
    if imgs is None or labels is None:
        raise ConfigError(f"Fashion-MNIST not found in {root} (apt-get install dataset-fashion-mnist)")
    return read_idx(imgs), read_idx(labels)


def cifar_photos(cifar: Path, split: str, limit: int):
    """Up to ``limit`` CIFAR-10 JPEG payloads of the split's shards."""
    from .sources import find_samples

    pattern = "train-*.tar" if split == "training" else "test-*.tar"
    shards = sorted(str(p) for p in Path(cifar).glob(pattern))
    if not shards:
        raise ConfigError(f"no CIFAR-10 shards {pattern} in {cifar}")
    out = []
    for shard in shards:  # shard by shard: only as many as the set needs are listed
        for s in find_samples(shard):
            out.append(s.read())
            if len(out) >= limit:
                return out
    return out


def compose(rng, photo: bytes, items: np.ndarray, labels: np.ndarray, size: int, threshold: int):
    bg = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB").resize((size, size), Image.BICUBIC)).copy()
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(0, len(items)))
        side = int(round(size * rng.uniform(0.35, 0.75)))
        item = np.asarray(Image.fromarray(items[k]).resize((side, side), Image.BILINEAR))
        y, x = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        colour = rng.uniform(0.35, 1.0, 3)
        on = item > threshold
        region = bg[y:y + side, x:x + side]
        tinted = np.clip(item[..., None].astype(np.float32) * colour, 0, 255).astype(np.uint8)
        region[on] = tinted[on]
        mask[y:y + side, x:x + side][on] = int(labels[k]) + 1
    return bg, mask


def build(out, cifar, n_train: int, n_val: int, size: int = 64, seed: int = 0, threshold: int = 40,
          fashion_root: Optional[Path] = None) -> Path:
    out = Path(out)
    for split, n in (("training", n_train), ("validation", n_val)):
        items, labels = fashion_mnist(split, fashion_root or FASHION_DIR)
        photos = cifar_photos(Path(cifar), split, n)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, 0 if split == "training" else 1, i])
            img, mask = compose(rng, photos[i % len(photos)], items, labels, size, threshold)
            Image.fromarray(img).save(out / "images" / split / f"{i:06d}.jpg", quality=95)
            Image.fromarray(mask).save(out / "annotations" / split / f"{i:06d}.png")
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cifar", required=True, help="folder with CIFAR-10 webdataset shards (train-*.tar, test-*.tar)")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    build(a.out, a.cifar, a.train, a.val, a.size, a.seed)
    print(f"wrote {a.train} + {a.val} composites to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from megadigpt.config import ConfigError
from megadigpt.data import PretrainStream, find_samples
from megadigpt.data.loaders import build_pretrain_loader
from megadigpt.data.pretrain_loader import StepBatchSampler, random_resized_crop_box
from megadigpt.data.sources import DEMO_PHOTOS, scan_source

from .conftest import make_jpeg as _jpeg


def test_bad_images_are_masked_not_fatal(image_folder):
    root, expect = image_folder
    samples = find_samples(str(root))
    assert {s.key for s in samples} == set(expect)
    assert {s.label for s in samples if s.key.startswith("cat/")} == {0}
    assert {s.label for s in samples if s.key.startswith("dog/")} == {1}
    stream = PretrainStream(samples, [16, 32], 4, seed=0)
    seen = {}
    for pos in range(len(samples)):
        item = stream[pos]
        key = samples[item["index"]].key
        seen[key] = item["valid"]
        assert [v.shape for v in item["views"]] == [(3, 16, 16), (3, 32, 32)]
        assert sorted(item["order"].tolist()) == [0, 1, 2, 3]
    assert seen == expect


def test_stream_is_deterministic_and_epochs_differ():
    samples = find_samples("demo")
    a, b = PretrainStream(samples, [32], 4, seed=3), PretrainStream(samples, [32], 4, seed=3)
    for pos in (0, 5, len(samples) + 5):
        x, y = a[pos], b[pos]
        assert torch.equal(x["views"][0], y["views"][0]) and torch.equal(x["order"], y["order"])
    n = len(samples)
    assert [a.locate(p)[1] for p in range(n)] != [a.locate(p)[1] for p in range(n, 2 * n)]
    assert sorted(a.locate(p)[1] for p in range(n, 2 * n)) == list(range(n))  # each epoch a permutation


def test_student_and_teacher_views_share_the_crop():
    stream = PretrainStream(find_samples("demo"), [32, 64], 4, seed=0)
    item = stream[0]
    small, big = item["views"]
    down = torch.nn.functional.interpolate(big[None].float(), size=(32, 32), mode="area")[0]
    assert (down - small.float()).abs().mean() < 8  # same box and flip; only the resampling differs


def test_sharding_complete_disjoint_and_resumable():
    G, m = 16, 4
    one = list(StepBatchSampler(G, m, 0, 1, 0, 5))  # 1 rank, accumulation 4
    two = [list(StepBatchSampler(G, m, r, 2, 0, 5)) for r in range(2)]  # 2 ranks, accumulation 2
    for step in range(5):
        flat1 = sorted(p for b in one[step * 4:(step + 1) * 4] for p in b)
        flat2 = [p for r in range(2) for b in two[r][step * 2:(step + 1) * 2] for p in b]
        assert sorted(flat2) == flat1 == list(range(step * G, (step + 1) * G))
        assert len(set(flat2)) == len(flat2)
    resumed = list(StepBatchSampler(G, m, 1, 2, 3, 5))
    assert resumed == two[1][3 * 2:]


def test_crop_box_matches_torchvision_rules():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = int(rng.integers(10, 400)), int(rng.integers(10, 400))
        top, left, ch, cw = random_resized_crop_box(rng, h, w, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


def test_webdataset_shards(cifar_dir):
    samples = find_samples(str(cifar_dir / "train-000000.tar"))
    assert len(samples) == 5000
    assert {s.label for s in samples} == set(range(10))
    stream = PretrainStream(samples, [32], 4, seed=0)
    loader = build_pretrain_loader(stream, 8, 4, 0, 1, 0, 2, num_workers=1)
    batches = list(loader)
    assert len(batches) == 4 and batches[0]["views"][0].shape == (4, 3, 32, 32) and bool(batches[0]["valid"].all())


def test_shard_missing_image_component_and_bad_label(tmp_path):
    shard = tmp_path / "s.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(shard, "w") as tf:
        for key, parts in {"a": {"jpg": _jpeg(rng), "cls": b"3"}, "b": {"cls": b"4"},
                           "c": {"jpg": _jpeg(rng), "cls": b"x!"}}.items():
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    samples, problems = scan_source(str(shard))  # both are bad samples now, with reasons (issue 15)
    assert [(s.key, s.label) for s in samples] == [("a", 3)]
    assert [(p.key, p.reason) for p in problems] == [("b", "no image member (members: .cls)"),
                                                     ("c", "unparsable label b'x!' (.cls)")]


def test_demo_photos_ship_in_a_wheel():
    assert len(find_samples("demo")) == len(DEMO_PHOTOS)


def test_missing_sources():
    with pytest.raises(ConfigError, match="not found"):
        find_samples("/no/such/dir")

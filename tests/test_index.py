"""The compact sample index (issue 17): an index of the real CIFAR-10 shards equals a fresh scan, stale indexes are
ignored, damaged or tampered ones refused in one line, ``data index`` through the CLI, pickling by reference, memory
bounded at 1M+ entries (measured in a subprocess), ``data merge`` writing an index, and indexed mode over a real HTTP
server skipping a missing shard."""

import json
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from megadigpt.config import ConfigError
from megadigpt.data import find_samples
from megadigpt.data import remote
from megadigpt.data.index import SampleIndex, open_index, write_synthetic
from megadigpt.data.sources import _scan_shards, check_source, label_names, scan_source
from megadigpt.data.tools import index_shards, merge

from .conftest import REPO, make_jpeg, run_cli
from .http_server import Fault, ShardServer


def _rows(samples):
    return [(s.path, s.offset, s.size, s.key, s.label) for s in samples]


@pytest.fixture(scope="module")
def cifar_index(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar_index") / "idx"
    res = index_shards(str(cifar_dir / "{test-000000,train-000000,train-000001}.tar"), out, workers=2, progress=False)
    return out, res


def test_index_of_the_cifar_shards_equals_a_fresh_scan(cifar_dir, cifar_index):
    out, res = cifar_index
    shards = [str(cifar_dir / n) for n in ("test-000000.tar", "train-000000.tar", "train-000001.tar")]
    scanned = _scan_shards(shards, [])
    idx = find_samples(str(out))  # an index folder is a data source
    assert isinstance(idx, SampleIndex) and idx.folder == str(out)
    assert res["samples"] == len(idx) == len(scanned) == 15000 and res["problems"] == 0
    assert _rows(idx) == _rows(scanned)  # path, offset, size, key, label: every sample
    assert np.array_equal(idx.labels, scanned.labels) and idx.labels.dtype == np.int16
    assert idx[12345].read() == scanned[12345].read()
    with pytest.raises(IndexError):
        idx[15000]
    assert _rows(idx[100:105]) == _rows(scanned)[100:105] and _rows(idx[-3:]) == _rows(scanned)[-3:]
    sub = idx.subset([5, 14999, 5])
    assert _rows(sub) == [_rows(scanned)[j] for j in (5, 14999, 5)]
    assert label_names(str(out)) == (cifar_dir / "classes.txt").read_text().split()  # beside the shards
    check_source(str(out))


def _copy_shards(cifar_dir, dst, names=("train-000000.tar", "train-000001.tar")):
    dst.mkdir()
    for n in names:
        shutil.copy(cifar_dir / n, dst / n)
    return dst


def test_a_fresh_index_beside_shards_is_used_and_a_stale_one_ignored(cifar_dir, tmp_path):
    shards = _copy_shards(cifar_dir, tmp_path / "shards")
    p = run_cli(["data", "index", str(shards), "--out", str(shards / "index"), "--workers", "2"])
    assert json.loads(p.stdout.splitlines()[-1])["samples"] == 10000
    scanned = _scan_shards(sorted(str(s) for s in shards.glob("*.tar")), [])
    idx = find_samples(str(shards))
    assert idx.folder == str(shards / "index") and _rows(idx) == _rows(scanned)  # used automatically
    one = find_samples(str(shards / "train-000001.tar"))  # one shard of an indexed folder: a view of the index
    assert one.folder == str(shards / "index") and _rows(one) == _rows(scanned)[5000:]
    # moved together with its shards (paths are relative), the index still works
    seventh = scanned[7].read()
    shutil.move(str(shards), str(tmp_path / "moved"))
    moved = find_samples(str(tmp_path / "moved"))
    assert moved.folder == str(tmp_path / "moved" / "index") and len(moved) == 10000
    assert moved[7].read() == seventh
    shards = tmp_path / "moved"
    os.utime(shards / "train-000000.tar")  # touched: the index is stale, the shards are scanned
    again = find_samples(str(shards))
    assert again.folder is None and [s.key for s in again] == [s.key for s in moved]
    with pytest.raises(ConfigError, match="stale"):
        find_samples(str(shards / "index"))  # given directly, a stale index is an error
    data = (shards / "train-000001.tar").read_bytes()  # rewritten (cut short): scanned, with the usual problems
    (shards / "train-000001.tar").write_bytes(data[: len(data) // 2])
    got, problems = scan_source(str(shards))
    assert got.folder is None and 5000 < len(got) < 10000 and any(not q.key for q in problems)


def _damage(src, dst, how):
    shutil.copytree(src, dst)
    if how == "json":
        (dst / "index.json").write_text("{not json")
    elif how == "version":
        meta = json.loads((dst / "index.json").read_text())
        (dst / "index.json").write_text(json.dumps({**meta, "version": 99}))
    elif how == "dtype":
        np.save(dst / "label.npy", np.load(dst / "label.npy").astype(np.float32))
    elif how == "length":
        np.save(dst / "size.npy", np.load(dst / "size.npy")[:-1])
    elif how == "pickle":
        np.save(dst / "offset.npy", np.array([object()] * 3, dtype=object), allow_pickle=True)
    elif how == "garbage":
        (dst / "key_off.npy").write_bytes(b"\x93NUMPY garbage")
    elif how == "missing":
        (dst / "key_blob.npy").unlink()
    elif how == "partition":
        first = np.load(dst / "shard_first.npy")
        first[1] = first[-1] + 5
        np.save(dst / "shard_first.npy", first)


@pytest.mark.parametrize("how", ["json", "version", "dtype", "length", "pickle", "garbage", "missing", "partition"])
def test_a_damaged_or_tampered_index_is_refused_in_one_line(tmp_path, how):
    src = write_synthetic(tmp_path / "good", 3000, shard_size=1000)
    assert len(find_samples(str(src))) == 3000
    _damage(src, tmp_path / "bad", how)
    with pytest.raises(ConfigError) as e:
        find_samples(str(tmp_path / "bad"))
    assert "\n" not in str(e.value) and "bad" in str(e.value)


def _read_in_worker(idx, positions):
    return [(s.path, s.offset, s.size, s.key, s.label) for s in (idx[i] for i in positions)]


def test_a_1m_index_pickles_by_reference_and_a_worker_reads_it(tmp_path):
    idx = open_index(write_synthetic(tmp_path / "big", 1_000_000))
    assert len(idx) == 1_000_000
    assert len(pickle.dumps(idx)) < 10_000
    view = idx[250_000:750_000]
    assert len(pickle.dumps(view)) < 10_000 and len(view) == 500_000
    positions = [0, 123_456, 999_999]
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh interpreter reopens the files
        got = pool.apply(_read_in_worker, (idx, positions))
    assert got == _rows(idx[i] for i in positions)
    assert pool is not None and got[1][3] == "000123456"


MEM_CHILD = r"""
import json, sys
import numpy as np, psutil
from megadigpt.data.index import open_index
p = psutil.Process()
r = np.random.default_rng(0).integers(0, 2_000_000, int(sys.argv[2]))
base = p.memory_info().rss
idx = open_index(sys.argv[1])
opened = p.memory_info().rss
peak = 0
for j, i in enumerate(r):
    idx[int(i)]
    if j % 4096 == 0:
        peak = max(peak, p.memory_info().rss)
after = p.memory_info().rss
lab = int(np.asarray(idx.labels).max())  # a vectorised read of a whole column maps it ...
mapped = p.memory_info().rss
idx.release()  # ... and release() drops it again
print(json.dumps({"open": (opened - base) / 2**20, "peak": (peak - base) / 2**20, "after": (after - base) / 2**20,
                  "mapped": (mapped - base) / 2**20, "released": (p.memory_info().rss - base) / 2**20,
                  "col": idx._store.cols["label"].nbytes / 2**20, "lab": lab}))
"""


def test_resident_memory_stays_bounded_at_2m_entries(tmp_path):
    folder = write_synthetic(tmp_path / "mem", 2_000_000)
    p = subprocess.run([sys.executable, "-c", MEM_CHILD, str(folder), "200000"], capture_output=True, text=True,
                       cwd=str(REPO), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads(p.stdout.splitlines()[-1])
    # the design: lookups read with pread, so the index's columns never become resident; the bound is the shard
    # table plus allocator noise, whatever the lookups (the columns here are ~45 MiB)
    assert m["open"] < 8 and m["peak"] < 8 and m["after"] < 8, m
    assert m["mapped"] > m["released"] + m["col"] / 2, m  # the measurement sees mapped pages (it can fail)
    assert m["released"] < 8 and 0 <= m["lab"] < 1000, m


def _shard(path, items):
    with tarfile.open(path, "w") as tf:
        for key, data in items:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tf.addfile(info, __import__("io").BytesIO(data))


def test_merge_writes_an_index_with_weights_and_eval_dedup(tmp_path):
    rng = np.random.default_rng(0)
    a = [(f"a{i}", make_jpeg(rng)) for i in range(60)]
    b = [(f"b{i}", make_jpeg(rng)) for i in range(20)]
    evals = [(f"e{i}", a[i][1]) for i in range(5)] + [("e_new", make_jpeg(rng))]  # 5 of A leak into eval
    for name, items in (("a", a), ("b", b), ("eval", evals)):
        _shard(tmp_path / f"{name}.tar", items)
    spec = tmp_path / "merge.yaml"
    spec.write_text(f"""
total: 1000
exclude_duplicates_of: {tmp_path / 'eval.tar'}
sources:
  - {{name: A, source: {tmp_path / 'a.tar'}, weight: 3, expected_count: 60}}
  - {{name: B, source: {tmp_path / 'b.tar'}, weight: 1}}
""")
    m = merge(spec, tmp_path / "merged", progress=False)
    idx = find_samples(str(tmp_path / "merged"))
    assert idx.folder == str(tmp_path / "merged") and len(idx) == 1000 == m["total"]
    srcs = [idx.source_of(i) for i in range(len(idx))]
    assert srcs.count("A") == 750 and srcs.count("B") == 250
    keys = [s.key for s in idx]
    assert not {f"a{i}" for i in range(5)} & set(keys) and m["sources"][0]["dropped_eval_duplicates"] == 5
    assert set(k for k, s in zip(keys, srcs) if s == "A") == {f"a{i}" for i in range(5, 60)}  # every kept one
    assert idx[0].read() == dict(a)[keys[0]]  # the bytes of the source shard
    assert json.loads((tmp_path / "merged" / "manifest.json").read_text())["sources"][1]["drawn"] == 250
    # a merged index is a merge source too (no per-sample objects on the way), and .jsonl output still works
    spec2 = tmp_path / "again.yaml"
    spec2.write_text(f"sources:\n  - {{name: M, source: {tmp_path / 'merged'}, expected_count: 1000}}\ntotal: 1500\n")
    m2 = merge(spec2, tmp_path / "again.jsonl", progress=False)
    assert m2["total"] == len(find_samples(str(tmp_path / "again.jsonl"))) == 1500


@pytest.fixture
def quick_remote(tmp_path):
    old = remote.options()
    remote.configure(cache_dir=str(tmp_path / "cache"), timeout_s=5.0, retries=1)
    yield
    remote.configure(**old)


def test_indexed_mode_over_http_skips_a_missing_shard(cifar_dir, quick_remote):
    with ShardServer(cifar_dir) as srv:
        srv.faults["train-000001.tar"] = Fault(status=404)
        url = srv.url("train-{000000..000002}.tar")
        assert check_source(url) == "tar"  # the early check passes on a partly readable source
        samples, problems = scan_source(url)
        assert len(samples) == 10000
        assert [(p.path, p.key) for p in problems] == [(srv.url("train-000001.tar"), "")]
        assert "not found" in problems[0].reason.lower()
        assert label_names(url) == (cifar_dir / "classes.txt").read_text().split()  # classes.txt beside them
        for n in ("train-000000.tar", "train-000002.tar"):
            srv.faults[n] = Fault(status=404)
        with pytest.raises(ConfigError) as e:
            scan_source(srv.url("train-{000003..000004}-missing.tar"))
        assert "\n" not in str(e.value) and "no shard" in str(e.value)
    with ShardServer(cifar_dir / "..") as srv:  # no classes.txt there: no names, after one quick try
        assert label_names(srv.url("cifar10-nope/train-000000.tar")) is None


def test_data_index_cli_refuses_bad_arguments_in_one_line(tmp_path, image_folder, capsys):
    from megadigpt.cli import main

    root, _ = image_folder  # the CLI's success path runs in a subprocess above (data index <shards>)
    assert main(["data", "index", str(root), "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "tar shards" in err and not (tmp_path / "i").exists()
    (tmp_path / "f").write_text("x")
    assert main(["data", "index", str(root), "--out", str(tmp_path / "f")]) == 2
    assert "existing file" in capsys.readouterr().err
    assert main(["data", "index", str(tmp_path / "nope-{000..003}.tar"), "--out", str(tmp_path / "j")]) == 2
    assert "not found" in capsys.readouterr().err


def test_check_labels_reads_the_label_column(tmp_path):
    from megadigpt.data.index import ColumnBuilder
    from megadigpt.train.finetune import check_labels

    idx = open_index(write_synthetic(tmp_path / "l", 5000, shard_size=1000, classes=7))
    top = int(np.asarray(idx.labels).max())
    assert check_labels(idx, "data.train") == top + 1 and check_labels(idx[:10], "data.val", 100) == 100
    with pytest.raises(ConfigError, match=f"label {top} does not fit model.num_classes={top}"):
        check_labels(idx, "data.train", top)
    b = ColumnBuilder()
    b.add_plain(["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"], ["a", "b", "c"], [0, -1, 2])
    with pytest.raises(ConfigError, match="data.val: 1 of 3 images have no label"):
        check_labels(b.build(), "data.val")

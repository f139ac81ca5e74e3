"""`megadigpt data ...`: validate finds every planted bad sample, build writes shards whose manifest and DALI
indexes are right and restarts, merge draws sources by weight and drops evaluation duplicates, IN-21K labels."""

import io
import json
import tarfile

import numpy as np
import pytest

from megadigpt.config import ConfigError
from megadigpt.data import find_samples
from megadigpt.data.tools import build, in21k_labels, merge, validate

from .conftest import make_jpeg, run_cli


def test_validate_finds_every_planted_bad_sample(image_folder, tmp_path):
    root, expect = image_folder
    res = validate(str(root), tmp_path / "v", workers=2, progress=False)
    assert res == {"total": len(expect), "clean": sum(expect.values()), "bad": len(expect) - sum(expect.values()),
                   "damaged_shards": 0}
    bad = {json.loads(l)["key"] for l in (tmp_path / "v" / "bad.jsonl").read_text().splitlines()}
    assert bad == {k for k, ok in expect.items() if not ok}
    clean = find_samples(str(tmp_path / "v" / "clean.jsonl"))  # a sample list is a data source
    assert {s.key for s in clean} == {k for k, ok in expect.items() if ok}


def test_validate_cli_writes_clean_shards(image_folder, tmp_path):
    root, expect = image_folder
    p = run_cli(["data", "validate", str(root), "--out", str(tmp_path / "v"), "--shards", str(tmp_path / "clean"),
                 "--workers", "1"])
    assert json.loads(p.stdout.splitlines()[0])["bad"] == 3
    assert len(find_samples(str(tmp_path / "clean"))) == sum(expect.values())


def test_build_shards_manifest_index_and_restart(tmp_path, cifar_dir):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for c in ("a", "b", "c"):
        (src / c).mkdir(parents=True)
        for i in range(7):
            (src / c / f"{i}.jpg").write_bytes(make_jpeg(rng))
    out = tmp_path / "shards"
    m = build(str(src), out, shard_size=5, progress=False)
    assert m["count"] == 21 and m["classes"] == 3 and len(m["shards"]) == 5
    assert sum(s["count"] for s in m["shards"]) == 21
    got = find_samples(str(out))  # read back through the DALI indexes
    assert len(got) == 21 and sorted({s.label for s in got}) == [0, 1, 2]
    orig = find_samples(str(src))
    assert [s.read() for s in got] == [s.read() for s in orig]
    # the index is the wds2idx format DALI reads
    first = (out / "shard-000000.idx").read_text().splitlines()
    assert first[0] == "v1.2 5" and first[1].split()[0] == "jpg"
    # restart: an interrupted build (one shard lost) finishes without rewriting the others
    (out / "shard-000003.tar").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    m2 = build(str(src), out, shard_size=5, progress=False)
    assert m2["shards"] == m["shards"]
    assert all((out / n).stat().st_mtime_ns == t for n, t in mtimes.items())
    with pytest.raises(ConfigError, match="different input or shard size"):
        build(str(src), out, shard_size=4, progress=False)
    # DALI reads the shards with its own webdataset reader and our indexes
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=21, num_threads=1, device_id=None)
    def pipe():
        img, cls = fn.readers.webdataset(paths=sorted(str(p) for p in out.glob("*.tar")),
                                         index_paths=sorted(str(p) for p in out.glob("*.idx")), ext=["jpg", "cls"])
        return fn.decoders.image(img), cls

    p = pipe()
    p.build()
    imgs, _ = p.run()
    assert len(imgs) == 21


def _shard(path, items):
    with tarfile.open(path, "w") as tf:
        for key, data in items:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_merge_weights_completeness_and_eval_dedup(tmp_path):
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
    m = merge(spec, tmp_path / "merged.jsonl", progress=False)
    recs = [json.loads(l) for l in (tmp_path / "merged.jsonl").read_text().splitlines()]
    assert len(recs) == 1000
    frac_a = sum(r["source"] == "A" for r in recs) / len(recs)
    assert abs(frac_a - 0.75) < 0.01
    assert m["sources"][0]["dropped_eval_duplicates"] == 5
    leaked = {f"a{i}" for i in range(5)}
    assert not leaked & {r["key"] for r in recs}
    assert len(find_samples(str(tmp_path / "merged.jsonl"))) == 1000
    spec.write_text(spec.read_text().replace("expected_count: 60", "expected_count: 61"))
    with pytest.raises(ConfigError, match="incomplete: 60 images, expected 61"):
        merge(spec, tmp_path / "m2.jsonl", progress=False)


def test_in21k_labels(tmp_path):
    import timm.data
    from pathlib import Path

    in1k = (Path(timm.data.__file__).parent / "_info" / "imagenet_synsets.txt").read_text().split()
    present = in1k[:10] + ["n99999999", "n00000001"]
    for s in present:
        (tmp_path / s).mkdir()
    (tmp_path / "README").mkdir()
    lab = in21k_labels(tmp_path, "fall11")
    assert lab["synsets"] == sorted(present) and lab["classes"] == 12 and not lab["complete"]
    m = lab["in1k_to_in21k"]
    assert len(m) == 1000 and all(lab["synsets"][m[i]] == in1k[i] for i in range(10)) and set(m[10:]) == {-1}
    with pytest.raises(ConfigError):
        in21k_labels(tmp_path, "spring99")


def test_build_from_a_file_list(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "imgs").mkdir()
    lines = []
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(make_jpeg(rng))
        lines.append(f"imgs/{i}.jpg {i % 2}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    m = build(str(tmp_path / "list.txt"), tmp_path / "out", shard_size=3, progress=False)
    assert m["count"] == 4 and m["classes"] == 2 and len(m["shards"]) == 2
    got = find_samples(str(tmp_path / "out"))
    assert [s.label for s in got] == [0, 1, 0, 1]
    (tmp_path / "bad.txt").write_text("imgs/0.jpg cat\n")
    with pytest.raises(ConfigError, match="bad.txt:1: label 'cat' is not an integer"):
        build(str(tmp_path / "bad.txt"), tmp_path / "out2", progress=False)

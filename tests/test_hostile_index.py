"""Hostile data in indexed mode (issue 28), one test per class, with real crafted tars (headers written with
tarfile's own ``TarInfo.tobuf``, large declared sizes as sparse holes: no test writes more than a few kB):

1. integers that would wrap (a ``.cls`` of 2**32+5, one of 10**30, a 10 GiB member) are kept exact or refused with
   a reason; an index of the old format version is refused in one line, or rescanned beside its shards;
2. training and validation class names are compared by name; duplicate or blank names in ``classes.txt`` refused;
3. a duplicate key in a shard: the first sample kept, each later one a bad sample with its reason;
4. an image member above ``data.max_member_bytes``: a bad sample before anything reads it;
5. shards that are not regular files (FIFO, ``/dev/zero``, a folder), absurd header sizes and non-UTF-8 names:
   damaged shards with reasons, never a traceback or a read that does not end."""

import contextlib
import json
import os
import signal
import tarfile
import time

import numpy as np
import pytest

from megadigpt.config import ConfigError
from megadigpt.data import find_samples
from megadigpt.data.index import VERSION, open_index
from megadigpt.data.sources import Sample, check_class_names, label_names, scan_source
from megadigpt.data.tools import index_shards

from .conftest import make_jpeg

GIB = 1 << 30


@contextlib.contextmanager
def within(seconds):
    """Fails the test (instead of hanging it) when the block runs longer than ``seconds``."""
    def expired(*_):
        raise AssertionError(f"took more than {seconds} s (a read that does not end?)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - t0 < seconds


def write_tar(path, members, fmt=tarfile.PAX_FORMAT):
    """members: (name, bytes) or (name, declared size: int, a sparse hole of that size, none above 1 TiB). Headers from
    ``TarInfo.tobuf`` (PAX records where a value does not fit ustar), the end-of-archive blocks last."""
    with open(path, "wb") as f:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            info.mtime = 0
            f.write(info.tobuf(fmt, "utf-8", "surrogateescape"))
            if isinstance(data, int) and data < 1 << 40:
                f.seek(f.tell() + -(-data // 512) * 512)  # a hole: declared, never written
            elif isinstance(data, int):
                pass  # a lie no file can hold: the next header follows at once
            else:
                f.write(data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)
    return path


def one_line(exc_info):
    text = str(exc_info.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def reasons(problems):
    return {(os.path.basename(p.path), p.key): p.reason for p in problems}


# ------------------------------------------------------------------------------------------------ 1. no wrapping
def test_labels_and_sizes_do_not_wrap_and_an_old_index_is_refused(tmp_path):
    from megadigpt.train.finetune import check_labels

    rng = np.random.default_rng(0)
    jpg = make_jpeg(rng)
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "a.tar", [("big.jpg", 10 * GIB), ("big.cls", b"3"),  # declared 10 GiB: a sparse hole
                            ("wrap.jpg", jpg), ("wrap.cls", b"%d" % (2 ** 32 + 5)),
                            ("huge.jpg", jpg), ("huge.cls", b"%d" % 10 ** 30),
                            ("ok.jpg", jpg), ("ok.cls", b"7")])
    assert os.stat(d / "a.tar").st_blocks * 512 < 1 << 20  # nothing of the 10 GiB is on disk
    with within(30):
        res = index_shards(str(d), d / "index", workers=1, progress=False)
        idx = open_index(d / "index")
    assert res["samples"] == 3 and res["problems"] == 1
    got = {s.key: (s.size, s.label) for s in idx}
    assert got == {"big": (10 * GIB, 3), "wrap": (len(jpg), 2 ** 32 + 5), "ok": (len(jpg), 7)}  # exact, not wrapped
    assert idx.sizes().dtype == np.int64 and int(idx.sizes().max()) == 10 * GIB
    assert idx.labels.dtype == np.int64 and int(idx.labels.max()) == 2 ** 32 + 5
    problems = json.loads((d / "index" / "problems.jsonl").read_text().splitlines()[0])
    assert problems["key"] == "huge" and "does not fit int64" in problems["reason"]
    with pytest.raises(ConfigError) as e:  # trains as class 4294967301, never as class 5
        check_labels(idx[1:], "data.train", 10)
    assert one_line(e) == "data.train: label 4294967301 does not fit model.num_classes=10"
    # an index folder of the old format (int32 labels, uint32 sizes): refused in one line saying what to do ...
    meta = json.loads((d / "index" / "index.json").read_text())
    assert meta["version"] == VERSION == 2
    (d / "index" / "index.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(ConfigError) as e:
        find_samples(str(d / "index"))
    assert "version 1" in one_line(e) and "rebuild it (megadigpt data index" in str(e.value)
    # ... and, found beside its shards, ignored as a stale one is: the shards are scanned
    samples, problems = scan_source(str(d), max_member_bytes=20 * GIB)
    assert samples.folder is None and sorted(s.key for s in samples) == ["big", "ok", "wrap"]


# ------------------------------------------------------------------------------------------------ 2. class maps
def _folders(root, classes, rng):
    for c in classes:
        (root / c).mkdir(parents=True)
        (root / c / "0.jpg").write_bytes(make_jpeg(rng))
    return str(root)


def test_train_and_val_class_names_are_compared_and_bad_classes_txt_refused(tmp_path, capsys):
    rng = np.random.default_rng(1)
    train = _folders(tmp_path / "train", ["cat", "dog"], rng)
    val = _folders(tmp_path / "val", ["dog", "fish"], rng)
    same = _folders(tmp_path / "same", ["cat", "dog"], rng)
    assert check_class_names(train, same) == ["cat", "dog"]
    with pytest.raises(ConfigError) as e:
        check_class_names(train, val)
    assert "only data.train has 'cat'; only data.val has 'fish'" in one_line(e)
    # through the CLI, before any model is built: one line, exit 2 (val's dog is not scored as train's cat)
    from megadigpt.cli import main

    rc = main(["finetune", "--train", train, "--val", val, "--run-dir", str(tmp_path / "run"),
               "model.arch=vit_tiny", "model.img_size=32", "model.patch_size=4", "model.embed_dim=64",
               "model.depth=4", "model.num_heads=2", "train.max_steps=1", "train.global_batch=2",
               "train.micro_batch=2", "data.num_workers=0"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("megadigpt: error: data.train and data.val name "
                                                           "different classes"), err
    # classes.txt beside shards: a repeated name, a blank line, no name at all, a FIFO: one line each
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "s.tar", [("a.jpg", make_jpeg(rng)), ("a.cls", b"0")])
    for text, match in [("cat\ndog\ncat\n", "classes.txt:3: class name 'cat' is already on line 1"),
                        ("cat\n\ndog\n", "classes.txt:2: a blank line"), ("\n\n", "names no class"),
                        (b"\xffcat\n", "not UTF-8")]:
        (d / "classes.txt").write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError) as e:
            label_names(str(d))
        assert match in one_line(e)
    (d / "classes.txt").write_text("cat\ndog\n\n")  # trailing blank lines shift nothing
    assert label_names(str(d)) == ["cat", "dog"]
    (d / "classes.txt").unlink()
    os.mkfifo(d / "classes.txt")
    with within(10), pytest.raises(ConfigError) as e:
        label_names(str(d))
    assert "not a regular file (a FIFO)" in one_line(e)


# ------------------------------------------------------------------------------------------------ 3. duplicate keys
def test_a_duplicate_key_keeps_the_first_sample_and_reports_the_others(tmp_path):
    rng = np.random.default_rng(2)
    first, later = make_jpeg(rng), make_jpeg(rng)
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "dup.tar", [("a.jpg", first), ("a.cls", b"1"), ("b.jpg", make_jpeg(rng)), ("b.cls", b"2"),
                              ("a.jpg", later), ("a.cls", b"5"),  # a later sample with a's key
                              ("c.jpg", make_jpeg(rng)), ("c.jpg", make_jpeg(rng))])  # an extension repeated
    samples, problems = scan_source(str(d / "dup.tar"))
    assert [(s.key, s.label) for s in samples] == [("a", 1), ("b", 2), ("c", -1)]
    assert samples[0].read() == first  # the first one, whole: not a mix of both
    want = {("dup.tar", k): f"duplicate key {k} in the shard (an earlier sample has it)" for k in ("a", "c")}
    assert reasons(problems) == want and len(problems) == 2
    index_shards(str(d), d / "index", workers=1, progress=False)  # the index says the same
    idx, problems = scan_source(str(d))
    assert idx.folder == str(d / "index") and [s.key for s in idx] == ["a", "b", "c"]
    assert reasons(problems) == want


# ------------------------------------------------------------------------------------------------ 4. member size
def test_a_member_above_max_member_bytes_is_a_bad_sample_before_it_is_read(tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "m.tar", [("a.jpg", make_jpeg(rng)), ("bomb.jpg", 3 * GIB), ("z.jpg", make_jpeg(rng))])
    with within(20):
        samples, problems = scan_source(str(d / "m.tar"))  # the default: 256 MiB
        assert [s.key for s in samples] == ["a", "z"]
        assert reasons(problems) == {("m.tar", "bomb"): "member bomb.jpg is 3221225472 bytes, more than "
                                                        "data.max_member_bytes=268435456"}
        index_shards(str(d), d / "index", workers=1, progress=False)  # an index records it; the limit applies on use
        assert [s.size for s in open_index(d / "index")][1] == 3 * GIB
        idx, problems = scan_source(str(d), max_member_bytes=100 << 20)
    assert idx.folder == str(d / "index") and [s.key for s in idx] == ["a", "z"]
    assert reasons(problems) == {("m.tar", "bomb"): "member bomb.jpg is 3221225472 bytes, more than "
                                                    "data.max_member_bytes=104857600"}
    with pytest.raises(ConfigError) as e:  # nothing left: one line, with an example
        scan_source(str(d), max_member_bytes=10)
    assert "holds no images" in one_line(e) and "data.max_member_bytes=10" in str(e.value)


# ------------------------------------------------------------------------------------------------ 5. hostile shards
def test_shards_that_are_not_files_or_claim_absurd_sizes_are_damaged_shards(tmp_path):
    rng = np.random.default_rng(4)
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "good.tar", [("g.jpg", make_jpeg(rng)), ("g.cls", b"0")])
    os.mkfifo(d / "fifo.tar")
    os.symlink("/dev/zero", d / "zero.tar")
    (d / "folder.tar").mkdir()
    write_tar(d / "pax.tar", [("p0.jpg", make_jpeg(rng)), ("p00.jpg", make_jpeg(rng)), ("p1.jpg", 10 ** 29), ("p2.jpg", make_jpeg(rng))])
    write_tar(d / "beyond.tar", [("b0.jpg", make_jpeg(rng)), ("b00.jpg", make_jpeg(rng)), ("b1.jpg", 8 * GIB - 1)], fmt=tarfile.USTAR_FORMAT)
    with open(d / "beyond.tar", "r+b") as f:  # the header claims 8 GiB; the file ends right after it
        f.truncate(f.seek(0, 2) - 1024 - 8 * GIB)
    name = b"\xff\xfeclass.jpg".decode("utf-8", "surrogateescape")
    write_tar(d / "latin.tar", [("ok.jpg", make_jpeg(rng)), (name, make_jpeg(rng))], fmt=tarfile.GNU_FORMAT)
    with within(30):
        samples, problems = scan_source(str(d / "*.tar"))
    r = reasons(problems)
    assert sorted(s.key for s in samples) == ["b0", "b00", "g", "ok", "p0", "p00"]
    assert r[("fifo.tar", "")] == "unreadable shard: not a regular file (a FIFO); it was not read"
    assert r[("zero.tar", "")] == "unreadable shard: not a regular file (a character device); it was not read"
    assert r[("folder.tar", "")] == "unreadable shard: not a regular file (a folder); it was not read"
    assert r[("pax.tar", "")].startswith("member p1.jpg claims 100000000000000000000000000000 bytes, more than the "
                                         "whole shard")
    assert "member b1.jpg claims 8589934591 bytes" in r[("beyond.tar", "")]
    assert r[("latin.tar", "")].startswith("1 member name is not UTF-8 (e.g. b'\\xff\\xfeclass.jpg')")
    # the only source: one line; never read
    for p in ("fifo.tar", "zero.tar"):
        with within(10), pytest.raises(ConfigError) as e:
            find_samples(str(d / p))
        assert "not a regular file" in one_line(e)
    # an index whose shard became /dev/zero: refused in one line; a sample pointing there is a bad sample
    (tmp_path / "one").mkdir()
    os.replace(d / "good.tar", tmp_path / "one" / "good.tar")
    index_shards(str(tmp_path / "one"), tmp_path / "one" / "index", workers=1, progress=False)
    os.replace(tmp_path / "one" / "good.tar", tmp_path / "good.tar")
    os.symlink("/dev/zero", tmp_path / "one" / "good.tar")
    with within(10), pytest.raises(ConfigError) as e:
        find_samples(str(tmp_path / "one" / "index"))
    assert "is not a regular file" in one_line(e)
    with within(10), pytest.raises(OSError, match="character device"):
        Sample("/dev/zero", offset=512, size=-1).read()
    with within(10), pytest.raises(OSError, match="character device"):
        Sample("/dev/zero").read()

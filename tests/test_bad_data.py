"""Bad data, class by class (issue 15): real tars, real JPEG/GIF/TIFF bytes, real DALI on the CPU, a real run.

- images DALI cannot decode (GIF bytes named .jpg, a 1-bit TIFF) or that fail only inside the decoder (a JPEG with
  a broken Huffman table) fall back per sample: DALI gives the torch path's valid mask, no batch falls back whole;
- unparsable / empty / negative labels and samples without an image member are bad samples with reasons;
- a shard truncated at the end yields its readable samples and reports the rest; one cut inside a tar header (or
  with a header overwritten) is reported, not silently short;
- bad_samples.jsonl names each bad sample (shard, key, reason, step, epoch), once, across a resume;
- ``data validate`` finds every class.
"""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from megadigpt.data import PretrainStream
from megadigpt.data.bad_samples import BadSampleLog, read_bad_samples
from megadigpt.data.pretrain_loader import StepBatchSampler, collate
from megadigpt.data.sources import scan_source
from megadigpt.data.tools import validate
from megadigpt.train.metrics import read_metrics

from .conftest import TINY, make_jpeg, run_cli

dali = pytest.importorskip("nvidia.dali")

CPU = torch.device("cpu")


def _img(rng, fmt, mode="RGB"):
    return make_jpeg(rng, mode=mode, fmt=fmt)


def _bad_huffman(rng) -> bytes:
    """A JPEG whose header checks pass (SOI, size, end-of-image marker) but whose Huffman table is garbage: Pillow
    and DALI both fail, inside the decoder."""
    data = bytearray(make_jpeg(rng))
    i = data.find(b"\xff\xc4")
    data[i + 5:i + 25] = b"\xff" * 20
    return bytes(data)


def _half(data: bytes) -> bytes:
    return data[:len(data) // 2]


def _tar(path, samples, idx=False):
    """samples: [(key, {ext: bytes})] -> a webdataset tar (and optionally its DALI index, the wds2idx format)."""
    lines = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, parts in samples:
            line = []
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                line.append(f"{ext} {tf.fileobj.tell() + tarfile.BLOCKSIZE} {len(data)} {key}.{ext}")
                tf.addfile(info, io.BytesIO(data))
            lines.append(" ".join(line))
    if idx:
        path.with_suffix(".idx").write_text(f"v1.2 {len(samples)}\n" + "\n".join(lines) + "\n")
    return path


def _offsets(path):
    with tarfile.open(path) as tf:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tf.getmembers()}


def _mixed_shard(tmp_path, rng, n=20):
    """30% GIFs named .jpg, one 1-bit TIFF named .jpg (DALI refuses it, Pillow decodes it), one JPEG that neither
    decodes; the rest ordinary JPEGs."""
    samples = []
    for i in range(n):
        data = (_img(rng, "GIF") if i % 10 in (0, 3, 6) else _img(rng, "TIFF", "1") if i == 4
                else _bad_huffman(rng) if i == 7 else make_jpeg(rng))
        samples.append((f"{i:04d}", {"jpg": data, "cls": b"%d" % (i % 3)}))
    return _tar(tmp_path / "mixed.tar", samples)


def test_dali_falls_back_per_sample_and_trains_like_torch(tmp_path):
    from megadigpt.data.classification import build_classification_loader
    from megadigpt.data.dali_loader import DaliPretrainLoader

    rng = np.random.default_rng(0)
    samples, problems = scan_source(str(_mixed_shard(tmp_path, rng)))
    assert len(samples) == 20 and not problems
    keys = [s.key for s in samples]
    stream = PretrainStream(samples, [16, 32], 4, seed=0)
    sampler = StepBatchSampler(20, 5, 0, 1, 0, 2)  # two epochs of 4 micro-batches, each with GIFs
    loader = DaliPretrainLoader(stream, sampler, CPU)
    got = list(loader)
    ref = [collate([stream[p] for p in b]) for b in sampler]
    assert len(got) == len(ref) == 8
    assert loader.failed_batches == 0  # no batch fell back whole
    assert {keys[i] for i in loader.pillow_only} == {"0004", "0007"}  # found by decoding alone, once
    diffs = []
    for a, b in zip(got, ref):
        for k in ("index", "epoch", "order", "label", "valid"):
            assert torch.equal(a[k], b[k]), k
        assert [x[:2] for x in a["bad"]] == [x[:2] for x in b["bad"]] == [
            (i, int(e)) for i, e, v in zip(a["index"].tolist(), a["epoch"], a["valid"]) if not v]
        assert all("decode failed" in x[2] for x in a["bad"])
        for va, vb in zip(a["views"], b["views"]):
            diffs.append((va.float() - vb.float()).abs().flatten())
    valid = torch.cat([b["valid"] for b in got])
    assert valid.sum() == 38 and {keys[i] for i in torch.cat([b["index"] for b in got])[~valid].tolist()} == {"0007"}
    assert torch.cat(diffs).mean() < 2  # same crops; random-noise images magnify the filters' difference

    # a shard made only of images DALI refuses: every probed sample is blamed, DALI itself still decodes a good
    # JPEG, so that is bad data (for DALI), not a broken pipeline: it trains on Pillow's decodes
    tiffs = _tar(tmp_path / "tiff.tar", [(f"t{i}", {"jpg": _img(rng, "TIFF", "1")}) for i in range(6)])
    stream = PretrainStream(scan_source(str(tiffs))[0], [16], 4, seed=0)
    loader = DaliPretrainLoader(stream, StepBatchSampler(6, 3, 0, 1, 0, 1), CPU)
    out = list(loader)
    assert loader.failed_batches == 0 and len(loader.pillow_only) == 6 and all(b["valid"].all() for b in out)

    # the fine-tuning / evaluation pipelines: the same mask as their torch path, and no error
    for train in (False, True):
        masks = {}
        for kind in ("torch", "dali"):
            batches = list(build_classification_loader(samples, train, 32, 5, kind=kind, num_workers=1))
            masks[kind] = (torch.cat([b["valid"] for b in batches]), torch.cat([b["index"] for b in batches]))
        assert torch.equal(masks["torch"][0], masks["dali"][0]) and torch.equal(masks["torch"][1], masks["dali"][1])
        assert int((~masks["dali"][0]).sum()) == 1


LABEL_CASES = {  # key -> (members, reason)
    "good": ({"jpg": None, "cls": b"3"}, None),
    "word": ({"jpg": None, "cls": b"dog"}, "unparsable label b'dog' (.cls)"),
    "empty": ({"jpg": None, "cls": b""}, "empty label (.cls)"),
    "negative": ({"jpg": None, "cls": b"-2"}, "negative label -2 (.cls)"),
    "latin1": ({"jpg": None, "cls": "é".encode("latin-1")}, "unparsable label b'\\xe9' (.cls)"),
    "spaced": ({"jpg": None, "cls": b" 7\n"}, None),
    "no_image": ({"cls": b"1", "json": b"{}"}, "no image member (members: .cls, .json)"),
    "json_only": ({"json": b"{}"}, "no image member (members: .json)"),
}


@pytest.mark.parametrize("indexed", [False, True], ids=["tar-scan", "dali-index"])
def test_unparsable_labels_and_missing_members_are_bad_samples(tmp_path, indexed):
    rng = np.random.default_rng(1)
    items = [(k, {e: (make_jpeg(rng) if v is None else v) for e, v in m.items()}) for k, (m, _) in LABEL_CASES.items()]
    shard = _tar(tmp_path / "labels.tar", items, idx=indexed)
    samples, problems = scan_source(str(shard))
    assert [(s.key, s.label) for s in samples] == [("good", 3), ("spaced", 7)]
    assert {p.key: p.reason for p in problems} == {k: r for k, (_, r) in LABEL_CASES.items() if r}
    assert {p.path for p in problems} == {str(shard)}


def _plain_shard(path, rng, n=6):
    return _tar(path, [(f"{i:03d}", {"jpg": make_jpeg(rng), "cls": b"%d" % i}) for i in range(n)])


def test_a_truncated_shard_yields_its_readable_samples_and_reports_the_rest(tmp_path):
    rng = np.random.default_rng(2)
    full = _plain_shard(tmp_path / "full.tar", rng).read_bytes()
    off = _offsets(tmp_path / "full.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[:off["005.jpg"][1] + 100])  # inside the last image's data
    samples, problems = scan_source(str(cut))
    assert [s.key for s in samples] == ["000", "001", "002", "003", "004"]
    assert [s.read() for s in samples] == [s.read() for s in scan_source(str(tmp_path / "full.tar"))[0][:5]]
    assert [(p.key, p.reason.split(":")[0]) for p in problems] == [("", "truncated at byte %d (unexpected end of "
                                                                         "data)" % cut.stat().st_size),
                                                                   ("005", "truncated")]
    # the same shard with its DALI index (the index still lists the lost sample): reported the same way
    _tar(tmp_path / "indexed.tar", [(f"{i:03d}", {"jpg": make_jpeg(np.random.default_rng(9)), "cls": b"1"})
                                    for i in range(6)], idx=True)
    data = (tmp_path / "indexed.tar").read_bytes()
    (tmp_path / "indexed.tar").write_bytes(data[:_offsets(tmp_path / "indexed.tar")["005.jpg"][1] + 10])
    samples, problems = scan_source(str(tmp_path / "indexed.tar"))
    assert len(samples) == 5 and [p.key for p in problems] == ["005"] and "runs past the end" in problems[0].reason
    # cut off after a whole sample, the end-of-archive blocks lost: all samples kept, the shard reported
    (tmp_path / "noend.tar").write_bytes(full[:off["005.cls"][1] + tarfile.BLOCKSIZE])
    samples, problems = scan_source(str(tmp_path / "noend.tar"))
    assert len(samples) == 6 and [p.key for p in problems] == [""] and "end-of-archive" in problems[0].reason


def test_a_shard_cut_inside_a_header_is_reported(tmp_path):
    rng = np.random.default_rng(3)
    full = _plain_shard(tmp_path / "full.tar", rng).read_bytes()
    off = _offsets(tmp_path / "full.tar")
    # tarfile alone stops here silently, as at a normal end
    (tmp_path / "hdr.tar").write_bytes(full[:off["003.jpg"][0] + 200])
    samples, problems = scan_source(str(tmp_path / "hdr.tar"))
    assert [s.key for s in samples] == ["000", "001", "002"]  # 002 has every member the others have: kept
    assert [(p.key, p.reason) for p in problems] == [("", f"cut inside a tar header at byte {off['003.jpg'][0]} "
                                                          f"(200 of 512 bytes)")]
    # cut between a sample's members: that sample may have lost some and is bad
    (tmp_path / "mid.tar").write_bytes(full[:off["003.cls"][0] + 100])
    samples, problems = scan_source(str(tmp_path / "mid.tar"))
    assert [s.key for s in samples] == ["000", "001", "002"]
    assert [p.key for p in problems] == ["", "003"] and "may be incomplete" in problems[1].reason
    # a header overwritten in the middle: the samples before it, and the damage named
    data = bytearray(full)
    data[off["004.jpg"][0]:off["004.jpg"][0] + 100] = b"\x07" * 100
    (tmp_path / "garbled.tar").write_bytes(bytes(data))
    samples, problems = scan_source(str(tmp_path / "garbled.tar"))
    assert [s.key for s in samples] == ["000", "001", "002", "003"]
    assert [p.key for p in problems] == [""] and "invalid tar header" in problems[0].reason
    # shards of `data build` (manifest.json beside them, the DALI index lost): the samples lost after a cut are counted
    from megadigpt.data.tools import build

    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / c / f"{i}.jpg").write_bytes(make_jpeg(rng))
    build(str(tmp_path / "src"), tmp_path / "built", shard_size=6, progress=False)
    shard = tmp_path / "built" / "shard-000000.tar"
    shard.with_suffix(".idx").unlink()
    shard.write_bytes(shard.read_bytes()[:_offsets(shard)["000000004.jpg"][0] + 10])
    samples, problems = scan_source(str(shard))
    assert len(samples) == 4 and [p.reason.split(" at ")[0] for p in problems] == [
        "cut inside a tar header", "2 of 6 samples missing (manifest.json counts 6)"]


def _bad_data_dir(tmp_path, rng, n_good=14):
    """A folder of shards holding one of each bad class; returns (folder, {(shard name, key): reason fragment})."""
    d = tmp_path / "data"
    d.mkdir()
    good = [(f"g{i:02d}", {"jpg": make_jpeg(rng), "cls": b"%d" % (i % 2)}) for i in range(n_good)]
    _tar(d / "a.tar", good[:8] + [("gif", {"jpg": _img(rng, "GIF"), "cls": b"1"}),  # fine: Pillow decodes it
                                  ("trunc", {"jpg": _half(make_jpeg(rng)), "cls": b"0"}),
                                  ("garbage", {"jpg": b"<html>not found</html>" * 4, "cls": b"0"}),
                                  ("dog", {"jpg": make_jpeg(rng), "cls": b"dog"}),
                                  ("noimg", {"cls": b"1"})])
    _tar(tmp_path / "b_full.tar", good[8:] + [("last", {"jpg": make_jpeg(rng), "cls": b"1"})])
    off = _offsets(tmp_path / "b_full.tar")
    (d / "b.tar").write_bytes((tmp_path / "b_full.tar").read_bytes()[:off["last.jpg"][1] + 50])
    _tar(tmp_path / "c_full.tar", [(f"c{i}", {"jpg": make_jpeg(rng), "cls": b"0"}) for i in range(3)])
    off = _offsets(tmp_path / "c_full.tar")
    (d / "c.tar").write_bytes((tmp_path / "c_full.tar").read_bytes()[:off["c2.jpg"][0] + 100])
    expect = {("a.tar", "trunc"): "truncated JPEG", ("a.tar", "garbage"): "not a recognisable image",
              ("a.tar", "dog"): "unparsable label", ("a.tar", "noimg"): "no image member",
              ("b.tar", ""): "truncated at byte", ("b.tar", "last"): "truncated: member",
              ("c.tar", ""): "cut inside a tar header"}
    return d, expect


def test_data_validate_finds_every_class(tmp_path):
    d, expect = _bad_data_dir(tmp_path, np.random.default_rng(4))
    res = validate(str(d), tmp_path / "v", workers=1, progress=False)
    bad = [json.loads(line) for line in (tmp_path / "v" / "bad.jsonl").read_text().splitlines()]
    found = {(r["path"].rsplit("/", 1)[1], r["key"]): r["reason"] for r in bad}
    assert set(found) == set(expect), found
    assert all(expect[k] in found[k] for k in expect), found
    # listed: 14 good, the GIF, trunc, garbage, c0, c1; bad while listing: dog, noimg, last
    assert res == {"total": 14 + 1 + 2 + 2 + 3, "clean": 14 + 1 + 2, "bad": 2 + 3, "damaged_shards": 2}
    clean = {r["key"] for r in map(json.loads, (tmp_path / "v" / "clean.jsonl").read_text().splitlines())}
    assert "gif" in clean and "c1" in clean and not clean & {k for _, k in expect}


def test_bad_samples_jsonl_from_a_real_run_once_across_a_resume(tmp_path):
    """A tiny 1-rank pretraining run on DALI (CPU) over the bad-data shards: every bad sample named once with its
    shard, key and reason; the decode-time ones with the step and epoch they were drawn for."""
    d, expect = _bad_data_dir(tmp_path, np.random.default_rng(5))
    run = tmp_path / "run"
    steps, G = 4, 8
    run_cli(["pretrain", "--data", str(d), "--run-dir", str(run), *TINY, f"train.global_batch={G}",
                 f"train.micro_batch={G}", f"train.max_steps={steps}", "data.loader=dali", "train.ckpt_every=2"])
    recs = read_bad_samples(run)
    index = {(r["path"].rsplit("/", 1)[1], r["key"]): r["reason"] for r in recs if r["kind"] == "index"}
    assert {k for k in expect if expect[k] not in ("truncated JPEG", "not a recognisable image")} == set(index)
    decode = [r for r in recs if r["kind"] == "decode"]
    # which draws of the stream hit the two undecodable images: the run's own (seed, epoch) permutation
    samples = scan_source(str(d))[0]
    stream = PretrainStream(samples, [32], 4, seed=0)
    want = sorted((pos // G + 1, e, samples[i].key) for pos in range(steps * G) for e, i in [stream.locate(pos)]
                  if samples[i].key in ("trunc", "garbage"))
    assert want and sorted((r["step"], r["epoch"], r["key"]) for r in decode) == want
    assert all(r["path"].endswith("a.tar") and r["rank"] == 0 and r["offset"] > 0 for r in decode)
    assert {r["key"]: r["reason"] for r in decode} == {"trunc": "truncated JPEG (no end-of-image marker)",
                                                       "garbage": "not a recognisable image (UnidentifiedImageError)"}
    assert read_metrics(run / "metrics.jsonl")[steps]["bad_samples"] == len(want)
    # a resume from the step-2 checkpoint: records of later steps go (those steps find them again), the index
    # records are rewritten, none doubled
    BadSampleLog(run, samples, 0, 2, scan_source(str(d))[1])
    again = read_bad_samples(run)
    assert sorted((r["step"], r["key"]) for r in again if r["kind"] == "decode") == [
        (s, k) for s, _, k in want if s <= 2]
    assert sorted((r["path"], r["key"]) for r in again if r["kind"] == "index") == sorted(
        (r["path"], r["key"]) for r in recs if r["kind"] == "index")


def _two_rank_flush(rank, port, run_dir, samples, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        log = BadSampleLog(run_dir, samples, rank, 0, [])
        # rank 1 finds two bad samples in step 1, rank 0 one in step 2; a flush with nothing found moves no records
        log.flush()
        log.add({"bad": [(1, 0, "r1 a"), (2, 0, "r1 b")] if rank == 1 else []}, 1)
        log.add({"bad": [(0, 0, "r0")] if rank == 0 else []}, 2)
        log.flush()
        log.flush()
        out.put((rank, "ok"))
    finally:
        dist.destroy_process_group()


def test_bad_samples_of_every_rank_reach_the_one_file_once(tmp_path):
    """Ranks read disjoint samples: each one's records are gathered to rank 0, the only writer."""
    import multiprocessing as mp

    from megadigpt.data.sources import Sample

    from .conftest import free_port

    samples = [Sample("/s.tar", 512 * (i + 1), 10, f"k{i}") for i in range(3)]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_two_rank_flush, args=(r, port, tmp_path, samples, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(q.get(timeout=5) for _ in procs) == [(0, "ok"), (1, "ok")]
    recs = read_bad_samples(tmp_path)
    assert [(r["step"], r["rank"], r["key"], r["reason"]) for r in recs] == [
        (1, 1, "k1", "r1 a"), (1, 1, "k2", "r1 b"), (2, 0, "k0", "r0")]

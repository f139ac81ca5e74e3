"""Stream mode (issue 17): shards read front to back over a real HTTP server on 127.0.0.1 (tests/http_server.py),
the shard split over ranks x workers, resume from a read cursor through an HTTP Range request, faulty shards
skipped and counted, DALI fed by the stream, and pretraining end to end on 2 gloo ranks: killed with SIGKILL
mid-run and resumed, no sample trained on twice and at most shuffle_buffer samples per reader skipped."""

import json
import time
from pathlib import Path

import pytest

from megadigpt.config import ConfigError
from megadigpt.data import find_samples
from megadigpt.data import streaming as st
from megadigpt.data.remote import RemoteError, open_url
from tests.http_server import Fault, ShardServer

from .conftest import TINY, run_cli

SHARD = 64  # samples per small shard
BUFFER = 8


@pytest.fixture(scope="module")
def small_shards(cifar_dir, tmp_path_factory):
    """4 shards of 64 CIFAR-10 images written by ``megadigpt data build`` (with its manifest.json)."""
    from megadigpt.data.sources import write_sample_list

    root = tmp_path_factory.mktemp("stream_shards")
    write_sample_list(root / "list.jsonl", find_samples(str(cifar_dir / "train-000000.tar"))[:4 * SHARD])
    run_cli(["data", "build", str(root / "list.jsonl"), "--out", str(root / "shards"), "--shard-size", str(SHARD),
             "--prefix", "train"])
    return root / "shards"


def _keys(shard_path):
    return [s.key for s in find_samples(str(shard_path))]


def test_shard_split_is_disjoint_complete_deterministic_and_refuses_too_few_shards():
    for n, world, workers in ((10, 2, 2), (7, 1, 3), (64, 4, 4)):
        slots = world * workers
        for epoch in range(3):
            parts = [st.slot_shards(n, 5, epoch, k, slots) for k in range(slots)]
            flat = [s for p in parts for s in p]
            assert sorted(flat) == list(range(n)) and len(set(flat)) == n  # complete and disjoint
            assert parts == [st.slot_shards(n, 5, epoch, k, slots) for k in range(slots)]  # deterministic
            assert min(map(len, parts)) >= n // slots
        assert list(st.shard_order(n, 5, 0)) != list(st.shard_order(n, 5, 1)) or n < 3  # reshuffled per epoch
        assert list(st.shard_order(n, 5, 0)) == list(st.shard_order(n, 5, 0))
    st.check_slots(4, 2, 2)
    with pytest.raises(ConfigError, match=r"3 shards for 2 ranks x 2 workers = 4 readers") as e:
        st.check_slots(3, 2, 2)
    assert "\n" not in str(e.value)


def test_mode_resolution_resume_identity_and_stream_records_in_bad_samples(tmp_path):
    from megadigpt.data.bad_samples import BadSampleLog, read_bad_samples

    assert st.resolve_mode("auto", "http://h/a-{0..3}.tar") == "stream"
    assert st.resolve_mode("auto", ["http://h/a.tar", "pipe:cat b.tar"]) == "stream"
    assert st.resolve_mode("auto", ["http://h/a.tar", str(tmp_path / "b.tar")]) == "indexed"
    assert st.resolve_mode("auto", "demo") == "indexed" and st.resolve_mode("stream", "demo") == "stream"
    ident = st.run_identity(["u0", "u1"], 2, 2, 0, 8)
    st.check_resume_state(ident, dict(ident))
    for key, value in (("workers", 1), ("world", 4), ("seed", 1), ("shuffle_buffer", 9),
                       ("shards_hash", st.shards_hash(["u1", "u0"]))):
        with pytest.raises(ConfigError) as e:
            st.check_resume_state(ident, {**ident, key: value})
        assert "\n" not in str(e.value) and "new train.run_dir" in str(e.value)
    with pytest.raises(ConfigError, match="data.mode=indexed"):
        st.check_resume_state(None, ident)

    batch = {"bad_stream": [("http://h/a.tar", "k7", 0, "truncated JPEG")],
             "shard_problems": [("http://h/b.tar", "cannot read http://h/b.tar: HTTP 404 Not Found", 0)]}
    log = BadSampleLog(tmp_path, [], 0, 0)
    log.add(batch, 3)
    log.flush()
    recs = read_bad_samples(tmp_path)
    assert [(r["kind"], r["path"], r["key"], r["step"]) for r in recs] == [
        ("decode", "http://h/a.tar", "k7", 3), ("shard", "http://h/b.tar", "", 3)]
    BadSampleLog(tmp_path, [], 0, 3)  # a resume at step 3 keeps them (exactly once)...
    assert len(read_bad_samples(tmp_path)) == 2
    BadSampleLog(tmp_path, [], 0, 2)  # ... one at step 2 drops them: step 3 runs again and finds them again
    assert read_bad_samples(tmp_path) == []


def test_reader_equals_local_scan_and_resumes_mid_shard_through_a_range_request(cifar_dir):
    local = find_samples(str(cifar_dir / "train-000000.tar"))
    with ShardServer(cifar_dir) as srv:
        url = srv.url("train-000000.tar")
        recs = list(st.iter_shard(url))
        assert [(r["key"], r["ordinal"]) for r in recs] == [(s.key, i) for i, s in enumerate(local)]
        for i in (0, 1234, len(local) - 1):
            assert recs[i]["parts"][".jpg"] == local[i].read()
            assert int(recs[i]["parts"][".cls"]) == local[i].label
        # a cursor mid-shard: (ordinal, offset of its first header) -> the remaining samples exactly
        cut = recs[2999]
        rest = list(st.iter_shard(url, cut["offset"], cut["ordinal"]))
        assert srv.requests[-1] == ("train-000000.tar", f"bytes={cut['offset']}-")
        assert [(r["key"], r["ordinal"]) for r in rest] == [(r["key"], r["ordinal"]) for r in recs[2999:]]
        assert rest[-1]["parts"][".jpg"] == local[-1].read()
        # a connection dropped twice mid-shard: reconnected at its offset, the same samples
        n = srv.count("train-000000.tar")
        srv.faults["train-000000.tar"] = Fault(drop_after=3_000_000, times=n + 2)
        again = list(st.iter_shard(url, retries=3))
        assert srv.count("train-000000.tar") == n + 3
        assert [r for r, _ in srv.requests[-2:]] == ["train-000000.tar"] * 2
        assert all(h.startswith("bytes=") for _, h in srv.requests[-2:])
        assert [(r["key"], r["parts"][".jpg"]) for r in again] == [(r["key"], r["parts"][".jpg"]) for r in recs]
    # pipe: cannot seek: a cursor restarts the command and skips to the offset
    piped = list(st.iter_shard(f"pipe:cat {cifar_dir / 'train-000000.tar'}", cut["offset"], cut["ordinal"]))
    assert [(r["key"], r["ordinal"]) for r in piped] == [(r["key"], r["ordinal"]) for r in recs[2999:]]


def test_dead_truncated_and_stalled_shards_are_skipped_and_counted(small_shards):
    with ShardServer(small_shards) as srv:
        urls = [srv.url(f"train-00000{k}.tar") for k in range(4)]
        srv.faults["train-000001.tar"] = Fault(status=404)
        size = (small_shards / "train-000002.tar").stat().st_size
        srv.faults["train-000002.tar"] = Fault(truncate_to=size // 2)
        srv.faults["train-000003.tar"] = Fault(stall_s=20)  # 1 KiB, then silence
        ds = st.StreamDataset(urls, [16], 4, 0, 0, 1, 1, BUFFER, timeout_s=0.5, retries=1)
        t0 = time.monotonic()
        it = ds.iter_slot(0)
        items = []
        while True:
            item = next(it)
            if item["epoch"] > 0:
                break
            items.append(item)
        elapsed = time.monotonic() - t0
        assert elapsed < 10, elapsed  # the stall costs 2 timeouts and a backoff, not 20 s
        batch = st.stream_collate(items + [item])
        problems = {u: r for u, r, _ in batch["shard_problems"]}
        assert set(problems) == {urls[1], urls[2], urls[3]}, problems
        assert "404" in problems[urls[1]] and "truncated" in problems[urls[2]] and "timed out" in problems[urls[3]]
        got = [(u, k) for u, k in ((it_["url"], it_["key"]) for it_ in items)]
        assert len(set(got)) == len(got)
        keys2 = _keys(small_shards / "train-000002.tar")
        from2 = [k for u, k in got if u == urls[2]]
        assert sorted(k for u, k in got if u == urls[0]) == _keys(small_shards / "train-000000.tar")
        assert 0 < len(from2) < len(keys2) and set(from2) <= set(keys2)  # what was read before the cut stays
        assert all(it_["valid"] for it_ in items)

        # every shard of a reader dead: an error, not a spin; no shard at all: refused before anything starts
        dead = st.StreamDataset([urls[1]] * 2, [16], 4, 0, 0, 1, 1, BUFFER, timeout_s=0.5, retries=0)
        with pytest.raises(RuntimeError, match="none of the 2 shards of reader 0"):
            next(dead.iter_slot(0))
        with pytest.raises(ConfigError, match="no shard of data.source can be read"):
            st.probe_shards([urls[1], srv.url("nope.tar")])
        assert st.probe_shards([urls[1], urls[0]]) == 1
        with pytest.raises(RemoteError, match=r"cannot read .*nope\.tar: HTTP 404"):
            open_url(srv.url("nope.tar"))
        # the epoch size: the manifest beside the shards, else data.epoch_size, else one line naming both
        assert st.epoch_size(urls, None) == 4 * SHARD
        assert st.epoch_size([srv.url("x/a.tar")], 99) == 99
        with pytest.raises(ConfigError, match="manifest.json.*data.epoch_size"):
            st.epoch_size([srv.url("x/a.tar")], None)


def test_dali_decodes_the_stream_with_the_torch_paths_boxes(small_shards):
    from megadigpt.data.dali_loader import DaliStreamLoader

    urls = [str(small_shards / f"train-00000{k}.tar") for k in range(4)]

    def loader(encoded):
        ds = st.StreamDataset(urls, [32, 24], 4, 3, 0, 1, 0, BUFFER, encoded=encoded)
        return st.StreamLoader(ds, 8, 6, 0)

    ref = list(loader(False))
    inner = loader(True)
    got = list(DaliStreamLoader(inner, __import__("torch").device("cpu"), num_threads=1))
    assert len(got) == len(ref) == 6
    for a, b in zip(ref, got):
        assert a["ids"] == b["ids"] and a["cursor"] == b["cursor"]
        assert (a["order"] == b["order"]).all() and (a["label"] == b["label"]).all()
        for va, vb in zip(a["views"], b["views"]):
            d = (va.float() - vb.float()).abs()
            assert va.shape == vb.shape and d.mean() < 6, d.mean()  # two decoders and resamplers, one crop
    assert inner.cursors == {0: tuple(ref[-1]["cursor"][1])}


def _trained(log_path, max_step=None):
    out = []
    for p in sorted(Path(log_path).parent.glob(Path(log_path).name + ".rank*")):
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line torn by the kill
                continue
            if max_step is None or rec["step"] <= max_step:
                out += [(rec["rank"], s, k) for s, k in rec["ids"]]
    return out


def test_stream_pretraining_killed_and_resumed_trains_no_sample_twice(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    with ShardServer(small_shards) as srv:
        def args(*extra):
            return ["pretrain", "--data", srv.url("train-{000000..000003}.tar"), "--run-dir", str(run_dir), *TINY,
                    "data.mode=stream", "data.num_workers=2", f"data.shuffle_buffer={BUFFER}",
                    "train.global_batch=8", "train.micro_batch=4", "train.max_steps=6", "train.zero_stage=1",
                    "train.ckpt_every=2", *extra]

        # the first run dies by SIGKILL during the save of step 4 (DALI decodes); step 2 is the last checkpoint
        p = run_cli(args("data.loader=dali"), nproc=2, check=False, MEGADIGPT_FAULTS="kill_in_save=4",
                    MEGADIGPT_TRAINED_LOG=tmp_path / "first")
        assert p.returncode != 0
        tag = run_dir / "checkpoints" / "step_00000002"
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
        n_before = len(srv.requests)
        run_cli(args("data.loader=torch"), nproc=2, MEGADIGPT_TRAINED_LOG=tmp_path / "second")  # resumes, torch
        ranges = [h for _, h in srv.requests[n_before:] if h]
        # a different number of DataLoader workers cannot use the read positions: one line, before anything heavy
        p = run_cli(args("data.num_workers=1"), nproc=2, check=False)
    events = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' in l]
    assert [e["step"] for e in events if e["event"] == "resume"] == [2]
    assert events[-1]["event"] == "done" and events[-1]["step"] == 6
    # a rank exits 2 (torchrun may stop the other before it reports its own exit 2), without a traceback
    assert p.returncode != 0 and "exitcode  : 2" in p.stderr and "[rank0]: Traceback" not in p.stderr \
        and "[rank1]: Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [l for l in p.stderr.splitlines() if l.startswith("megadigpt: error:")]
    assert lines and "data.num_workers = 2, now 1" in lines[0], p.stderr[-2000:]

    kept = _trained(tmp_path / "first", max_step=2)  # what the checkpoint of step 2 was trained on
    resumed = _trained(tmp_path / "second")
    assert len(kept) == 2 * 2 * 8 // 2 and len(resumed) == 4 * 8  # 2 and 4 steps of 8 images
    ids = [(s, k) for _, s, k in kept + resumed]
    assert len(ids) == len(set(ids)), "a sample was trained on twice"

    # what each reader skipped: the samples before its saved cursor that the checkpoint did not train on
    urls = [str(small_shards / f"train-00000{k}.tar") for k in range(4)]
    keys = [_keys(u) for u in urls]
    for rank in (0, 1):
        state = json.loads((tag / f"stream_rank{rank}.json").read_text())
        assert state["workers"] == 2 and state["shuffle_buffer"] == BUFFER
        skipped = 0
        for slot, (epoch, pos, ordinal, offset) in state["cursors"].items():
            order = st.slot_shards(4, 0, epoch, int(slot), 4)
            read = [(s, k) for s in order[:pos] for k in keys[s]] + [(order[pos], k) for k in
                                                                      keys[order[pos]][:ordinal]]
            before = set(read)
            lost = before - {(s, k) for r, s, k in kept}
            assert len(lost) <= BUFFER, (slot, len(lost))
            assert not before & {(s, k) for r, s, k in resumed}  # the resumed reader starts at its cursor
            skipped += len(lost)
            if offset:
                assert f"bytes={offset}-" in ranges  # reopened mid-shard by a Range request
        assert skipped <= 2 * BUFFER
    assert not [r for r in (run_dir / "bad_samples.jsonl").read_text().splitlines() if r.strip()]

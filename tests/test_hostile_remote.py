"""Hostile remote sources (issue 28, "every remote read bounded"): a server trickling bytes (body or headers), an
endless body, a gzip Content-Encoding bomb, a ``pipe:`` command that never finishes, a tar member declaring
10 GiB, duplicate keys in a shard, and partial downloads left by errors and signals. Real HTTP on 127.0.0.1
(tests/http_server.py), real tar files, real subprocesses; every test has a hard time limit and checks the
outcome is a counted shard problem, a bad sample or one line, with nothing left in the cache."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc

import numpy as np
import pytest

from megadigpt.data import remote
from megadigpt.data import streaming as st
from megadigpt.data.remote import RemoteError
from tests.http_server import Fault, ShardServer, endless_zeros

from .conftest import REPO, TINY, make_jpeg, run_cli, subprocess_env

N = 12  # samples per test shard


def _member(name: str, data: bytes) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _tar(members) -> bytes:
    return b"".join(_member(n, d) for n, d in members) + b"\0" * (2 * tarfile.BLOCKSIZE)


def _samples(prefix: str, n: int = N, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out += [(f"{prefix}{i:04d}.jpg", make_jpeg(rng, (40, 30))), (f"{prefix}{i:04d}.cls", str(i % 3).encode())]
    return out


@pytest.fixture
def shards(tmp_path):
    """A folder served over HTTP: good.tar, dup.tar (a key twice), classes.txt."""
    root = tmp_path / "srv"
    root.mkdir()
    (root / "good.tar").write_bytes(_tar(_samples("g")))
    (root / "good2.tar").write_bytes(_tar(_samples("h", seed=1)))
    s = _samples("d", 4)
    (root / "dup.tar").write_bytes(_tar(s[:4] + s[:2] + s[4:] + s[6:7]))  # d0000 again; d0003.jpg twice in a row
    (root / "classes.txt").write_text("a\nb\nc\n")
    return root


@pytest.fixture
def fast(tmp_path):
    """Remote reads configured as a test wants them (a 0.5 s read timeout: a 2.5 s deadline floor), restored after."""
    old = remote.options()
    cache = tmp_path / "cache"
    remote.configure(cache_dir=str(cache), timeout_s=0.5, retries=1)
    yield cache
    remote.configure(**old)


def _no_leftovers(cache):
    assert not [p.name for p in cache.glob("*.part*")]


def test_a_trickling_server_is_bounded_in_both_modes_and_for_small_files(shards, fast):
    from megadigpt.data.sources import label_names, scan_source

    remote.configure(**{**remote.options(), "deadline_s": 1.0})  # data.io_deadline_s=1: 1 s + size at 1 MB/s
    with ShardServer(shards) as srv:
        srv.faults["good2.tar"] = Fault(trickle_bps=100)  # ~40 kB declared: 1.04 s allowed a try
        srv.faults["classes.txt"] = Fault(trickle_bps=5)  # a byte every 0.2 s: no read times out, the file does
        srv.faults["slowhead.tar"] = Fault(trickle_headers_bps=20)  # the status line, then an endless header
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as e:  # index mode: the shard cache, 2 tries
            remote.cache_shard(srv.url("good2.tar"))
        assert time.monotonic() - t0 < 5  # 2 tries of ~1 s and a 0.5 s backoff, not 7 minutes
        assert "over its deadline" in str(e.value) and "(after 2 tries)" in str(e.value) and "\n" not in str(e.value)
        for url in (srv.url("good2.tar"), srv.url("slowhead.tar")):
            t0 = time.monotonic()
            with pytest.raises(RemoteError, match="deadline"):
                remote.cache_shard(url, retries=0)
            with pytest.raises(RemoteError, match="deadline"):  # stream mode: the sequential reader
                list(st.iter_shard(url, retries=0))
            assert time.monotonic() - t0 < 5
        _no_leftovers(fast)

        # index mode end to end (sources.scan_source): the trickled shard is a counted problem, the other read
        remote.configure(**{**remote.options(), "retries": 0})
        t0 = time.monotonic()
        index, problems = scan_source([srv.url("good.tar"), srv.url("good2.tar")])
        assert time.monotonic() - t0 < 5 and len(index) == N
        assert [p.path for p in problems] == [srv.url("good2.tar")] and "deadline" in problems[0].reason

        # small files: classes.txt (fine-tuning asks once; a trickle is "unknown", not a hang), manifest.json
        t0 = time.monotonic()
        assert label_names(srv.url("good.tar")) is None
        with pytest.raises(RemoteError, match="deadline"):
            remote.read_small(srv.url("classes.txt"), retries=0)
        assert time.monotonic() - t0 < 5
        srv.faults["manifest.json"] = Fault(trickle_headers_bps=20)
        t0 = time.monotonic()
        with pytest.raises(Exception, match=r"manifest\.json.*deadline.*data\.epoch_size is not set") as e:
            st.epoch_size([srv.url("good.tar")], None)
        assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)
    _no_leftovers(fast)


def test_endless_bodies_large_declarations_and_gzip_bombs_are_refused(shards, fast):
    remote.configure(**{**remote.options(), "max_shard_bytes": 4 << 20})
    endless_tar = lambda: _endless_members()  # noqa: E731 - valid tar members with fresh keys, forever
    with ShardServer(shards) as srv:
        srv.faults["zeros.tar"] = Fault(body=endless_zeros)
        srv.faults["members.tar"] = Fault(body=endless_tar)
        srv.faults["bomb.tar"] = Fault(gzip_bomb=64 << 20)
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"goes on past data\.max_shard_bytes=4194304 bytes \(after 1 tries\)"):
            remote.cache_shard(srv.url("zeros.tar"))
        with pytest.raises(RemoteError, match=r"Content-Encoding: gzip.*\(after 1 tries\)"):
            remote.cache_shard(srv.url("bomb.tar"))
        assert srv.requests[-1][0] == "bomb.tar" and srv.count("bomb.tar") == 1  # refused at once, not retried
        remote.configure(**{**remote.options(), "max_shard_bytes": 10_000})
        with pytest.raises(RemoteError, match=r"is \d+ bytes, more than data\.max_shard_bytes=10000"):
            remote.cache_shard(srv.url("good.tar"))  # the declared size alone refuses it
        remote.configure(**{**remote.options(), "max_shard_bytes": 4 << 20})
        assert not list(fast.iterdir())  # nothing kept, nothing partial

        # stream mode: an endless stream of valid members is read up to the budget, then a counted shard problem
        recs = []
        with pytest.raises(RemoteError, match="goes on past data.max_shard_bytes"):
            for r in st.iter_shard(srv.url("members.tar")):
                recs.append(r["key"])
        assert len(recs) > 100
        with pytest.raises(RemoteError, match="Content-Encoding: gzip"):
            list(st.iter_shard(srv.url("bomb.tar")))
        ds = st.StreamDataset([srv.url("bomb.tar"), srv.url("good.tar")], [16], 4, 0, 0, 1, 1, 4)
        items, after = _epoch(ds)
        problems = [p for i in items + [after] for p in i["problems"] if p[2] == 0]  # (url, reason, epoch)
        assert len(items) == N and all(i["valid"] for i in items)
        assert [u for u, _, _ in problems] == [srv.url("bomb.tar")] and "Content-Encoding" in problems[0][1]
        assert time.monotonic() - t0 < 20


def _endless_members():
    rng = np.random.default_rng(0)
    jpg = make_jpeg(rng, (40, 30))
    i = 0
    while True:
        yield _member(f"e{i:08d}.jpg", jpg)
        i += 1


def test_pipe_commands_over_their_deadline_are_killed(tmp_path, fast):
    pid_file = tmp_path / "pid"
    trickle = f"pipe:echo $$ > {pid_file}; while :; do printf a; sleep 0.2; done"
    remote.configure(**{**remote.options(), "deadline_s": 1.0})
    for read in (lambda: remote.cache_shard(trickle, retries=0), lambda: list(st.iter_shard(trickle, retries=0))):
        pid_file.unlink(missing_ok=True)
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match="deadline") as e:
            read()
        assert time.monotonic() - t0 < 4 and "\n" not in str(e.value)
        pid = int(pid_file.read_text())
        with pytest.raises(ProcessLookupError):  # the command's shell (and its group) is gone
            os.kill(pid, 0)
    remote.configure(**{**remote.options(), "max_shard_bytes": 1 << 20})
    with pytest.raises(RemoteError, match=r"goes on past data\.max_shard_bytes"):
        remote.cache_shard("pipe:yes")
    _no_leftovers(fast)


_DOWNLOADER = """
import sys
from megadigpt.data import remote
remote.configure(cache_dir=sys.argv[1], timeout_s=30, retries=0)
remote.cache_shard(sys.argv[2])
"""


def test_partial_downloads_are_removed_on_every_exit_path(shards, tmp_path):
    cache = tmp_path / "cache"
    with ShardServer(shards) as srv:
        srv.faults["good.tar"] = Fault(trickle_bps=2000)  # a 30 s deadline: the process is killed long before
        outcomes = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            proc = subprocess.Popen([sys.executable, "-c", _DOWNLOADER, str(cache), srv.url("good.tar")],
                                    env=subprocess_env(), cwd=str(REPO), stderr=subprocess.PIPE)
            t_end = time.monotonic() + 20
            while not list(cache.glob("*.part*")) and time.monotonic() < t_end:
                time.sleep(0.05)
            assert [p.name.rsplit(".part", 1)[1] for p in cache.glob("*.part*")] == [str(proc.pid)]
            proc.send_signal(sig)
            proc.communicate(timeout=20)
            outcomes[sig] = proc.returncode
            if sig != signal.SIGKILL:
                assert not list(cache.glob("*.part*")), sig  # removed by the process itself
    assert outcomes[signal.SIGTERM] == -signal.SIGTERM  # still dies of the signal, as without the handler
    assert outcomes[signal.SIGINT] != 0
    # kill -9 leaves one: swept when a process next configures the cache, once it is no one's and idle
    left = list(cache.glob("*.part*"))
    assert len(left) == 1
    live = cache / f"x.tar.part{os.getpid()}"  # a live process's download is never swept ...
    live.write_bytes(b"x")
    old = time.time() - remote.PART_GRACE_S - 10
    for p in (left[0], live):
        os.utime(p, (old, old))
    assert remote.sweep_partials(cache) == [str(left[0])]
    assert live.exists()
    stale = time.time() - remote.PART_STALE_S - 10  # ... unless it was not written for an hour
    os.utime(live, (stale, stale))
    saved = remote.options()
    try:
        remote._SWEPT.discard(str(cache))
        remote.configure(cache_dir=str(cache))  # what every entry point does at start
    finally:
        remote.configure(**saved)
    assert not list(cache.glob("*.part*"))


def _big_member_tar(declared: int, body: int, after: bool):
    """A good sample, then ``big.jpg`` whose header declares ``declared`` bytes followed by ``body`` bytes of it,
    then (``after``) the rest of the declared data and a good sample: generated, never whole in memory."""
    rng = np.random.default_rng(0)
    jpg = make_jpeg(rng, (40, 30))

    def gen():
        yield _member("a.jpg", jpg)
        ti = tarfile.TarInfo("big.jpg")
        ti.size = declared
        yield ti.tobuf(tarfile.PAX_FORMAT)  # a pax header: the size needs more than ustar's 11 octal digits
        chunk = bytes(1 << 16)
        for _ in range(body // len(chunk)):
            yield chunk
        if after:
            yield b"\0" * (-declared % tarfile.BLOCKSIZE)
            yield _member("z.jpg", jpg)
            yield b"\0" * (2 * tarfile.BLOCKSIZE)

    return gen


def test_a_member_over_the_cap_is_a_bad_sample_decided_from_its_header(shards, fast):
    with ShardServer(shards) as srv:
        srv.faults["sparse.tar"] = Fault(body=_big_member_tar(10 << 30, 1 << 20, after=False))
        srv.faults["big.tar"] = Fault(body=_big_member_tar(48 << 20, 48 << 20, after=True))
        # a 10 GiB .jpg declared, 1 MiB sent: the default cap (256 MiB) decides from the header; nothing is held
        tracemalloc.start()
        t0 = time.monotonic()
        recs = []
        with pytest.raises(st.ShardDamaged, match="truncated"):
            for r in st.iter_shard(srv.url("sparse.tar")):
                recs.append(r)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert time.monotonic() - t0 < 10
        assert [(r["key"], r["bad"]) for r in recs] == [
            ("a", None), ("big", f"member big.jpg is {10 << 30} bytes, more than data.max_member_bytes={256 << 20}")]
        assert peak < 16 << 20, peak
        # a real 48 MiB member over a 1 MiB cap: skipped without buffering, the sample after it is read
        tracemalloc.start()
        recs = list(st.iter_shard(srv.url("big.tar"), max_member_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert [(r["key"], bool(r["bad"])) for r in recs] == [("a", False), ("big", True), ("z", False)]
        assert recs[1]["bad"] == f"member big.jpg is {48 << 20} bytes, more than data.max_member_bytes={1 << 20}"
        assert peak < 12 << 20, peak
        # through the dataset: a bad sample with that reason (bad_samples.jsonl's "decode" record), not an error
        ds = st.StreamDataset([srv.url("sparse.tar")], [16], 4, 0, 0, 1, 1, 1)
        items, after = _epoch(ds)
        batch = st.stream_collate(items + [after])  # a shard's problem rides on the next sample emitted
        assert [(k, r) for _, k, _, r in batch["bad_stream"]] == [
            ("big", f"member big.jpg is {10 << 30} bytes, more than data.max_member_bytes={256 << 20}")]
        assert [u for u, _, _ in batch["shard_problems"]] == [srv.url("sparse.tar")]
        # a pax header extension declaring 2 MiB (tarfile would read it whole): damage, not a read
        hdr = tarfile.TarInfo("././@PaxHeader")
        hdr.type, hdr.size = tarfile.XHDTYPE, 2 << 20
        srv.faults["pax.tar"] = Fault(body=lambda: iter([hdr.tobuf(tarfile.USTAR_FORMAT), bytes(2 << 20)]))
        with pytest.raises(st.ShardDamaged, match=r"a tar header extension of 2097152 bytes"):
            list(st.iter_shard(srv.url("pax.tar")))


def _epoch(ds):
    """Reader 0's samples of epoch 0, and the first one after them (it carries the problems met last)."""
    items = []
    for item in ds.iter_slot(0):
        if item["epoch"] > 0:
            return items, item
        items.append(item)


def test_duplicate_keys_in_a_stream_shard_are_bad_samples(shards, fast):
    with ShardServer(shards) as srv:
        recs = list(st.iter_shard(srv.url("dup.tar")))
        assert [(r["key"], r["bad"]) for r in recs] == [
            ("d0000", None), ("d0001", None),
            ("d0000", "duplicate key d0000 in the shard (an earlier sample has it)"),
            ("d0002", None), ("d0003", None),
            ("d0003", "duplicate key d0003 in the shard (an earlier sample has it)")]
        assert recs[0]["parts"][".jpg"] and recs[2]["parts"] == {".jpg": None, ".cls": None}
        ds = st.StreamDataset([srv.url("dup.tar")], [16], 4, 0, 0, 1, 1, 2)
        batch = st.stream_collate(_epoch(ds)[0])
        assert sorted((k, r) for _, k, _, r in batch["bad_stream"]) == [
            ("d0000", "duplicate key d0000 in the shard (an earlier sample has it)"),
            ("d0003", "duplicate key d0003 in the shard (an earlier sample has it)")]
        assert int(batch["valid"].sum()) == 4 and not batch["shard_problems"]


def test_stream_pretraining_skips_a_trickling_shard_and_counts_duplicates(shards, tmp_path):
    """End to end (the CLI, stream mode, defaults but data.io_timeout_s=2): a shard trickled at 50 bytes/s is
    skipped after its 10 s deadline and recorded; the duplicate key is a bad sample; the run finishes. (A per-read
    timeout well above a loaded machine's stalls: the good shards must never time out.)"""
    run_dir = tmp_path / "run"
    with ShardServer(shards) as srv:
        srv.faults["good2.tar"] = Fault(trickle_bps=50)
        t0 = time.monotonic()
        run_cli(["pretrain", "--data", srv.url("{good,good2,dup}.tar"), "--run-dir", str(run_dir), *TINY,
                 "data.mode=stream", "data.loader=torch", "data.epoch_size=32", "data.shuffle_buffer=4",
                 "data.io_timeout_s=2", "data.io_retries=0", "train.global_batch=8", "train.micro_batch=8",
                 "train.max_steps=3", "train.zero_stage=1"], timeout=120)
        elapsed = time.monotonic() - t0
    recs = [json.loads(line) for line in (run_dir / "bad_samples.jsonl").read_text().splitlines() if line.strip()]
    shard = [r for r in recs if r["kind"] == "shard"]
    assert {r["path"] for r in shard} == {srv.url("good2.tar")} and "deadline" in shard[0]["reason"], recs
    dups = {(r["key"], r["reason"]) for r in recs if r["kind"] == "decode"}
    assert ("d0000", "duplicate key d0000 in the shard (an earlier sample has it)") in dups, recs
    assert elapsed < 90, elapsed

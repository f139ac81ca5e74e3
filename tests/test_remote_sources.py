"""Remote sources (issue 17, first part): http://, pipe: and comma brace sets read through the shard cache, with
retries; a real HTTP server on 127.0.0.1 serves the CIFAR-10 shards."""

import pytest

from megadigpt.config import ConfigError
from megadigpt.data import find_samples
from tests.http_server import Fault, ShardServer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGADIGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _same(a, b):
    assert len(a) == len(b) > 0
    assert [(s.key, s.label) for s in a] == [(s.key, s.label) for s in b]
    assert a[7].read() == b[7].read()


def test_http_brace_range_and_a_dropped_connection(cifar_dir, cache):
    local = find_samples(str(cifar_dir / "train-{000000..000001}.tar"))
    with ShardServer(cifar_dir) as srv:
        srv.faults["train-000001.tar"] = Fault(drop_after=100_000, times=1)  # the first try is cut mid-shard
        remote = find_samples(srv.url("train-{000000..000001}.tar"))
        assert srv.count("train-000001.tar") >= 2  # retried, and the short copy was not kept
        _same(remote, local)
        n = len(srv.requests)
        find_samples(srv.url("train-{000000..000001}.tar"))  # the second read comes from the cache
        assert len(srv.requests) == n
    assert not list(cache.glob("*.part*"))


def test_pipe_and_comma_sets(cifar_dir, cache):
    local = find_samples([str(cifar_dir / "train-000000.tar"), str(cifar_dir / "test-000000.tar")])
    _same(find_samples(str(cifar_dir / "{train,test}-000000.tar")), local)
    _same(find_samples(f"pipe:cat {cifar_dir}/train-000000.tar"), find_samples(str(cifar_dir / "train-000000.tar")))


def test_missing_remote_shards_are_one_line(cifar_dir, cache):
    with ShardServer(cifar_dir) as srv:
        with pytest.raises(ConfigError, match=r"cannot read http://127\.0\.0\.1:\d+/nope\.tar") as e:
            find_samples(srv.url("nope.tar"))
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="exited with status 1"):
        find_samples("pipe:false")

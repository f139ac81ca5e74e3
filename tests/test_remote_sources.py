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


def _metrics(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_pretrain_and_finetune_read_http_shards(cifar_dir, cifar_small, cache, tmp_path):
    """The issue's acceptance path: pretraining (indexed mode: through the shard cache) and fine-tuning read
    ``http://127.0.0.1:<port>/train-{000000..000003}.tar``; the class names come from the server's classes.txt."""
    import json

    from megadigpt.data.tools import build

    from .conftest import TINY, run_cli

    val_dir = tmp_path / "val_shards"
    build(str(cifar_small / "val.jsonl"), val_dir, shard_size=64, prefix="val", progress=False)
    (val_dir / "classes.txt").write_text((cifar_dir / "classes.txt").read_text())
    env = {"MEGADIGPT_CACHE": str(cache)}
    with ShardServer(cifar_dir) as srv, ShardServer(val_dir) as vsrv:
        train = srv.url("train-{000000..000003}.tar")
        pre = tmp_path / "pre"
        run_cli(["pretrain", "--data", train, "--run-dir", str(pre)] + TINY +
                ["data.mode=indexed", "train.max_steps=2", "train.global_batch=8", "train.micro_batch=8",
                 "train.zero_stage=1"], **env)
        start = next(r for r in _metrics(pre) if r.get("event") == "start")
        assert start["images"] == 20000  # four shards of 5000, every one read
        assert any("gen_loss" in r for r in _metrics(pre))
        ft = tmp_path / "ft"
        run_cli(["finetune", "--init-from", str(pre), "--train", train, "--val", vsrv.url("val-000000.tar"),
                 "--run-dir", str(ft), "--config", "cifar10_finetune", "data.num_workers=0", "train.progress=off",
                 "train.log_every=1", "train.tensorboard=false", "train.global_batch=8", "train.micro_batch=8",
                 "data.loader=torch", "train.max_steps=2", "train.zero_stage=1"], **env)
        assert {name for name, _ in srv.requests} == {f"train-00000{i}.tar" for i in range(4)} | {"classes.txt"}
    val = [r for r in _metrics(ft) if "val_top1" in r]
    assert val and val[-1]["val_images"] == 64
    meta = json.loads((ft / "last" / "config.json").read_text())
    assert meta["num_classes"] == 10 and meta["label_names"][0] == "airplane"

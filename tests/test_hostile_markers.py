"""Checkpoint markers and run files that megadigpt did not write (issue 28): a marker is read against its schema
and bounded (size, nesting), an invalid one makes its tag unverified with a reason (never a restart, never a
reason to prune), and no file of the checkpoints folder is written or read through a planted link. One real
1-rank run (2 steps, a checkpoint each) is trained once, with links planted before it starts; every test works
on a copy of it."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from megadigpt.checkpoint import ds_checkpoint as ck
from megadigpt.config import ConfigError

from .conftest import TINY, run_cli

STATES = "mp_rank_00_model_states.pt"


def _args(cifar_dir, run_dir, *extra):
    return ["pretrain", "--data", str(cifar_dir / "train-000000.tar"), "--run-dir", str(run_dir), *TINY,
            "train.global_batch=4", "train.micro_batch=4", "train.zero_stage=1", "train.ckpt_every=1", *extra]


@pytest.fixture(scope="module")
def planted(cifar_dir, tmp_path_factory):
    """A real run whose checkpoints folder held, before it started, links to a user's files where megadigpt writes
    temporaries and pointers: ``checkpoints/latest.tmp`` (the old temporary's name), ``checkpoints/latest``,
    ``step_00000001/megadigpt.json.tmp`` and DeepSpeed's recovery script ``checkpoints/zero_to_fp32.py`` (ZeRO-1)."""
    base = tmp_path_factory.mktemp("hostile")
    outside = base / "outside"
    outside.mkdir()
    run = base / "run"
    ckdir = run / "checkpoints"
    (ckdir / "step_00000001").mkdir(parents=True)
    links = {ckdir / "latest.tmp": outside / "notes.txt", ckdir / "latest": outside / "thesis.txt",
             ckdir / "step_00000001" / "megadigpt.json.tmp": outside / "data.csv",
             ckdir / "zero_to_fp32.py": outside / "script.txt"}
    for link, target in links.items():
        target.write_text(f"the user's own {target.name}\n")
        os.symlink(target, link)
    run_cli(_args(cifar_dir, run, "train.max_steps=2"))
    return run, links


@pytest.fixture
def run(planted, tmp_path):
    """A copy of the planted run with its links removed: two complete tags, step_00000001 and step_00000002."""
    src, links = planted
    dst = tmp_path / "run"
    shutil.copytree(src, dst, symlinks=True)
    for link in links:
        p = dst / link.relative_to(src)
        if p.is_symlink():
            p.unlink()
    assert ck.complete_tags(dst) == ["step_00000001", "step_00000002"] and ck.latest_tag(dst) == "step_00000002"
    return dst


def _marker(run, tag="step_00000002"):
    return ck.checkpoint_dir(run) / tag / ck.MARKER


def test_a_save_never_writes_through_a_planted_link(planted):
    run, links = planted
    for link, target in links.items():
        assert target.read_text() == f"the user's own {target.name}\n", link  # the user's files are unchanged
    ckdir = ck.checkpoint_dir(run)
    assert (ckdir / "latest.tmp").is_symlink()  # the old temporary's name is not used any more: left alone
    assert not (ckdir / "latest").is_symlink() and (ckdir / "latest").read_text() == "step_00000002\n"  # replaced
    assert (ckdir / "step_00000001" / "megadigpt.json.tmp").is_symlink()
    assert not (ckdir / "zero_to_fp32.py").is_symlink() and "zero" in (ckdir / "zero_to_fp32.py").read_text()
    assert "megadigpt.json.tmp" not in ck.read_marker(run, "step_00000001")["files"]  # a link is never listed
    assert ck.verify(run, "step_00000001", checksums=True) is None
    assert not list(ckdir.glob(".*.tmp*")) and not list((ckdir / "step_00000002").glob(".*.tmp*"))


def test_empty_marker_is_refused_not_restarted(run, cifar_dir):
    """``{}`` in every marker: before, the run started over at step 0 and pruned both checkpoints (exit 0)."""
    for tag in ("step_00000001", "step_00000002"):
        _marker(run, tag).write_text("{}")
    before = {p: p.read_bytes() for p in ck.checkpoint_dir(run).rglob("*") if p.is_file()}
    metrics = (run / "metrics.jsonl").read_text()
    t = time.perf_counter()
    p = run_cli(_args(cifar_dir, run, "train.max_steps=3"), check=False)
    took = time.perf_counter() - t
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and lines[-1].startswith("megadigpt: error: no checkpoint in "), p.stderr
    assert "step_00000002: its marker megadigpt.json is invalid: it has no step" in lines[-1]
    assert "step_00000001: its marker megadigpt.json is invalid: it has no step" in lines[-1]
    after = {p: p.read_bytes() for p in ck.checkpoint_dir(run).rglob("*") if p.is_file()}
    assert after == before  # nothing pruned, nothing written
    assert (run / "metrics.jsonl").read_text() == metrics  # not even a start line: refused before anything heavy
    print(f"refused in {took:.1f} s")


def _hostile(tmp_path):
    """(name, damage, words the reason must hold). ``damage``: the marker's new bytes, a function of the real
    marker giving them, or ("tag", a function that damages the run directory)."""

    def listed_link(run):
        real = ck.checkpoint_dir(run) / "step_00000002" / STATES
        copy = tmp_path / "elsewhere.pt"
        shutil.copyfile(real, copy)  # same size and bytes: only the link gives it away
        real.unlink()
        os.symlink(copy, real)

    def marker_link(run):
        copy = tmp_path / "marker.json"
        shutil.copyfile(_marker(run), copy)
        _marker(run).unlink()
        os.symlink(copy, _marker(run))

    def with_(**kw):
        return lambda m: json.dumps({**m, **kw}).encode()

    def file_rec(**kw):
        return lambda m: json.dumps({**m, "files": {STATES: {**m["files"][STATES], **kw}}}).encode()

    return [
        ("empty object", b"{}", "it has no step"),
        ("step 1e308", with_(step=1e308), "step is 1e+308, not a whole number"),
        ("negative step", with_(step=-1), "step is -1, not a whole number >= 0"),
        ("bool step", with_(step=True), "step is True"),
        ("NaN step", with_(step=float("nan")), "step is nan"),
        ("step of another tag", with_(step=7), "step is 7, but the folder name says 2"),
        ("step past its schedule", with_(schedule={"total_steps": 1}), "past the schedule's total_steps 1"),
        ("a list", b"[1, 2]", "it is a JSON list, not an object"),
        ("string world_size", with_(world_size="two"), "world_size is 'two'"),
        ("string lr", lambda m: json.dumps({**m, "schedule": {**m["schedule"], "peak_lr": "x"}}).encode(),
         "schedule.peak_lr is 'x'"),
        ("teacher a list", with_(teacher=[1]), "teacher is [1], not an object"),
        ("files a list", with_(files=["../../dev/zero"]), "not an object of file names"),
        ("files outside the tag", with_(files={"../../dev/zero": {"size": 0, "crc32": "00000000"}}),
         "'../../dev/zero', which is not a file inside the tag folder"),
        ("absolute file", with_(files={"/dev/zero": {"size": 0}}), "which is not a file inside the tag folder"),
        ("negative size", file_rec(size=-5), ".size is -5"),
        ("bool size", file_rec(size=True), ".size is True"),
        ("crc32 a number", file_rec(crc32=7), ".crc32 is 7"),
        ("deep nesting", b'{"step": 2, "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested more than 32 levels"),
        ("unclosed nesting", b"[" * 100000, "nested more than 32 levels"),
        ("huge marker", with_(pad="x" * (ck.MARKER_LIMIT + 1)), f"more than the {ck.MARKER_LIMIT} a marker may hold"),
        ("huge integer", b'{"step": ' + b"9" * 5000 + b"}", "it is not JSON"),
        ("not UTF-8", b"\xff\xfe{}", "it is not JSON"),
        ("not JSON", b'{"step": 2,', "it is not JSON"),
        ("marker is a link", ("tag", marker_link), "its marker megadigpt.json is a symbolic link"),
        ("listed file is a link", ("tag", listed_link), f"{STATES} is a symbolic link"),
    ]


def test_hostile_markers_leave_their_tag_unverified_with_a_reason(run, tmp_path):
    good = _marker(run).read_bytes()
    states = ck.checkpoint_dir(run) / "step_00000002" / STATES
    for name, damage, words in _hostile(tmp_path):
        if isinstance(damage, tuple):
            damage[1](run)
        else:
            _marker(run).write_bytes(damage(json.loads(good)) if callable(damage) else damage)
        t = time.perf_counter()
        reasons = [ck.verify(run, "step_00000002"), ck.verify(run, "step_00000002", checksums=True)]
        assert (ck.read_marker(run, "step_00000002") is None) == (name != "listed file is a link"), name
        assert ck.latest_tag(run) == "step_00000001", name  # falls back to the tag that verifies
        assert ck.verified_latest_tag(run) == "step_00000001", name
        assert ck.finished_step(run, 1) == 1 and ck.check_schedule(run, {}) == [], name
        took = time.perf_counter() - t
        assert all(r and words in r and "\n" not in r for r in reasons), (name, reasons)
        assert took < 5, (name, took)  # bounded: nothing read forever, nothing parsed without limit
        if _marker(run).is_symlink():  # restore the tag for the next case
            _marker(run).unlink()
        _marker(run).write_bytes(good)
        if states.is_symlink():
            target = Path(os.readlink(states))
            states.unlink()
            shutil.copyfile(target, states)
        assert ck.verify(run, "step_00000002", checksums=True) is None, name


def test_no_tag_verifies_is_one_line_everywhere(run):
    for tag, payload in (("step_00000001", b'{"step": true}'), ("step_00000002", b"[" * 100000)):
        _marker(run, tag).write_bytes(payload)
    assert ck.latest_tag(run) is None and ck.complete_tags(run) == []
    for call in (lambda: ck.verified_latest_tag(run), lambda: ck.resumable_tag(run),
                 lambda: ck.finished_step(run, 2), lambda: ck.check_schedule(run, {"total_steps": 2})):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("no checkpoint in ") and "step is True" in msg, msg
        assert "nested more than 32 levels" in msg
    ck.prune(run, keep=1, protect="step_00000003")  # a save after them (say, a fresh start) deletes neither
    assert sorted(p.name for p in ck.checkpoint_dir(run).iterdir() if p.name.startswith("step_")) == \
        ["step_00000001", "step_00000002"]


def test_prune_never_deletes_on_another_markers_word(run):
    """A forged marker claiming a newer complete checkpoint used to count towards keep: step_00000001 was deleted
    to keep 'the two newest', one of them the forgery. An invalid marker is never a reason to delete its tag."""
    ckdir = ck.checkpoint_dir(run)
    (ckdir / "step_00000099").mkdir()
    (ckdir / "step_00000099" / ck.MARKER).write_text(json.dumps({"step": 99, "files": {}}))
    (ckdir / "step_00000050").mkdir()
    (ckdir / "step_00000050" / ck.MARKER).write_text("{}")
    (ckdir / "step_00000060").mkdir()  # no marker: a save that never completed
    ck.prune(run, keep=2, protect="step_00000002")
    left = sorted(p.name for p in ckdir.iterdir() if p.name.startswith("step_"))
    assert left == ["step_00000001", "step_00000002", "step_00000050", "step_00000099"]
    ck.prune(run, keep=1, protect="step_00000002")  # only what is older than the tag just written
    assert sorted(p.name for p in ckdir.iterdir() if p.name.startswith("step_")) == \
        ["step_00000002", "step_00000050", "step_00000099"]


def test_planted_links_in_the_checkpoints_folder(run, tmp_path):
    ckdir = ck.checkpoint_dir(run)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    # latest as a link: not read (the newest complete tag is found by listing), replaced (not followed) on write
    (ckdir / "latest").unlink()
    os.symlink(victim, ckdir / "latest")
    assert ck.latest_tag(run) == "step_00000002"
    ck.set_latest(run, "step_00000001")
    assert victim.read_text() == "keep me\n" and (ckdir / "latest").read_text() == "step_00000001\n"
    # a tag folder that is a link: reported, never resumed from, never pruned
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ckdir / "step_00000002", elsewhere)
    os.symlink(elsewhere, ckdir / "step_00000003")
    assert "is a symbolic link" in ck.verify(run, "step_00000003")
    ck.prune(run, keep=1, protect="step_00000002")
    assert (ckdir / "step_00000003").is_symlink() and (elsewhere / ck.MARKER).is_file()
    # metrics.jsonl as a link: the skipped-checkpoint report is one line naming it, the target untouched
    (run / "metrics.jsonl").unlink()
    os.symlink(victim, run / "metrics.jsonl")
    with pytest.raises(ConfigError) as e:
        ck._report_skipped(run, [("step_00000002", "damaged")], "step_00000001")
    assert "metrics.jsonl" in str(e.value) and "\n" not in str(e.value) and victim.read_text() == "keep me\n"

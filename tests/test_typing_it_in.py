"""Typing it in: what a user pastes into bash or reads off a help screen. Every documented `megadigpt ...` command
(README.md, docs/*.md, slurm/README.md: code blocks and inline code; the comments of the built-in configs) is
valid shell with its patterns quoted; a brace pattern the shell expanded anyway gets a hint to quote it; every
option of every command has help text; `plan` ends with a recommendation per model; a run directory given as
labelled images is named as such; a stream of unknown size trains for train.max_steps."""

import argparse
import io
import json
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from megadigpt.commands import build_parser
from megadigpt.config import CONFIG_DIR, ConfigError, parse_overrides

from .conftest import REPO, TINY, make_jpeg, run_cli, subprocess_env
from .test_docs import code_blocks

SHELL_BLOCKS = ("bash", "sh", "shell", "console", "")
INVOCATION = re.compile(r"(?:^|[\s;&|(])megadigpt\s+[a-z]")


# ============================================================================ documented commands


def _logical_lines(lines):
    """Lines with backslash continuations joined."""
    out, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


def documented_commands():
    """(where, command text) of every `megadigpt ...` command in the docs and in the configs' comments."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "slurm" / "README.md"]:
        text = page.read_text()
        for info, body in code_blocks(text):
            if (info.split()[0] if info else "") not in SHELL_BLOCKS:
                continue
            for line in _logical_lines(body.split("\n")):
                if INVOCATION.search(line.split(" #", 1)[0]):
                    found.append((f"{page.name} (code block)", line.strip()))
        fence = False
        for n, line in enumerate(text.split("\n"), 1):
            if line.lstrip().startswith("```"):
                fence = not fence
            elif not fence:
                for span in re.findall(r"`([^`]+)`", line):
                    if span.startswith("megadigpt ") and re.match(r"megadigpt\s+[a-z]", span):
                        found.append((f"{page.name}:{n}", span))
    for cfg in sorted(CONFIG_DIR.glob("*.yaml")) + sorted((REPO / "slurm" / "chains").glob("*.yaml")):
        comments = [ln.split("#", 1)[1][1:] if "#" in ln else "" for ln in cfg.read_text().split("\n")
                    if ln.lstrip().startswith("#")]
        for line in _logical_lines(comments):
            m = re.search(r"(?:^|\s)(megadigpt\s+[a-z].*)$", line)
            if m:
                found.append((cfg.name, m.group(1).strip()))
    return found


def _mask_quotes(cmd: str) -> str:
    """``cmd`` with every quoted or backslash-escaped character replaced by ``Q`` and any trailing comment cut: what
    the shell itself expands. Raises ValueError on an unbalanced quote."""
    out, q, i = [], None, 0
    while i < len(cmd):
        c = cmd[i]
        if q == "'":
            out.append("Q" if c != "'" else c)
            q = None if c == "'" else q
        elif q == '"':
            if c == "\\" and i + 1 < len(cmd):
                out.append("QQ")
                i += 2
                continue
            out.append("Q" if c != '"' else c)
            q = None if c == '"' else q
        elif c == "\\" and i + 1 < len(cmd):
            out.append("QQ")
            i += 2
            continue
        elif c in "'\"":
            q = c
            out.append(c)
        elif c == "#" and (i == 0 or cmd[i - 1].isspace()):
            break
        else:
            out.append(c)
        i += 1
    if q:
        raise ValueError(f"unbalanced {q}")
    return "".join(out)


def quoting_problems(cmd: str) -> list:
    """Why ``cmd`` would not run as written in bash: unbalanced quotes, a brace pattern or a glob the shell would
    expand before megadigpt sees it."""
    try:
        shlex.split(cmd, comments=True)
        bare = _mask_quotes(cmd)
    except ValueError as e:
        return [f"unbalanced quotes ({e})"]
    problems = []
    for m in re.finditer(r"(?<!\$)\{[^\s{}]*(?:\.\.|,)[^\s{}]*\}", bare):
        problems.append(f"unquoted brace pattern {m.group()} (the shell expands it into several words)")
    for m in re.finditer(r"[*?]", bare):
        problems.append(f"unquoted glob character {m.group()!r} at {m.start()}")
    return problems


def test_every_documented_command_is_valid_shell():
    found = documented_commands()
    where = {w.split(" ")[0].split(":")[0] for w, _ in found}
    # the checker sees the pages and the configs' experiment records
    assert {"README.md", "cifar10_pretrain.yaml", "data.md"} <= where, where
    bad = [f"{w}: {cmd}: {'; '.join(p)}" for w, cmd in found for p in [quoting_problems(cmd)] if p]
    assert bad == [], "\n".join(bad)


def test_quoting_checker_finds_what_the_shell_would_expand():
    assert quoting_problems("megadigpt pretrain --data 'x/train-{000000..000009}.tar'") == []
    assert quoting_problems('megadigpt pretrain --data "x/{a,b}.tar" train.max_steps=10  # {0..9} fine here') == []
    assert quoting_problems("megadigpt pretrain --data x/train-\\{000000..000009\\}.tar") == []
    assert quoting_problems('megadigpt eval "$(ls -d runs/*)" --out "${OUT}"') == []
    assert "brace" in quoting_problems("megadigpt pretrain --data x/train-{000000..000009}.tar")[0]
    assert "brace" in quoting_problems("megadigpt eval M --imagenet /d/{val,test}")[0]
    assert "glob" in quoting_problems("megadigpt data index /d/*.tar --out i")[0]
    assert "unbalanced" in quoting_problems("megadigpt pretrain --data 'x/train.tar")[0]


# ============================================================================ a pattern the shell expanded


def test_expanded_brace_pattern_gets_a_hint_to_quote_it(tmp_path):
    shards = [str(tmp_path / f"train-{k:06d}.tar") for k in range(10)]
    with pytest.raises(ConfigError) as e:  # what `--data x/train-{000000..000009}.tar` leaves in the overrides
        parse_overrides(shards[1:] + ["train.max_steps=5"])
    msg = str(e.value)
    assert "\n" not in msg and "9 arguments look like the files of a pattern the shell expanded" in msg
    assert f"'{tmp_path}/train-{{000000..000009}}.tar'" in msg
    with pytest.raises(ConfigError, match=r"put the pattern in quotes"):
        parse_overrides([shards[1]])
    with pytest.raises(ConfigError) as e:  # not a file at all: the plain message
        parse_overrides(["maxsteps"])
    assert "quotes" not in str(e.value)
    # through the command line, as bash passes it
    p = subprocess.run([sys.executable, "-m", "megadigpt", "pretrain", "--data", *shards, "--run-dir",
                        str(tmp_path / "r")], capture_output=True, text=True, timeout=120, env=subprocess_env())
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("megadigpt: error:")]
    assert p.returncode == 2 and len(lines) == 1 and "{000000..000009}" in lines[0], p.stderr[-2000:]


# ============================================================================ help texts


def _actions(parser, path):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _actions(sub, path + [name])
        elif not isinstance(a, (argparse._HelpAction, argparse._VersionAction)) and a.help != argparse.SUPPRESS:
            yield " ".join(path), a


def test_every_option_of_every_command_has_help_text():
    actions = list(_actions(build_parser(), ["megadigpt"]))
    assert len(actions) > 150
    missing = [f"{cmd} {'/'.join(a.option_strings) or a.dest}" for cmd, a in actions if not (a.help or "").strip()]
    assert missing == []


def test_submit_help_lists_every_stage():
    from megadigpt.launch.slurm import COMMANDS

    p = subprocess.run([sys.executable, "-m", "megadigpt", "submit", "--help"], capture_output=True, text=True,
                       timeout=60, env=subprocess_env())
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert set(COMMANDS) == {"pretrain", "finetune", "segment", "clip", "probe", "eval"}
    for c in COMMANDS:
        assert c in text.split("positional arguments")[0], c  # in the usage / description
    assert "--setup LINE" in text and "srun python -m megadigpt" in text


# ============================================================================ plan


def test_plan_ends_with_one_recommendation_per_model(tmp_path):
    from megadigpt.perf.memory import PlanRow, recommend

    out = tmp_path / "plan.json"
    p = run_cli(["plan", "--config", "demo", "--models", "vit_small/16,vit_base/16", "--gpus", "4", "--gpu-mem", "9",
                 "--zero", "1,3", "--ckpt", "off,on", "--offload", "off,on", "--json", str(out),
                 "train.global_batch=256"])
    lines = p.stdout.rstrip().splitlines()
    assert [ln.split(":")[0] for ln in lines[-2:]] == ["recommended vit_small/16", "recommended vit_base/16"]
    rows = json.loads(out.read_text())
    assert {r["offload"] for r in rows} == {True, False} and all(r["global_batch"] == 256 for r in rows)
    table = [ln for ln in lines if ln.startswith("| vit_")]
    assert {ln.split("|")[4].strip() for ln in table} == {"on", "off"}  # the offload column, as the flag takes it
    for arch, line in zip(("vit_small", "vit_base"), lines[-2:]):
        best = recommend([PlanRow(**r) for r in rows if r["arch"] == arch])
        mb = best.recommended_micro_batch
        assert not best.offload and not best.checkpointing and best.stage == 1 and mb == 64  # it all fits
        assert f"ZeRO-1, activation checkpointing off, offload off, micro-batch {mb}, accumulation " \
               f"{256 // (4 * mb)} (4 GPUs x {mb} x {256 // (4 * mb)} = global batch 256)" in line
        assert line.endswith(f"train.zero_stage=1 train.activation_checkpointing=false train.micro_batch={mb}")
    # the order of preference: no offload, no checkpointing, the smallest stage, the largest micro-batch
    base = dict(arch="a", patch=16, micro_batch=8, params_gib=0, grads_gib=0, optimizer_gib=0, buffers_gib=0,
                fp32_grads_gib=0, activations_gib=0, teacher_gib=0, total_gib=0, fits=True, max_micro_batch=64,
                host_gib=0, global_batch=512)
    cands = [PlanRow(stage=1, checkpointing=True, offload=False, recommended_micro_batch=64, **base),
             PlanRow(stage=3, checkpointing=False, offload=False, recommended_micro_batch=16, **base),
             PlanRow(stage=2, checkpointing=False, offload=True, recommended_micro_batch=64, **base),
             PlanRow(stage=1, checkpointing=False, offload=False, recommended_micro_batch=0, **base)]
    assert recommend(cands) is cands[1]
    assert recommend(cands[3:]) is None


# ============================================================================ probe: a run directory as images


def test_probe_of_a_run_directory_as_images_says_so(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    rng = np.random.default_rng(0)
    for k in range(10):  # what `megadigpt report` leaves there: plots in a subfolder, read as one "class"
        (run / f"report{k}").mkdir()
        (run / f"report{k}" / "loss.png").write_bytes(make_jpeg(rng, fmt="PNG"))
    p = run_cli(["probe", "--random-init", "--config", "cifar10_finetune", "--train", str(run), "--val", str(run),
                 "--out", str(tmp_path / "out"), "model.num_classes=2"], check=False, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("megadigpt: error:")]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert f"data.train: no images found in {run}: it is a megadigpt run directory" in lines[0]
    assert "does not fit" not in lines[0]


# ============================================================================ a stream of unknown size


def _shards(folder: Path, n_shards: int, per_shard: int):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for s in range(n_shards):
        with tarfile.open(folder / f"s-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                data = make_jpeg(rng, size=(40, 40))
                info = tarfile.TarInfo(f"{s:03d}{i:04d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def test_stream_of_unknown_size_trains_for_max_steps(tmp_path):
    """No manifest.json and no data.epoch_size: train.max_steps with a warm-up in steps needs neither (the epoch
    counter is unknown); a warm-up in epochs, or no max_steps, is one line naming what needs the epoch size."""
    from megadigpt.config import load_config
    from megadigpt.train.pretrain import plan_run

    data = _shards(tmp_path / "shards", 2, 12)
    source = str(data / "s-{000000..000001}.tar")
    args = ["pretrain", "--data", source, "--run-dir", str(tmp_path / "run"), *TINY, "data.mode=stream",
            "data.loader=torch", "data.shuffle_buffer=4", "train.global_batch=4", "train.micro_batch=4",
            "train.max_steps=3"]
    base = TINY + [f"data.source={source}", "data.mode=stream", "data.loader=torch", f"train.run_dir={tmp_path}/p",
                   "train.global_batch=4", "train.micro_batch=4"]
    assert plan_run(load_config("demo", base + ["train.max_steps=3"]), 1, "cpu").epoch_size is None
    assert plan_run(load_config("demo", base + ["data.epoch_size=24"]), 1, "cpu").epoch_size == 24
    with pytest.raises(ConfigError, match=r"epoch size for optim\.warmup_epochs.*data\.epoch_size is not set"):
        plan_run(load_config("demo", base + ["train.max_steps=3", "optim.warmup_steps=null",
                                             "optim.warmup_epochs=1"]), 1, "cpu")
    with pytest.raises(ConfigError, match=r"epoch size for train\.epochs"):
        plan_run(load_config("demo", base + ["train.max_steps=null", "train.epochs=1"]), 1, "cpu")
    run_cli(args, timeout=600)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "gen_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all("epoch" in r and r["epoch"] is None for r in steps)
    assert recs[-1].get("event") == "done"

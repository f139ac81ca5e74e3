"""Bad input, command by command: every class of bad value and damaged file is one line ``megadigpt: error: ...``
on stderr, exit code 2, no traceback, nothing written. Most cases run ``megadigpt.cli.main`` in-process (they fail
before anything heavy starts); resuming a run directory of another network needs real processes."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from megadigpt.config import RULES, Config, ConfigError, FinetuneRunConfig, load_config, rules_of, validate

from .conftest import REPO, TINY, subprocess_env

TINY_RUN = TINY + ["train.max_steps=2", "train.global_batch=4", "train.micro_batch=4", "train.zero_stage=0"]
FT = ["model.arch=vit_tiny", "model.img_size=32", "model.patch_size=4", "model.embed_dim=64", "model.depth=4",
      "model.num_heads=2", "train.max_steps=1", "train.global_batch=4", "train.micro_batch=4", "data.num_workers=0"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A folder of broken inputs, and a real 2-step ZeRO-0 run (its checkpoint cut short in a copy)."""
    root = tmp_path_factory.mktemp("bad")
    (root / "file.txt").write_text("x")
    (root / "dir").mkdir()
    (root / "bin.yaml").write_bytes(bytes(range(256)) * 2)
    (root / "empty.yaml").write_text("")
    (root / "dup.yaml").write_text("model:\n  depth: 3\n  depth: 4\n")
    (root / "latin1.yaml").write_bytes("model:\n  arch: vit_b\xe4se\n".encode("latin-1"))
    (root / "code.yaml").write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    (root / "garbage.safetensors").write_bytes(b"\x00" * 100)
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "imgs" / c / f"{i}.jpg")
    run = root / "run"
    p = subprocess.run([sys.executable, "-m", "megadigpt", "pretrain", "--run-dir", str(run), *TINY_RUN],
                       capture_output=True, text=True, env=subprocess_env(), cwd=str(REPO), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ft = root / "ft_run"  # a real 1-step fine-tuning run from scratch, with its best/ classifier export
    p = subprocess.run([sys.executable, "-m", "megadigpt", "finetune", "--train", str(root / "imgs"), "--val",
                        str(root / "imgs"), "--run-dir", str(ft), *FT], capture_output=True, text=True,
                       env=subprocess_env(), cwd=str(REPO), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for name, damage in (("export_trunc", "model.safetensors"), ("export_json", "config.json")):
        shutil.copytree(ft / "best", root / name)
        f = root / name / damage
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    from megadigpt.checkpoint.convert import load_any
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in load_any(run).items()}, str(root / "good.safetensors"))
    data = (root / "good.safetensors").read_bytes()
    (root / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(run, root / "run_trunc")
    for shard in (root / "run_trunc" / "checkpoints").glob("step_*/*.pt"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    return root


def _one_line_error(capsys, argv):
    """Run the CLI in-process; -> its one error line (the assertions are the contract)."""
    from megadigpt.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert not any("Traceback" in ln for ln in err), err
    assert len(err) == 1 and err[0].startswith("megadigpt: error:"), err
    return err[0]


CASES = {
    # ------------------------------------------------------------------ pretrain
    "pretrain/size<=0": (["pretrain", "model.embed_dim=0"], r"model\.embed_dim must be > 0, got 0"),
    "pretrain/patch<0": (["pretrain", "model.patch_size=-16"], r"model\.patch_size must be > 0"),
    "pretrain/img_size": (["pretrain", "model.img_size=0"], r"model\.img_size must be > 0"),
    "pretrain/heads": (["pretrain", "model.decoder_heads=0"], r"model\.decoder_heads must be > 0"),
    "pretrain/depth": (["pretrain", "model.depth=-2"], r"model\.depth must be > 0"),
    "pretrain/rate>1": (["pretrain", "model.drop_path=1.5"], r"model\.drop_path must be in \[0, 1\)"),
    "pretrain/lr<0": (["pretrain", "optim.lr=-1e-3"], r"optim\.lr must be > 0"),
    "pretrain/lr=inf": (["pretrain", "optim.lr=.inf"], r"optim\.lr must be a finite number, got inf"),
    "pretrain/override-yaml": (["pretrain", "model.taps=[1"], r"override 'model\.taps=\[1': not a YAML value"),
    "pretrain/ds_config": (["pretrain", "train.ds_config={F}/bin.yaml"], r"DeepSpeed config template .* not valid JSON"),
    "pretrain/workers<0": (["pretrain", "data.num_workers=-1"], r"data\.num_workers must be >= 0"),
    "pretrain/steps=0": (["pretrain", "train.max_steps=0"], r"train\.max_steps must be > 0"),
    "pretrain/epochs<0": (["pretrain", "train.epochs=-3"], r"train\.epochs must be >= 0"),
    "pretrain/batch=0": (["pretrain", "train.micro_batch=0"], r"train\.micro_batch must be > 0"),
    "pretrain/pair": (["pretrain", "data.crop_scale=[0.9,0.2]"], r"data\.crop_scale must be lo <= hi"),
    "pretrain/choice": (["pretrain", "model.arch=vit_bsae"], r"model\.arch must be one of .*did you mean 'vit_base'"),
    "pretrain/binary": (["pretrain", "--config", "{F}/bin.yaml"], r"bin\.yaml is not UTF-8 text"),
    "pretrain/empty": (["pretrain", "--config", "{F}/empty.yaml"], r"empty\.yaml is empty"),
    "pretrain/dup": (["pretrain", "--config", "{F}/dup.yaml"], r"duplicate key 'depth' \(line 3\)"),
    "pretrain/latin1": (["pretrain", "--config", "{F}/latin1.yaml"], r"not UTF-8"),
    "pretrain/code": (["pretrain", "--config", "{F}/code.yaml"], r"not valid YAML \(could not determine a constr"),
    "pretrain/config-dir": (["pretrain", "--config", "{F}/dir"], r"is a directory"),
    "pretrain/run_dir-file": (["pretrain", "--run-dir", "{F}/file.txt", *TINY_RUN], r"train\.run_dir"),
    "pretrain/run_dir-under-file": (["pretrain", "--run-dir", "{F}/file.txt/run", *TINY_RUN], r"train\.run_dir"),
    "pretrain/init-garbage": (["pretrain", "--run-dir", "{F}/r1", *TINY_RUN, "train.init_from={F}/garbage.safetensors"],
                              r"train\.init_from .*garbage\.safetensors: not a loadable safetensors"),
    "pretrain/init-trunc": (["pretrain", "--run-dir", "{F}/r2", *TINY_RUN, "train.init_from={F}/trunc.safetensors"],
                            r"trunc\.safetensors: not a loadable safetensors file \(damaged or truncated"),
    "pretrain/init-trunc-run": (["pretrain", "--run-dir", "{F}/r3", *TINY_RUN, "train.init_from={F}/run_trunc"],
                                r"model_states\.pt: damaged or truncated"),
    "pretrain/timm-name": (["pretrain", "target.kind=timm", "target.model=vit_nope_patch99"],
                           r"unknown timm model 'vit_nope_patch99'"),
    "pretrain/open_clip-name": (["pretrain", "target.kind=open_clip", "target.model=ViT-Nope"],
                                r"unknown open_clip model 'ViT-Nope'"),
    "pretrain/stray-arg": (["pretrain", "--nope"], r"unrecognized arguments: --nope"),
    # ------------------------------------------------------------------ finetune
    "finetune/rate": (["finetune", "finetune.mixup_prob=2"], r"finetune\.mixup_prob must be in \[0, 1\]"),
    "finetune/layer_decay": (["finetune", "optim.layer_decay=0"], r"optim\.layer_decay must be in \(0, 1\]"),
    "finetune/classes": (["finetune", "model.num_classes=0"], r"model\.num_classes must be > 0"),
    "finetune/choice": (["finetune", "model.global_pool=max"], r"model\.global_pool must be one of avg, token"),
    "finetune/dup": (["finetune", "--config", "{F}/dup.yaml"], r"duplicate key"),
    "finetune/binary": (["finetune", "--config", "{F}/bin.yaml"], r"not UTF-8"),
    "finetune/init-garbage": (["finetune", "--train", "{F}/imgs", "--val", "{F}/imgs", "--run-dir", "{F}/f1", *FT,
                               "--init-from", "{F}/garbage.safetensors"], r"not a loadable safetensors"),
    "finetune/init-trunc-run": (["finetune", "--train", "{F}/imgs", "--val", "{F}/imgs", "--run-dir", "{F}/f2", *FT,
                                 "--init-from", "{F}/run_trunc"], r"damaged or truncated"),
    "finetune/run_dir-file": (["finetune", "--train", "{F}/imgs", "--val", "{F}/imgs", "--run-dir", "{F}/file.txt",
                               *FT, "model.arch=vit_tiny"], r"train\.run_dir"),
    # ------------------------------------------------------------------ probe
    "probe/epochs": (["probe", "{F}/good.safetensors", "--out", "{F}/p0", "probe.epochs=0"],
                     r"probe\.epochs must be > 0"),
    "probe/layers": (["probe", "{F}/good.safetensors", "--out", "{F}/p0", "probe.layers=abc"],
                     r"probe\.layers must be all, last or comma-separated"),
    "probe/knn_t": (["probe", "{F}/good.safetensors", "--out", "{F}/p0", "probe.knn_t=-1"], r"probe\.knn_t must be"),
    "probe/garbage": (["probe", "{F}/garbage.safetensors", "--out", "{F}/p1", "--train", "{F}/imgs", "--val",
                       "{F}/imgs", *FT], r"garbage\.safetensors: not a loadable safetensors"),
    "probe/trunc-run": (["probe", "{F}/run_trunc", "--out", "{F}/p2", "--train", "{F}/imgs", "--val", "{F}/imgs",
                         *FT], r"damaged or truncated"),
    "probe/no-out": (["probe", "{F}/good.safetensors"], r"probe: the following arguments are required: --out"),
    "probe/out-file": (["probe", "{F}/good.safetensors", "--out", "{F}/file.txt"], r"--out .* is an existing file"),
    "probe/out-under-file": (["probe", "{F}/good.safetensors", "--out", "{F}/file.txt/x"], r"lies under"),
    # ------------------------------------------------------------------ eval
    "eval/batch=0": (["eval", "{F}/run", "--imagenet", "{F}/imgs", "--batch", "0"],
                     r"eval: argument --batch: expected a positive integer, got '0'"),
    "eval/limit<0": (["eval", "{F}/run", "--imagenet", "{F}/imgs", "--limit", "-3"], r"--limit: expected a positive"),
    "eval/workers": (["eval", "{F}/run", "--imagenet", "{F}/imgs", "--workers", "x"], r"--workers: expected an int"),
    "eval/out-file": (["eval", "{F}/run", "--imagenet", "{F}/imgs", "--out", "{F}/file.txt"], r"is an existing file"),
    "eval/trunc-export": (["eval", "{F}/export_trunc", "--imagenet", "{F}/imgs"],
                          r"model .*export_trunc/model\.safetensors: not a loadable safetensors file"),
    "eval/damaged-json": (["eval", "{F}/export_json", "--imagenet", "{F}/imgs"], r"config\.json: not readable JSON"),
    "eval/garbage": (["eval", "{F}/garbage.safetensors", "--imagenet", "{F}/imgs"], r"garbage\.safetensors"),
    # ------------------------------------------------------------------ convert
    "convert/garbage": (["convert", "{F}/garbage.safetensors", "--to", "timm", "--out", "{F}/c1"],
                        r"not a loadable safetensors"),
    "convert/trunc": (["convert", "{F}/trunc.safetensors", "--to", "fp32", "--out", "{F}/c2.safetensors"],
                      r"trunc\.safetensors"),
    "convert/trunc-run": (["convert", "{F}/run_trunc", "--to", "fp32", "--out", "{F}/c3.safetensors"],
                          r"model_states\.pt"),
    "convert/out-dir": (["convert", "{F}/run", "--to", "fp32", "--out", "{F}/dir"], r"is an existing folder"),
    "convert/out-file": (["convert", "{F}/run", "--to", "timm", "--out", "{F}/file.txt"], r"is an existing file"),
    "convert/out-under-file": (["convert", "{F}/run", "--to", "reference", "--out", "{F}/file.txt/x.pth"],
                               r"lies under"),
    "convert/heads": (["convert", "{F}/run", "--to", "timm", "--out", "{F}/c4", "--num-heads", "0"],
                      r"--num-heads: expected a positive integer"),
    "convert/grid": (["convert", "{F}/run", "--to", "reference", "--out", "{F}/c.pth", "--segment-grid", "1"],
                     r"--segment-grid: expected an integer >= 2"),
    # ------------------------------------------------------------------ data
    "validate/out-file": (["data", "validate", "{F}/imgs", "--out", "{F}/file.txt"], r"is an existing file"),
    "validate/workers": (["data", "validate", "{F}/imgs", "--out", "{F}/v", "--workers", "0"], r"--workers"),
    "validate/shards-file": (["data", "validate", "{F}/imgs", "--out", "{F}/v", "--shards", "{F}/file.txt"],
                             r"--shards .* is an existing file"),
    "build/shard-size": (["data", "build", "{F}/imgs", "--out", "{F}/b", "--shard-size", "0"], r"--shard-size"),
    "build/out-under-file": (["data", "build", "{F}/imgs", "--out", "{F}/file.txt/b"], r"lies under"),
    "merge/binary": (["data", "merge", "{F}/bin.yaml", "--out", "{F}/m.jsonl"], r"merge spec .* not UTF-8"),
    "merge/dup": (["data", "merge", "{F}/dup.yaml", "--out", "{F}/m.jsonl"], r"duplicate key"),
    "merge/empty": (["data", "merge", "{F}/empty.yaml", "--out", "{F}/m.jsonl"], r"is empty"),
    "merge/dir": (["data", "merge", "{F}/dir", "--out", "{F}/m.jsonl"], r"is a directory"),
    "merge/out-dir": (["data", "merge", "{F}/dup.yaml", "--out", "{F}/dir"], r"is an existing folder"),
    "merge/seed": (["data", "merge", "{F}/dup.yaml", "--out", "{F}/m.jsonl", "--seed", "-1"], r"--seed"),
    "in21k/out-dir": (["data", "in21k-labels", "{F}/imgs", "--variant", "fall11", "--out", "{F}/dir"],
                      r"is an existing folder"),
    "in21k/variant": (["data", "in21k-labels", "{F}/imgs", "--variant", "fall12", "--out", "{F}/l.json"],
                      r"--variant: invalid choice"),
    # ------------------------------------------------------------------ submit
    "submit/time": (["submit", "--dry-run", "--time", "abc", "pretrain"], r"time 'abc' is not a SLURM time limit"),
    "submit/mem": (["submit", "--dry-run", "--mem", "12X", "pretrain"], r"mem '12X' is not a SLURM memory size"),
    "submit/nodes": (["submit", "--dry-run", "--nodes", "-1", "pretrain"], r"--nodes: expected a positive integer"),
    "submit/name": (["submit", "--dry-run", "--job-name", "a b", "pretrain"], r"job_name 'a b' must be one"),
    "submit/sbatch": (["submit", "--dry-run", "--sbatch=mail-type=END", "pretrain"], r"sbatch option"),
    "submit/env": (["submit", "--dry-run", "--env", "1X=2", "pretrain"], r"env name '1X'"),
    "submit/inner-option": (["submit", "--dry-run", "eval", "{F}/run", "--batch", "0"],
                            r"^megadigpt: error: eval: argument --batch: expected a positive integer"),
    "submit/after": (["submit", "--dry-run", "--after", "abc", "pretrain"], r"--after takes SLURM job ids"),
    "submit/value": (["submit", "--dry-run", "pretrain", "train.global_batch=-4"], r"train\.global_batch must be"),
    "submit/chain-binary": (["submit", "--dry-run", "{F}/bin.yaml"], r"chain .* not UTF-8"),
    "submit/chain-dup": (["submit", "--dry-run", "{F}/dup.yaml"], r"duplicate key"),
    "submit/chain-empty": (["submit", "--dry-run", "{F}/empty.yaml"], r"is empty"),
    # ------------------------------------------------------------------ plan
    "plan/models-patch": (["plan", "--models", "vit_foo/x"], r"model 'vit_foo/x': write arch/patch"),
    "plan/models-arch": (["plan", "--models", "vit_foo"], r"unknown model 'vit_foo'"),
    "plan/gpus": (["plan", "--gpus", "0"], r"--gpus: expected a positive integer"),
    "plan/mem": (["plan", "--gpu-mem", "-80"], r"--gpu-mem: expected a positive number"),
    "plan/micro": (["plan", "--micro-batch", "0"], r"--micro-batch"),
    "plan/zero": (["plan", "--zero", "a"], r"--zero takes comma-separated integers"),
    "plan/reserve": (["plan", "--reserve", "100"], r"--reserve 100 GiB leaves nothing"),
    "plan/json-dir": (["plan", "--json", "{F}/dir"], r"--json .* is an existing folder"),
    "plan/config": (["plan", "--config", "{F}/bin.yaml"], r"not UTF-8"),
    "plan/value": (["plan", "model.decoder_dim=0"], r"model\.decoder_dim must be > 0"),
    # ------------------------------------------------------------------ bench
    "bench/models": (["bench", "--models", "vit_foo", "--out", "{F}/be"], r"model\.arch must be one of"),
    "bench/micro=0": (["bench", "--micro-batch", "0", "--out", "{F}/be"], r"--micro-batch takes positive integers"),
    "bench/value": (["bench", "--out", "{F}/be", "optim.blr=0"], r"optim\.blr must be > 0"),
    "bench/micro-x": (["bench", "--micro-batch", "x", "--out", "{F}/be"], r"--micro-batch takes comma-separated"),
    "bench/steps": (["bench", "--steps", "0", "--out", "{F}/be"], r"--steps: expected a positive integer"),
    "bench/zero": (["bench", "--zero", "7", "--out", "{F}/be"], r"train\.zero_stage must be one of 0, 1, 2, 3"),
    "bench/out-file": (["bench", "--out", "{F}/file.txt"], r"is an existing file"),
    # ------------------------------------------------------------------ tokenizer fit, show-config
    "tokenizer/k": (["tokenizer", "fit", "--config", "demo", "--k", "0", "--out", "{F}/t.pt"], r"--k: expected"),
    "tokenizer/images": (["tokenizer", "fit", "--config", "demo", "--images", "-1", "--out", "{F}/t.pt"], r"--images"),
    "tokenizer/out-dir": (["tokenizer", "fit", "--config", "demo", "--out", "{F}/dir"], r"is an existing folder"),
    "tokenizer/dup": (["tokenizer", "fit", "--config", "{F}/dup.yaml", "--out", "{F}/t.pt"], r"duplicate key"),
    "show-config/binary": (["show-config", "--config", "{F}/bin.yaml"], r"not UTF-8"),
    "show-config/value": (["show-config", "model.embed_dim=-4"], r"model\.embed_dim must be > 0"),
    "show-config/finetune-value": (["show-config", "--config", "cifar10_finetune", "probe.knn_k=0"],
                                   r"probe\.knn_k must be > 0"),
    "no-command": (["nope"], r"argument command: invalid choice"),
}


def test_every_class_for_every_command_is_one_line(bad, capsys, monkeypatch):
    monkeypatch.chdir(bad)  # (relative default run directories land in the fixture folder)
    before = sorted(p.relative_to(bad) for p in bad.rglob("*"))
    failures = []
    for name, (argv, match) in CASES.items():
        argv = [a.replace("{F}", str(bad)) for a in argv]
        try:
            line = _one_line_error(capsys, argv)
            assert re.search(match, line), f"{line!r} does not match {match!r}"
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
    assert not (bad / "pwned").exists()
    written = [p for p in sorted(p.relative_to(bad) for p in bad.rglob("*")) if p not in before]
    # refused runs may leave an empty run directory behind, never a checkpoint, an output file or a log
    assert not [p for p in written if (bad / p).is_file()], written


def test_resume_of_another_network_is_one_line(bad):
    run = bad / "run_other"
    shutil.copytree(bad / "run", run)
    argv = ["pretrain", "--run-dir", str(run), *TINY_RUN, "model.embed_dim=96", "train.max_steps=4"]
    p = subprocess.run([sys.executable, "-m", "megadigpt", *argv], capture_output=True, text=True,
                       env=subprocess_env(), cwd=str(REPO), timeout=300)
    err = [ln for ln in p.stderr.splitlines() if ln.strip() and "WARN" not in ln and "CUDA" not in ln]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(err) == 1 and "model.embed_dim was 64, now 96" in err[0], err
    assert err[0].startswith("megadigpt: error:") and "holds a checkpoint of another network" in err[0]
    assert "embed_dim: 64" in (run / "config.yaml").read_text()  # the run's record is untouched
    assert sorted(x.name for x in (run / "checkpoints").iterdir()) == \
        sorted(x.name for x in (bad / "run" / "checkpoints").iterdir())


def test_resume_of_another_classifier_is_one_line(bad, capsys):
    run = bad / "ft_run"
    argv = ["finetune", "--train", str(bad / "imgs"), "--val", str(bad / "imgs"), "--run-dir", str(run), *FT]
    saved = (run / "config.yaml").read_text()
    line = _one_line_error(capsys, argv + ["model.depth=3", "train.max_steps=2"])  # fails before any process group
    assert "holds a checkpoint of another network: model.depth was 4, now 3" in line, line
    assert (run / "config.yaml").read_text() == saved


# ---------------------------------------------------------------------------- the rule table itself
_CANDIDATES = [0, -1, 2 ** 40, -0.5, 0.0, 1.0, 1.5, 1e12, "nope", [0], [0.9, 0.2], [-1.0, -1.0], [-1.0, 0.5, 0.5],
               [1.5, 0.5], [-1, 512]]


def _sections():
    from megadigpt.clip_config import ClipRunConfig  # (their imports add their sections' rules to RULES)
    from megadigpt.segment_config import SegmentRunConfig

    for root in (Config, FinetuneRunConfig, SegmentRunConfig, ClipRunConfig):
        for f in __import__("dataclasses").fields(root):
            yield root, f.name, f.default_factory


@pytest.mark.parametrize("root,section,cls", list(_sections()), ids=lambda x: getattr(x, "__name__", x))
def test_each_constrained_key_refuses_a_bad_value_and_accepts_its_default(root, section, cls):
    validate(root())  # every default passes
    rules = rules_of(cls)
    assert set(rules) <= set(cls.__dataclass_fields__), set(rules) - set(cls.__dataclass_fields__)
    for key, rule in rules.items():
        refused = 0
        for value in _CANDIDATES:
            try:
                load_config(None, [f"{section}.{key}={json.dumps(value)}"], root=root)
            except ConfigError as e:
                if f"{section}.{key} must be" in str(e):
                    refused += 1
                    assert str(e).startswith(f"{section}.{key} must be {rule.text}, got"), str(e)
        assert refused, f"no candidate value is refused for {section}.{key}"


def test_every_rule_belongs_to_a_config_section():
    used = {cls for _, _, cls in _sections()} | {c for _, _, cls in _sections() for c in cls.__mro__}
    assert set(RULES) <= used


def test_valid_sbatch_values_and_options_are_accepted():
    """The refusals above must not catch what SLURM and the commands accept."""
    from megadigpt.cli import build_parser
    from megadigpt.launch.slurm import SlurmOptions

    for t in ("30", "30:00", "48:00:00", "2-00", "2-12:00", "2-12:00:00", "UNLIMITED", "infinite"):
        SlurmOptions(time=t).check()
    for m in ("0", "64G", "500M", "1T", "2048", "16gb"):
        SlurmOptions(mem=m).check()
    SlurmOptions(sbatch=["--mail-type=END"], env={"NCCL_SOCKET_IFNAME": "ib0"}, partition="gpu-a100").check()
    for bad_opts, match in ((dict(time=86400), "quote the time limit"), (dict(nodes="two"), "nodes: expected an int"),
                            (dict(time="1:2:3:4"), "not a SLURM time"), (dict(mem="-1G"), "not a SLURM memory")):
        with pytest.raises(ConfigError, match=match):
            SlurmOptions(**bad_opts).check()
    ns = build_parser().parse_args(["eval", "m", "--batch", "1", "--limit", "5", "--workers", "0"])
    assert (ns.batch, ns.limit, ns.workers) == (1, 5, 0)
    ns = build_parser().parse_args(["plan", "--gpus", "1", "--gpu-mem", "0.5", "--reserve", "0"])
    assert (ns.gpus, ns.gpu_mem, ns.reserve) == (1, 0.5, 0.0)


def test_yaml_reader_refuses_duplicates_at_any_depth_and_keeps_values(tmp_path):
    from megadigpt.config import read_yaml

    (tmp_path / "ok.yaml").write_text("a: {b: 1, c: [1, 2]}\nd: x\n")
    assert read_yaml(tmp_path / "ok.yaml") == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    (tmp_path / "deep.yaml").write_text("a:\n  b:\n    c: 1\n    c: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'c' \\(line 4\\)"):
        read_yaml(tmp_path / "deep.yaml")
    (tmp_path / "top.yaml").write_text("model: {}\nmodel: {}\n")
    with pytest.raises(ConfigError, match="duplicate key 'model'"):
        load_config(str(tmp_path / "top.yaml"))

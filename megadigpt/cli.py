"""``megadigpt <command>``: the one entry point for users, launchers and SLURM scripts."""

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError


def _rank0() -> bool:
    from .distributed.env import discover

    return discover().rank == 0


def _fail(msg: str) -> int:
    if _rank0():
        print(f"megadigpt: error: {msg}", file=sys.stderr)
    return 2


def cmd_pretrain(args) -> int:
    from .config import load_config
    from .train.pretrain import pretrain

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    cfg = load_config(args.config, overrides)
    pretrain(cfg)
    return 0


def cmd_convert(args) -> int:
    from .checkpoint.convert import convert

    out = convert(args.input, args.to, args.out, tag=args.tag, num_heads=args.num_heads,
                  segment_grid=args.segment_grid, final_norm=not args.no_final_norm)
    print(f"wrote {out}")
    return 0


def cmd_show_config(args) -> int:
    from .config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_config_reference(args) -> int:
    from .config import reference_markdown

    print(reference_markdown())
    return 0


def cmd_data(args) -> int:
    import json

    from .data import tools

    if args.data_command == "validate":
        res = tools.validate(args.source, args.out, workers=args.workers)
        print(json.dumps(res))
        if args.shards:
            tools.build(str(Path(args.out) / "clean.jsonl"), args.shards, shard_size=args.shard_size)
            print(f"clean shards in {args.shards}")
    elif args.data_command == "build":
        m = tools.build(args.source, args.out, shard_size=args.shard_size, prefix=args.prefix)
        print(json.dumps({k: m[k] for k in ("count", "classes", "labelled")} | {"shards": len(m["shards"])}))
    elif args.data_command == "merge":
        m = tools.merge(args.spec, args.out, seed=args.seed)
        print(json.dumps(m, indent=1))
    elif args.data_command == "in21k-labels":
        labels = tools.in21k_labels(args.root, args.variant)
        Path(args.out).write_text(json.dumps(labels))
        print(f"{labels['classes']} classes ({'complete' if labels['complete'] else 'expected ' + str(labels['expected_classes'])}); "
              f"{sum(i >= 0 for i in labels['in1k_to_in21k'])}/1000 ImageNet-1K classes mapped -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megadigpt", description=__doc__)
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    pt = sub.add_parser("pretrain", help="D-iGPT pretraining (resumes automatically from its run directory)")
    pt.add_argument("--config", default="demo", help="a YAML file or a built-in config name (default: demo)")
    pt.add_argument("--data", default=None, help="shortcut for data.source=...: shards, a folder, or 'demo'")
    pt.add_argument("--run-dir", default=None, help="shortcut for train.run_dir=...")
    pt.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    pt.add_argument("overrides", nargs="*", metavar="section.key=value")
    pt.set_defaults(fn=cmd_pretrain)

    sc = sub.add_parser("show-config", help="print the resolved config")
    sc.add_argument("--config", default="demo")
    sc.add_argument("overrides", nargs="*", metavar="section.key=value")
    sc.set_defaults(fn=cmd_show_config)

    cv = sub.add_parser("convert", help="DeepSpeed checkpoint -> timm / reference D-iGPT / fp32, and back")
    cv.add_argument("input", help="a run dir, a checkpoint dir, a megadigpt .safetensors, or a reference .pth")
    cv.add_argument("--to", required=True, choices=["timm", "reference", "fp32"])
    cv.add_argument("--out", required=True, help="timm: a folder; reference: a .pth; fp32: a .safetensors")
    cv.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    cv.add_argument("--num-heads", type=int, default=None, help="timm: heads (default: from the run or the width)")
    cv.add_argument("--segment-grid", type=int, default=2, help="reference: the segment grid (its mask buffer)")
    cv.add_argument("--no-final-norm", action="store_true", help="timm: export without timm's final LayerNorm")
    cv.set_defaults(fn=cmd_convert)

    data = sub.add_parser("data", help="dataset tooling: validate, build shards, merge, ImageNet-21K labels")
    dsub = data.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("validate", help="decode every sample; write clean.jsonl and bad.jsonl (and clean shards)")
    v.add_argument("source", help="shards, an image folder, or a sample list (.jsonl)")
    v.add_argument("--out", required=True, help="folder for clean.jsonl / bad.jsonl")
    v.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    v.add_argument("--shards", default=None, help="also write clean shards to this folder")
    v.add_argument("--shard-size", type=int, default=10000)
    v.set_defaults(fn=cmd_data)
    b = dsub.add_parser("build", help="write webdataset shards + DALI indexes + manifest.json (restartable)")
    b.add_argument("source", help="an image folder, a file list (.txt: path [label]), shards, or a sample list")
    b.add_argument("--out", required=True)
    b.add_argument("--shard-size", type=int, default=10000)
    b.add_argument("--prefix", default="shard")
    b.set_defaults(fn=cmd_data)
    mg = dsub.add_parser("merge", help="merge sources by weight into a sample list (see README)")
    mg.add_argument("spec", help="YAML: sources [{name, source, weight, expected_count}], total, "
                                 "exclude_duplicates_of")
    mg.add_argument("--out", required=True, help="the merged sample list (.jsonl)")
    mg.add_argument("--seed", type=int, default=0)
    mg.set_defaults(fn=cmd_data)
    lab = dsub.add_parser("in21k-labels", help="ImageNet-21K class indices from the synset folders present")
    lab.add_argument("root", help="folder of nXXXXXXXX synset folders")
    lab.add_argument("--variant", choices=["fall11", "winter21"], required=True)
    lab.add_argument("--out", required=True)
    lab.set_defaults(fn=cmd_data)

    cr = sub.add_parser("config-reference", help="print the config reference (markdown)")
    cr.set_defaults(fn=cmd_config_reference)
    return p


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input, 3 diverged (rolled back), 75 checkpointed on a signal (resume me)."""
    from .train.pretrain import Checkpointed, TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        return _fail(str(e))
    except (Checkpointed, TrainingDiverged) as e:
        if _rank0():
            print(f"megadigpt: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""``megadigpt <command>``: the one entry point for users, launchers and SLURM scripts."""

import argparse
import os
import sys

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


def cmd_show_config(args) -> int:
    from .config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_config_reference(args) -> int:
    from .config import reference_markdown

    print(reference_markdown())
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

    cr = sub.add_parser("config-reference", help="print the config reference (markdown)")
    cr.set_defaults(fn=cmd_config_reference)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())

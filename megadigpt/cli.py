"""``megadigpt <command>``: the one entry point for users, launchers and SLURM scripts."""

import argparse
import re
import sys
from pathlib import Path

# the table of commands lives in commands.py; ArgumentError, RESERVE_GIB and *_overrides are re-exported here
from .commands import ArgumentError, RESERVE_GIB, finetune_overrides, pretrain_overrides  # noqa: F401
from .commands import fail, is_plan_json, overrides_of, parse_csv, parse_models, parse_onoff, rank0, run
from .commands import build_parser as _build_table
from .config import ConfigError


def cmd_pretrain(args) -> int:
    from .config import load_config
    from .train.pretrain import pretrain

    pretrain(load_config(args.config, pretrain_overrides(args)))
    return 0


def cmd_finetune(args) -> int:
    from .config import FinetuneRunConfig, load_config
    from .train.finetune import finetune

    finetune(load_config(args.config, finetune_overrides(args), root=FinetuneRunConfig))  # (its closing line:
    return 0  # the harness's)


def cmd_segment(args) -> int:
    from .train.segment import cli_main

    return cli_main(args)


def cmd_clip(args) -> int:
    from .clip_config import load_clip_config
    from .train.clip import clip

    clip(load_clip_config(args.config, overrides_of(args)))  # (its closing line: the harness's)
    return 0


def _announce_pipes(*sources) -> None:
    """``pipe:`` sources run shell commands: each is said once (``megadigpt: runs: ...``) before any runs (the
    training commands also record them in their start event)."""
    from .safe_fs import announce_commands, pipe_commands

    announce_commands(pipe_commands(*sources), rank0())


def cmd_probe(args) -> int:
    from .config import FinetuneRunConfig, load_config
    from .train.probe import run_probe

    w = args.weights
    if w and "=" in w and "." in w.split("=", 1)[0] and not Path(w).exists():  # an override, not weights
        args.overrides, w = [w] + list(args.overrides), None
    from .checkpoint.convert import guard_output
    from .train.probe import OUTPUT_FILES

    guard_output(args.out, "dir", "--out", force=args.force, files=OUTPUT_FILES,
                 inputs=[w, args.config, args.train, args.val])
    cfg = load_config(args.config, finetune_overrides(args), root=FinetuneRunConfig)
    _announce_pipes(*vars(cfg.data).values())
    run_probe(cfg, w, args.out, random_init=args.random_init)
    return 0


def cmd_eval(args) -> int:
    from .train.evaluate import evaluate_sets

    from .train.evaluate import parse_set_specs

    folders = {k: getattr(args, k) for k in ("imagenet", "real", "v2", "a", "r", "sketch", "c") if getattr(args, k)}
    named = parse_set_specs(args.sets)  # --set NAME=SOURCE
    pairs = parse_set_specs(args.pairs, "--pairs")  # --pairs NAME=SOURCE
    if args.out:
        from .checkpoint.convert import guard_output
        from .train.evaluate import OUTPUT_FILES

        guard_output(args.out, "dir", "--out", force=args.force, files=OUTPUT_FILES,
                     inputs=[args.model, args.real_labels, *folders.values(), *named.values(), *pairs.values()])
    model = Path(args.model) / args.which if (Path(args.model) / args.which).is_dir() else Path(args.model)
    if model.is_dir():  # a damaged or truncated model.safetensors: named now, from its header
        from .config import check_weights_file

        check_weights_file(model, "model")
    from .data import remote

    remote.configure(args.cache_dir, args.io_timeout, args.io_retries)  # before any source is read
    _announce_pipes(*folders.values(), *named.values(), *pairs.values())
    evaluate_sets(args.model, folders, args.out, which=args.which, batch=args.batch, limit=args.limit,
                  loader=args.loader, num_workers=args.workers, real_labels_path=args.real_labels, named=named,
                  pairs=pairs, templates=args.templates)
    return 0


def cmd_submit(args) -> int:
    from dataclasses import fields

    from .launch import slurm

    cli_slurm = {f.name: getattr(args, f.name) for f in fields(slurm.SlurmOptions)
                 if getattr(args, f.name, None) is not None}
    if args.sbatch:
        cli_slurm["sbatch"] = list(args.sbatch)
    if args.env:
        bad = [e for e in args.env if "=" not in e]
        if bad:
            raise ConfigError(f"--env takes KEY=VALUE, got {bad[0]!r}")
        cli_slurm["env"] = dict(e.split("=", 1) for e in args.env)
    if args.no_requeue:
        cli_slurm["requeue"] = False
    if args.after is not None and not re.fullmatch(r"\d+(_\d+)?(:\d+(_\d+)?)*", args.after):
        raise ConfigError(f"--after takes SLURM job ids (e.g. 12345 or 12345:12346), got {args.after!r}")
    if args.what in slurm.COMMANDS:
        if args.from_stage or args.run_root:
            raise ConfigError("--from and --run-root are for chains")
        stage = slurm.single_stage(args.what, args.rest, cli_slurm)
        stages, root, path = [stage], Path(stage.run_dir), None
    else:
        if args.rest:
            raise ConfigError(f"a chain takes no command arguments (edit a copy of the chain YAML): {args.rest}")
        path = slurm.resolve_chain_path(args.what)
        stages, root = slurm.load_chain(path, args.run_root, cli_slurm)
        if args.from_stage:
            stages = slurm.chain_from(stages, args.from_stage)
    try:
        slurm.submit(stages, root, dry_run=args.dry_run, after=args.after, chain=path)
    except slurm.SubmitError as e:
        return fail(str(e))
    return 0


def cmd_convert(args) -> int:
    from .checkpoint.convert import convert, guard_convert_output

    guard_convert_output(args.input, args.to, args.out, args.force)  # before any weights are read
    if Path(args.input).exists():  # damaged or truncated weights: named now, from headers alone
        from .config import check_weights_file

        check_weights_file(args.input, "input")
    out = convert(args.input, args.to, args.out, tag=args.tag, num_heads=args.num_heads,
                  segment_grid=args.segment_grid, final_norm=not args.no_final_norm, force=args.force)
    print(f"wrote {out}")
    return 0


def cmd_plan(args) -> int:
    import json
    from dataclasses import asdict

    from .perf.segment_memory import cmd_plan_segment, is_segment_config

    if is_segment_config(args.config):  # the segmentation step (UperNet at the crop size)
        return cmd_plan_segment(args)
    from .perf.clip_memory import cmd_plan_clip, is_clip_config

    if is_clip_config(args.config):  # the image-text step (both towers)
        return cmd_plan_clip(args)

    from .config import load_config
    from .model.vit import VIT_SIZES
    from .perf import memory

    cfg = load_config(args.config, args.overrides)
    models = parse_models(args.models, cfg.model.img_size) if args.models is not None else [
        (a, cfg.model.patch_size) for a in ("vit_base", "vit_large", "vit_huge", "vit_giant", "vit_e")]
    for arch, _ in models:
        if arch not in VIT_SIZES:
            raise ConfigError(f"unknown model {arch!r}; choose from {', '.join(VIT_SIZES)}")
    if args.reserve >= args.gpu_mem:
        raise ConfigError(f"--reserve {args.reserve:g} GiB leaves nothing of --gpu-mem {args.gpu_mem:g} GiB")
    if args.json:
        from .checkpoint.convert import guard_output

        guard_output(args.json, "file", "--json", force=args.force, inputs=[args.config], own=is_plan_json)
    stages = parse_csv(args.zero, int, "--zero")
    if not stages or any(z not in (1, 2, 3) for z in stages):
        raise ConfigError(f"--zero takes stages 1, 2, 3, got {args.zero}")
    if cfg.target.tokenizer and not args.classes and not Path(cfg.target.tokenizer).is_file():
        raise ConfigError(f"target.tokenizer {cfg.target.tokenizer} is not fit yet; plan with --classes K (its "
                          f"number of token ids) or fit it first (megadigpt tokenizer fit)")
    rows = []
    for arch, patch in models:
        try:
            rows += memory.plan(cfg, args.gpus, args.gpu_mem, [arch], stages, [parse_onoff(v) for v in parse_csv(args.ckpt)],
                                [parse_onoff(v) for v in parse_csv(args.offload)], args.micro_batch, patch, args.precision,
                                args.teacher_dtype, args.reserve, args.classes)
        except ValueError as e:  # a geometry the model refuses (e.g. a patch that does not divide the image)
            raise ConfigError(f"model {arch}/{patch}: {(str(e).splitlines() or [''])[0]}") from None
    print(f"# per-GPU memory: {args.gpus} GPUs of {args.gpu_mem:g} GiB ({args.reserve:g} GiB reserved outside "
          f"torch's tensors: CUDA context, NCCL, DALI), teacher {cfg.target.kind} {cfg.target.model or ''}"
          f"{f' -> {args.classes} token ids' if args.classes else ''}, {args.precision}, global batch "
          f"{cfg.train.global_batch}; GiB per GPU")
    print(memory.markdown(rows, args.gpus, args.gpu_mem))
    if args.json:
        from .checkpoint.convert import write_output

        write_output(args.json, json.dumps([asdict(r) for r in rows], indent=1), "plan")
    return 0


def cmd_bench(args) -> int:
    from .perf import bench

    cases = bench.expand_grid(parse_models(args.models), parse_csv(args.teacher), parse_csv(args.zero, int, "--zero"),
                              [parse_onoff(v) for v in parse_csv(args.ckpt)], parse_csv(args.attention),
                              parse_csv(args.micro_batch, int, "--micro-batch", positive=True), parse_csv(args.precision),
                              [parse_onoff(v) for v in parse_csv(args.compile)], parse_csv(args.data), args.img_size)
    if not cases:
        raise ConfigError("the grid is empty")
    from .checkpoint.convert import guard_output

    guard_output(args.out, "dir", "--out", force=args.force, files=bench.OUTPUT_FILES, whole_folder=True,
                 inputs=[args.config, args.data_source])
    rep = bench.run_bench(cases, args.ranks, Path(args.out), args.config, args.overrides, args.steps, args.warmup,
                          args.data_source, args.timeout, not args.no_baseline, rounds=args.rounds)
    print(Path(args.out, "bench.md").read_text(), end="")
    print(f"wrote {args.out}/bench.json, bench.md" + (", bench.png" if rep.get("plot") else
                                                     " (no plot: pip install 'megadigpt[bench]')"))
    return 0 if all(r["result"]["status"] == "ok" for r in rep["rows"]) else 1


def cmd_tokenizer_fit(args) -> int:
    import json

    from .config import load_config
    from .tokenizer.fit import fit_tokenizer

    from .checkpoint.convert import guard_output

    if args.out:  # (an existing tokenizer file: plan_fit asks for --force, whoever wrote it)
        guard_output(args.out, "file", "--out", force=True, inputs=[args.config, args.data])
    cfg = load_config(args.config, list(args.overrides) + ([f"data.source={args.data}"] if args.data else []))
    if not args.out and cfg.target.tokenizer:
        guard_output(cfg.target.tokenizer, "file", "target.tokenizer", force=True,
                     inputs=[args.config, cfg.data.source])
    res = fit_tokenizer(cfg, k=args.k, images=args.images, tokens_per_image=args.tokens_per_image,
                        iters=args.iters, seed=args.seed, out=args.out, device=args.device, batch=args.batch,
                        force=args.force, progress=args.progress == "on" or (args.progress == "auto" and
                                                                              sys.stderr.isatty()))
    print(json.dumps(res))
    return 0


def cmd_show_config(args) -> int:
    from . import segment_config  # noqa: F401 (its tree joins config.TREES: segmentation's third, ...)
    from . import clip_config  # noqa: F401,I001 (... and the image-text tree fourth)
    from .config import CONFIG_DIR, TREES, config_layers, dump_config, load_config, parse_overrides, tree_of

    if args.list:
        width = max(len(p.stem) for p in CONFIG_DIR.glob("*.yaml"))
        for root_title, root, _ in TREES:
            print(f"{root_title}:")
            for p in sorted(CONFIG_DIR.glob("*.yaml")):
                layers = config_layers(str(p))
                if (tree_of(layers) or TREES[0][1]) is root:
                    head = []  # the file's opening comment, to its first sentence's end
                    for ln in p.read_text().splitlines():
                        if not ln.startswith("#"):
                            break
                        head.append(ln.lstrip("# ").strip())
                    first = " ".join(head).split(". ")[0].rstrip(".")
                    print(f"  {p.stem:<{width}}  {first if len(first) <= 100 else first[:99] + '…'}")
        return 0
    # the tree the file (or, without one, the overrides) names by its own sections; pretraining where none does
    root = tree_of((config_layers(args.config) if args.config else []) + [parse_overrides(args.overrides)])
    print(dump_config(load_config(args.config, args.overrides, root=root or TREES[0][1])), end="")
    return 0


def cmd_report(args) -> int:
    from .checkpoint.convert import guard_output
    from .train.report import default_out, output_files, report

    runs, probes = [Path(d) for d in args.run_dir], args.probe or []
    guard_output(args.out or default_out(runs), "dir", "--out", force=args.force, files=output_files(runs),
                 inputs=[f for d in runs for f in (d / "metrics.jsonl", d / "config.yaml", d / "results.json")] +
                 [f for p in probes for f in (p, Path(p) / "results.json")])
    res = report(runs, args.out, probes, smoothing=args.smoothing)
    print(f"{len(res['plots'])} plots ({', '.join(res['plots'])}), report.json and summary.md in {res['out']}")
    return 0


def cmd_config_reference(args) -> int:
    from .config import reference_markdown

    print(reference_markdown())
    return 0


def cmd_data(args) -> int:
    import json

    from .data import remote, tools

    if hasattr(args, "io_retries"):
        remote.configure(args.cache_dir, args.io_timeout, args.io_retries)  # before any source is read
    _announce_pipes(getattr(args, "source", None))  # (a merge spec's are said by tools.merge)

    file_out = args.data_command == "in21k-labels" or (args.data_command == "merge" and str(args.out).endswith(".jsonl"))
    from .checkpoint.convert import guard_output

    # never into a run's checkpoints/ nor over an input; the folder tools keep their own rules for what is there
    # (build restarts, index and merge replace an index); the labels file is replaced only by megadigpt's or --force
    srcs = getattr(args, "source", None)
    guard_output(args.out, "file" if file_out else "dir", "--out",
                 force=getattr(args, "force", True) if args.data_command == "in21k-labels" else True,
                 inputs=[*(srcs if isinstance(srcs, list) else [srcs]), getattr(args, "spec", None),
                         getattr(args, "root", None)])
    if args.data_command == "merge" and not file_out and Path(args.out).is_dir() and \
            not (Path(args.out) / "index.json").is_file():  # a merge replaces an old index, never another folder
        raise ConfigError(f"--out {args.out} is an existing folder that is not a sample index; give a new folder, "
                          f"an index folder to replace, or a .jsonl file path")
    if getattr(args, "shards", None):
        guard_output(args.shards, "dir", "--shards", force=True, inputs=[args.source, args.out])
    if args.data_command == "validate":
        res = tools.validate(args.source, args.out, workers=args.workers)
        print(json.dumps(res))
        if args.shards:
            tools.build(str(Path(args.out) / "clean.jsonl"), args.shards, shard_size=args.shard_size)
            print(f"clean shards in {args.shards}")
    elif args.data_command == "build":
        m = tools.build(args.source, args.out, shard_size=args.shard_size, prefix=args.prefix)
        print(json.dumps({k: m[k] for k in ("count", "classes", "labelled")} | {"shards": len(m["shards"])}))
    elif args.data_command == "index":
        print(json.dumps(tools.index_shards(args.source if len(args.source) > 1 else args.source[0], args.out,
                                            workers=args.workers)))
    elif args.data_command == "merge":
        m = tools.merge(args.spec, args.out, seed=args.seed)
        print(json.dumps(m, indent=1))
    elif args.data_command == "in21k-labels":
        labels = tools.in21k_labels(args.root, args.variant)
        from .checkpoint.convert import write_output

        write_output(args.out, json.dumps(labels), "data in21k-labels")
        print(f"{labels['classes']} classes ({'complete' if labels['complete'] else 'expected ' + str(labels['expected_classes'])}); "
              f"{sum(i >= 0 for i in labels['in1k_to_in21k'])}/1000 ImageNet-1K classes mapped -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The table of commands (megadigpt/commands.py), each with the function here that runs it."""
    return _build_table({name: fn for name, fn in globals().items() if name.startswith("cmd_")})


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input, 3 diverged (rolled back), 75 checkpointed on a signal (resume me)."""
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

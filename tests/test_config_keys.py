"""Every key of every config tree is read by a command that accepts that tree (issue 29: no key that a command
silently ignores; a key one command has no use for belongs to another tree's section, not to a shared one).

Static and cheap (no torch, nothing run): for each tree, the entry modules of the commands that load it, and the
closure of ``megadigpt`` modules they import (the ``ast`` import graph of tests/test_imports.py: top-level and
function-local imports). A key is read when its name appears in one of those files as an attribute read
(``t.<key>``) or as a string constant ``"<key>"`` (``getattr(t, "<key>")``, a key table). ``megadigpt/config.py``
and ``megadigpt/segment_config.py`` do not count: they define and validate every key.

Another tree's training loop is a boundary: ``megadigpt bench`` and ``submit`` import the pretraining loop, yet a
segmentation key read only there is read by no segmentation command. A loop that a tree's own loop imports (its
helpers then run on this tree's config) is no boundary for it. ``megadigpt/cli.py`` is no entry either: its
``cmd_*`` functions pass each config to the modules below, and its closure is the whole package.
"""

import ast
import dataclasses
import functools

from .test_imports import import_graph, module_files

# tree (its root class's name) -> (its training loop, the other modules of commands that load it)
COMMANDS = {
    "Config": ("megadigpt.train.pretrain",
               ("megadigpt.perf.bench", "megadigpt.perf.memory", "megadigpt.launch.slurm", "megadigpt.tokenizer.fit")),
    "FinetuneRunConfig": ("megadigpt.train.finetune",
                          ("megadigpt.train.probe", "megadigpt.train.evaluate", "megadigpt.launch.slurm")),
    "SegmentRunConfig": ("megadigpt.train.segment",
                         ("megadigpt.perf.bench", "megadigpt.perf.segment_memory", "megadigpt.launch.slurm")),
    "ClipRunConfig": ("megadigpt.train.clip",
                      ("megadigpt.perf.bench", "megadigpt.perf.clip_memory", "megadigpt.launch.slurm")),
}
SHARED = ("megadigpt.train.harness",)  # the training loops' shared harness, where it exists: every tree's
DEFINERS = {"megadigpt.config", "megadigpt.segment_config", "megadigpt.clip_config"}  # define and validate every key: no evidence of a read
DISPATCHERS = {"megadigpt.cli"}  # load configs only to hand them to the modules in COMMANDS
LOADERS = ("load_config", "load_segment_config", "load_clip_config")


@functools.lru_cache(maxsize=None)
def _graph():
    return import_graph()


@functools.lru_cache(maxsize=None)
def _tree(mod: str) -> ast.AST:
    f = module_files()[mod]
    return ast.parse(f.read_text(), str(f))


@functools.lru_cache(maxsize=None)
def _names_read(mod: str) -> frozenset:
    """Attribute names loaded and string constants of one module."""
    out = set()
    for node in ast.walk(_tree(mod)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            out.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.add(node.value)
    return frozenset(out)


def _closure(starts, graph, stop=frozenset()):
    seen, todo = set(), list(starts)
    while todo:
        m = todo.pop()
        if m in seen or m in stop:
            continue
        seen.add(m)
        todo.extend(graph.get(m, ()))
    return seen


@functools.lru_cache(maxsize=None)
def readers(tree: str) -> frozenset:
    """The modules whose reads count for ``tree``: its commands' modules and what they import, up to another
    tree's training loop (unless this tree's own loop imports that loop)."""
    graph, mods = _graph(), module_files()
    loop, others = COMMANDS[tree]
    own = _closure([loop], graph)
    stop = {other_loop for other_loop, _ in COMMANDS.values() if other_loop not in own}
    starts = [loop, *others, *(m for m in SHARED if m in mods)]
    return frozenset(_closure(starts, graph, frozenset(stop)) - DEFINERS)


def unread_keys(root, tree: str):
    """``section.key`` of every key of the tree ``root`` that no module of ``readers(tree)`` reads."""
    read = set().union(*(_names_read(m) for m in readers(tree)))
    return [f"{section.name}.{f.name}" for section in dataclasses.fields(root)
            for f in dataclasses.fields(section.default_factory) if f.name not in read]


def _trees():
    import megadigpt.clip_config  # noqa: F401 (the trees of segmentation and image-text join TREES)
    import megadigpt.segment_config  # noqa: F401
    from megadigpt.config import TREES

    return TREES


def test_every_key_of_every_tree_is_read_by_a_command_of_that_tree():
    trees = _trees()
    assert {root.__name__ for _, root, _ in trees} == set(COMMANDS), "a tree without its commands in COMMANDS"
    unread = {root.__name__: unread_keys(root, root.__name__) for _, root, _ in trees}
    assert not any(unread.values()), (
        f"config keys that no command accepting their tree reads (remove them, move them to the tree that reads "
        f"them, or read them): {({k: v for k, v in unread.items() if v})}")


def test_the_entry_modules_exist_and_every_loader_is_one():
    """COMMANDS names real modules, and every module that loads a config tree is listed (a new command that loads
    one is not silently left out of the check)."""
    mods = module_files()
    listed = {m for loop, others in COMMANDS.values() for m in (loop, *others)}
    assert listed <= set(mods), f"COMMANDS names modules that do not exist: {sorted(listed - set(mods))}"
    loading = set()
    for m in mods:
        for node in ast.walk(_tree(m)):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
                if name in LOADERS:
                    loading.add(m)
    assert loading, "no module calls load_config: the scan is broken"
    missing = loading - listed - DEFINERS - DISPATCHERS
    assert not missing, f"modules that load a config tree but are not in COMMANDS: {sorted(missing)}"


def test_the_check_reports_a_key_nobody_reads():
    """The checker itself: a planted key no module reads is reported, and so is a pretraining-only key planted in
    the trees that have no use for it (read only beyond another tree's loop, where bench and submit reach)."""
    from megadigpt.config import FinetuneRunConfig, FinetuneTrainConfig
    from megadigpt.segment_config import SegmentRunConfig, SegmentTrainConfig

    def planted(root, section_cls, *names):
        sec = dataclasses.make_dataclass(f"Planted{section_cls.__name__}", [(n, int, 0) for n in names],
                                         bases=(section_cls,))
        fields = [(f.name, f.type, dataclasses.field(default_factory=sec if f.name == "train" else f.default_factory))
                  for f in dataclasses.fields(root)]
        return dataclasses.make_dataclass(f"Planted{root.__name__}", fields)

    seg = planted(SegmentRunConfig, SegmentTrainConfig, "never_read_xyz", "probe_every")
    assert unread_keys(seg, "SegmentRunConfig") == ["train.never_read_xyz", "train.probe_every"]
    ft = planted(FinetuneRunConfig, FinetuneTrainConfig, "never_read_xyz", "peak_tflops", "probe_val")
    assert unread_keys(ft, "FinetuneRunConfig") == ["train.never_read_xyz", "train.peak_tflops", "train.probe_val"]
    assert "megadigpt.train.pretrain" not in readers("SegmentRunConfig")  # the boundary bench reaches
    assert "megadigpt.perf.bench" in readers("SegmentRunConfig")  # bench --task segment reads train.peak_tflops
    toy = {"seg": {"ft", "util"}, "bench": {"pre", "seg"}, "pre": {"ft", "pre_only"}, "ft": {"util"}}
    assert _closure(["bench"], toy, {"pre"}) == {"bench", "seg", "ft", "util"}  # "pre_only": behind the boundary

"""The documentation's promises that can rot: every relative link in README.md, docs/*.md and slurm/README.md
resolves to a file (and its #anchor to a heading of that file, by GitHub's anchor rules), the commands in the
README's code blocks are real `megadigpt` subcommands with real options and built-in configs, and the README front
page stays at most 12 KB (the rest lives in docs/). Each checker is also run on a broken example, so it can fail.
Plain text parsing, no network: a few seconds."""

import re
import shlex
from pathlib import Path

import pytest

from megadigpt.cli import build_parser
from megadigpt.config import CONFIG_DIR

from .conftest import REPO

README_MAX_BYTES = 12_000  # 12 KB, whichever way a KB is counted
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "slurm" / "README.md"]

FENCE = re.compile(r"^\s*```")
# [text](target "title"); text may span lines but holds no brackets; images (![...]) are links too
LINK = re.compile(r"\[([^\[\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (where brackets are not links)."""
    keep, fence = [], False
    for line in text.split("\n"):
        if FENCE.match(line):
            fence = not fence
            keep.append("")
            continue
        keep.append("" if fence else re.sub(r"`[^`]*`", "``", line))
    return "\n".join(keep)


def code_blocks(text: str):
    """(info string, body) of every fenced code block."""
    blocks, cur, info = [], None, ""
    for line in text.split("\n"):
        if FENCE.match(line):
            if cur is None:
                cur, info = [], line.strip()[3:].strip()
            else:
                blocks.append((info, "\n".join(cur)))
                cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lowercase, punctuation (anything but letters, digits, spaces, '-' and '_') removed,
    spaces -> '-'. Markdown links in a heading count by their text."""
    text = re.sub(r"\[([^\[\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _headings(path: Path):
    """Headings of a markdown file outside code blocks, original text (inline code kept)."""
    fence = False
    for line in path.read_text().split("\n"):
        if FENCE.match(line):
            fence = not fence
        elif not fence:
            m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m:
                yield m.group(1)


def heading_ids(path: Path) -> set:
    """Every heading id of a markdown file, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen, out = {}, set()
    for h in _headings(path):
        a = github_anchor(h)
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def broken_links(files) -> list:
    """'file: target (why)' for every relative link that does not resolve."""
    problems = []
    for f in files:
        for _, target in LINK.findall(_prose(f.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            path_part, _, anchor = target.partition("#")
            dest = (f.parent / path_part).resolve() if path_part else f
            if not dest.exists():
                problems.append(f"{f.name}: {target} (no such file)")
            elif anchor:
                if dest.suffix != ".md":
                    problems.append(f"{f.name}: {target} (an anchor into a file that is not markdown)")
                elif anchor not in heading_ids(dest):
                    problems.append(f"{f.name}: {target} (no heading #{anchor} in {dest.name})")
    return problems


def _subcommands(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    return {}


def _options(parser) -> set:
    return {s for a in parser._actions for s in a.option_strings}


def megadigpt_invocations(text: str):
    """Token lists after each `megadigpt` command word in the bash code blocks (continuation lines joined,
    comments dropped), e.g. ['pretrain', '--config', 'demo']."""
    for info, body in code_blocks(text):
        if info not in ("bash", "sh", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").split("\n"):
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            for i, tok in enumerate(tokens):
                if tok == "megadigpt" and i + 1 < len(tokens):
                    rest = tokens[i + 1:]
                    end = next((k for k, t in enumerate(rest) if t in ("&&", "||", ";", "|", ">", "2>")), len(rest))
                    yield rest[:end]
                    break


_WRAPPED = ("pretrain", "finetune", "probe", "eval", "segment")  # the commands `megadigpt submit` wraps


def _option_problems(line, parser, tokens, builtin) -> list:
    problems, opts = [], _options(parser)
    for k, t in enumerate(tokens):
        if not t.startswith("--"):
            continue
        name = t.split("=", 1)[0]
        if name not in opts:
            problems.append(f"{line}: unknown option {name} of {parser.prog}")
        elif name == "--config":
            value = t.split("=", 1)[1] if "=" in t else (tokens[k + 1] if k + 1 < len(tokens) else "")
            if not value.endswith((".yaml", ".yml")) and value not in builtin:
                problems.append(f"{line}: {value!r} is not a built-in config ({', '.join(sorted(builtin))})")
    return problems


def command_problems(text: str) -> list:
    """Unknown subcommands, options or built-in config names in the `megadigpt ...` lines of `text`'s bash
    blocks (a config given as a .yaml path is not checked: it is the reader's file)."""
    builtin = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    top = build_parser()
    problems = []
    for tokens in megadigpt_invocations(text):
        line, parser, rest = "megadigpt " + " ".join(tokens), top, list(tokens)
        while _subcommands(parser):  # `megadigpt data validate`, `megadigpt tokenizer fit`
            subs = _subcommands(parser)
            if not rest or rest[0] not in subs:
                problems.append(f"{line}: {rest[0] if rest else 'nothing'} is not a subcommand of {parser.prog} "
                                f"({', '.join(subs)})")
                parser = None
                break
            parser, rest = subs[rest[0]], rest[1:]
        if parser is None:
            continue
        if parser.prog.endswith(" submit"):  # its own options, then the wrapped command and its arguments
            i = next((k for k, t in enumerate(rest) if t in _WRAPPED), None)
            if i is not None:
                problems += _option_problems(line, parser, rest[:i], builtin)
                parser, rest = _subcommands(top)[rest[i]], rest[i + 1:]
        problems += _option_problems(line, parser, rest, builtin)
    return problems


def test_docs_links_resolve():
    assert (REPO / "docs").is_dir() and len(DOC_FILES) > 3
    assert broken_links(DOC_FILES) == []


def test_docs_every_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for _, t in LINK.findall(_prose((REPO / "README.md").read_text()))}
    assert [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked] == []


def test_docs_link_checker_fails_on_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Conversion: `megadigpt convert`\n\ntext\n")
    readme = tmp_path / "README.md"
    readme.write_text("\n".join([
        "[good](docs/page.md) [good anchor](docs/page.md#conversion-megadigpt-convert) [web](https://x.org/y)",
        "[missing file](docs/nope.md)",
        "[missing anchor](docs/page.md#conversion)",
        "[self](#not-here)",
        "`[in code](docs/also-nope.md)` and",
        "```", "[in a block](docs/nope2.md)", "```",
    ]))
    problems = broken_links([readme])
    assert problems == ["README.md: docs/nope.md (no such file)",
                        "README.md: docs/page.md#conversion (no heading #conversion in page.md)",
                        "README.md: #not-here (no heading #not-here in README.md)"]


def test_docs_github_anchors():
    assert github_anchor("The GPU acceptance run (`benchmarks/gpu/`)") == "the-gpu-acceptance-run-benchmarksgpu"
    assert github_anchor("`megadigpt plan`: which model fits, at which micro-batch") == \
        "megadigpt-plan-which-model-fits-at-which-micro-batch"
    assert github_anchor("Fine-tuning, probing, evaluation") == "fine-tuning-probing-evaluation"


def test_docs_readme_commands_are_real():
    readme = (REPO / "README.md").read_text()
    seen = {tokens[0] for tokens in megadigpt_invocations(readme)}
    # the quick start and the journeys: pretraining, conversion, fine-tuning / probing / evaluation, SLURM
    assert {"pretrain", "convert", "finetune", "probe", "eval", "submit"} <= seen, seen
    assert command_problems(readme) == []


def test_docs_pages_commands_are_real():
    for page in sorted((REPO / "docs").glob("*.md")) + [REPO / "slurm" / "README.md"]:
        assert command_problems(page.read_text()) == [], page.name


def test_docs_command_checker_fails_on_unknown_commands():
    text = "\n".join(["```bash",
                      "megadigpt pretrian --config demo",
                      "megadigpt pretrain --config no_such_config --data demo",
                      "megadigpt convert runs/x --to timm --out e --frobnicate",
                      "megadigpt data vaildate /d --out /o",
                      "megadigpt submit --nodes 2 pretrain --config demo  # fine",
                      "megadigpt plan --config my.yaml  # a path: fine",
                      "```"])
    problems = command_problems(text)
    assert len(problems) == 4, problems
    assert "pretrian" in problems[0] and "no_such_config" in problems[1] and "--frobnicate" in problems[2]
    assert "vaildate" in problems[3]


def test_docs_readme_front_page_size():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; keep the front page short, move text to docs/"


@pytest.mark.parametrize("command", [
    "pip install -e . && megadigpt pretrain",
    "pip install -e '.[test]' && python -m pytest -q tests",
])
def test_docs_quick_start_commands_unchanged(command):
    """.ci/run and the brief run these two lines as the README gives them."""
    blocks = [body for _, body in code_blocks((REPO / "README.md").read_text())]
    assert any(line.split("#")[0].strip() == command for body in blocks for line in body.split("\n"))

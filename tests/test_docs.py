"""The manual says only what the code does: every `./run.sh ...` line quoted in README.md, docs/*.md
and experiments/*/README.md names a command run.sh accepts, flags llm/cli.py defines, config keys the
named config has and config files that exist; every relative link reaches a file and a heading; the
README's Layout has one line for every module under llm/.

Placeholders are not checked: a value in CAPITALS (`--workdir=DIR`, `--config=configs/sweeps/NAME.py`),
`...`, or a file of the reader's own (`my_*`). No JAX: only run.sh, llm/cli.py and the config files
are read.
"""

import functools
import importlib.util
import re
import shlex
from pathlib import Path

import ml_collections
import pytest
from absl import app, flags, logging  # noqa: F401 (app and logging define absl's own flags)

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("experiments/*/README.md"))]
FENCE = re.compile(r"^\s*```")


# ---------------------------------------------------------------------------------------------------------
# What the code accepts


@functools.cache
def run_sh_commands() -> frozenset[str]:
    """The words of run.sh's `case "$cmd"` patterns (`train|eval|...)`), without `*` and `""`."""
    text = (ROOT / "run.sh").read_text()
    body = text[text.index('case "$cmd" in'):text.index("esac")]
    words = set()
    for pattern in re.findall(r"^\s*([^\s()]+)\)", body, re.M):
        words.update(w for w in pattern.split("|") if w not in ("*", '""'))
    return frozenset(words)


@functools.cache
def cli_flags() -> tuple[frozenset[str], frozenset[str]]:
    """(every flag the CLI takes, the boolean ones): llm/cli.py's DEFINE_* calls and absl's own flags."""
    text = (ROOT / "llm" / "cli.py").read_text()
    defined = re.findall(r"DEFINE_(\w+)\(\s*\"(\w+)\"", text)
    app.define_help_flags()  # --help, --helpfull, ...: app.run defines them when the CLI starts
    absl_flags = [f for module, fs in flags.FLAGS.flags_by_module_dict().items() if module.startswith("absl.") for f in fs]
    names = {name for _, name in defined} | {f.name for f in absl_flags} | {f.short_name for f in absl_flags if f.short_name}
    names |= {"flagfile", "undefok"}  # read by absl's parser itself, never defined as flags
    bools = {name for kind, name in defined if kind in ("bool", "boolean")} | {f.name for f in absl_flags if f.boolean}
    return frozenset(names), frozenset(bools)


@functools.cache
def cli_commands() -> frozenset[str]:
    """The commands llm/cli.py dispatches (its COMMANDS dict): what `launch-local N COMMAND` may run."""
    text = (ROOT / "llm" / "cli.py").read_text()
    return frozenset(re.findall(r"\"(\w+)\": cmd_\w+", text))


@functools.cache
def config_of(path: str) -> ml_collections.ConfigDict:
    """get_config() of a config file, loaded as ml_collections' --config flag loads it."""
    spec = importlib.util.spec_from_file_location(f"_docs_config_{len(path)}_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def is_placeholder(value: str) -> bool:
    parts = re.split(r"[/.:=]", value)
    return "..." in value or "*" in parts or any(re.fullmatch(r"[A-Z][A-Z0-9_]*", p) for p in parts) or Path(value).name.startswith("my_")


def has_key(config, key: str) -> bool:
    node = config
    for part in key.split("."):
        if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
            node = node[part]
        else:
            return False
    return True


# ---------------------------------------------------------------------------------------------------------
# What the docs quote


def quoted_commands(markdown: str) -> list[str]:
    """Every `./run.sh ...` command in a fenced block (a line, with its backslash continuations) or in an
    inline code span (which may wrap across lines; a table's `\\|` is a `|`), from `./run.sh` on. A line
    or span of bare overrides (`--config.model.d_model=256 ...`) is read as `./run.sh train` with them."""
    found, prose, block, in_block = [], [], [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_block = not in_block
            continue
        (block if in_block else prose).append(line)
    joined = "\n".join(block).replace("\\\n", " ")
    found += [line for line in joined.splitlines() if "./run.sh" in line]
    found += [span.replace("\n", " ").replace("\\|", "|") for span in re.findall(r"`([^`]+)`", "\n".join(prose)) if "./run.sh" in span]
    overrides = [line for line in joined.splitlines() if line.startswith("--config")]
    overrides += [span for span in re.findall(r"`([^`]+)`", "\n".join(prose)) if span.startswith("--config")]
    found += ["./run.sh train " + line.replace("\n", " ").replace("\\|", "|") for line in overrides]
    commands = []
    for text in found:
        for piece in text.split("./run.sh")[1:]:
            commands.append("./run.sh" + re.split(r"\s(?:&&|;|\|\|)\s", piece)[0])
    return commands


def words_of(command: str) -> list[str]:
    """The shell words of a command, its trailing comment dropped; a quote left open by a surrounding
    command (`--command="cd llm && ./run.sh train ..."`) is closed."""
    for attempt in (command, command.rstrip().rstrip("\"'")):
        try:
            lexer = shlex.shlex(attempt, posix=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            return list(lexer)
        except ValueError:
            continue
    raise ValueError(f"cannot split {command!r}")


def problems(command: str) -> list[str]:
    """What is wrong with one quoted command line; [] when run.sh and the CLI would take it."""
    words = [w.strip("[]") for w in words_of(command)[1:]]
    words = [w for w in words if w and w not in ("|", "...")]
    if not words:
        return []
    verb, rest = words[0], words[1:]
    if re.fullmatch(r"[A-Z_]+", verb):
        return []
    if verb not in run_sh_commands():
        return [f"run.sh has no command {verb!r}"]
    if verb in ("test", "setup", "help", "-h", "--help"):
        return []  # pytest's arguments, or none
    found = []
    if verb == "launch-local":
        positional = [w for w in rest if not w.startswith("-")]
        if len(positional) == 1:
            return [f"launch-local needs N and a command: {command!r}"]
        if positional and not re.fullmatch(r"[A-Z_]+", positional[1]) and positional[1] not in cli_commands():
            found.append(f"llm/cli.py has no command {positional[1]!r}")
    names, bools = cli_flags()
    config_path = None
    for word in rest:
        if word.startswith("--config="):
            value = word.split("=", 1)[1]
            if not is_placeholder(value):
                if (ROOT / value).is_file():
                    config_path = value
                else:
                    found.append(f"--config={value}: no such file")
    config = config_of(config_path or "configs/default.py")
    for word in rest:
        if not word.startswith("--") or word == "--":
            continue
        name = word[2:].split("=", 1)[0]
        if name.startswith("config."):
            key = name[len("config."):]
            if not is_placeholder(key) and not has_key(config, key):
                found.append(f"--config.{key}: {config_path or 'configs/default.py'} has no key {key!r}")
        elif name not in names and not (name.startswith("no") and name[2:] in bools):
            found.append(f"--{name}: llm/cli.py defines no such flag")
    return found


def test_every_quoted_command_is_found():
    markdown = "\n".join([
        "Run `./run.sh eval --workdir=DIR [--split=validation\\|test]` or `./run.sh sample",
        "--workdir=DIR --prompt=TEXT`.",
        "```bash",
        "./run.sh train --config.data.dataset='jsonl:/d/*.jsonl' \\",
        "  --config.data.num_workers=2   # streamed",
        "gcloud ssh --command=\"cd llm && ./run.sh train --config.mesh.fsdp=-1\"",
        "--config.mesh.data=2 --config.mesh.fsdp=4   # 8 devices",
        "```",
        "Any key: `--config.seed=1`, or `--config.*`; pip's `--no-deps` is not ours.",
    ])
    commands = quoted_commands(markdown)
    assert [words_of(c) for c in commands] == [
        ["./run.sh", "train", "--config.data.dataset=jsonl:/d/*.jsonl", "--config.data.num_workers=2"],
        ["./run.sh", "train", "--config.mesh.fsdp=-1"],
        ["./run.sh", "eval", "--workdir=DIR", "[--split=validation|test]"],
        ["./run.sh", "sample", "--workdir=DIR", "--prompt=TEXT"],
        ["./run.sh", "train", "--config.mesh.data=2", "--config.mesh.fsdp=4"],
        ["./run.sh", "train", "--config.seed=1"],
        ["./run.sh", "train", "--config.*"],
    ]


@pytest.mark.parametrize("line, wrong", [
    ("./run.sh train --no_such_flag=1", "--no_such_flag"),
    ("./run.sh trian --workdir=DIR", "no command 'trian'"),
    ("./run.sh train --config.model.no_such_key=1", "no key 'model.no_such_key'"),
    ("./run.sh train --config=configs/no_such_config.py", "no such file"),
    # A sweep's overrides name the sweep config's keys: its base run's model is under `base`.
    ("./run.sh sweep --config=configs/sweeps/isoflop_cpu.py --config.model.d_model=64", "has no key 'model.d_model'"),
    ("./run.sh launch-local 2 trian", "no command 'trian'"),
])
def test_a_wrong_command_is_reported(line, wrong):
    assert any(wrong in p for p in problems(line)), problems(line)


def test_a_misspelt_override_in_prose_is_reported():
    [command] = quoted_commands("Set `--config.model.d_modle=256` to widen it.")
    assert problems(command) == ["--config.model.d_modle: configs/default.py has no key 'model.d_modle'"]


@pytest.mark.parametrize("line", [
    "./run.sh train --config=configs/shakespeare_char.py --config.seed=1 --config.model.d_model=64",
    "./run.sh sweep --config=configs/sweeps/isoflop_cpu.py --config.base.seed=1 --dry_run --nodry_run",
    "./run.sh eval --workdir=DIR [--split=validation|test] [--step=N] --helpfull",
    "./run.sh train --config=configs/my_run.py --config.KEY=VALUE",
    "./run.sh launch-local 2 train --workdir=DIR",
])
def test_a_right_command_passes(line):
    assert problems(line) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_run(doc):
    commands = quoted_commands(doc.read_text())
    found = [f"{command!r}: {p}" for command in commands for p in problems(command)]
    assert not found, "\n".join(found)


def test_the_manual_quotes_commands():
    assert sum(len(quoted_commands(doc.read_text())) for doc in DOCS) > 50


# ---------------------------------------------------------------------------------------------------------
# Links and the map


def outside_code(markdown: str) -> list[str]:
    lines, in_block = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_block = not in_block
        elif not in_block:
            lines.append(line)
    return lines


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    ids = set()
    for line in outside_code(path.read_text()):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            ids.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return frozenset(ids)


def broken_links(doc: Path) -> list[str]:
    """Relative links (outside code) whose file does not exist, or whose #anchor is no heading of it."""
    text = re.sub(r"`[^`]*`", "", "\n".join(outside_code(doc.read_text())))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: {file.name} has no heading #{anchor}")
    return broken


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Running on a TPU slice / multi-GPU host\n## `llm.load`'s API\n## Notes\n## Notes\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[a](other.md#running-on-a-tpu-slice--multi-gpu-host) [b](other.md#llmloads-api) [c](other.md#notes-1)\n"
                   "[d](other.md#no-such-heading) [e](missing.md) [f](#here)\n`[not a link](nowhere.md)`\n## Here\n")
    assert broken_links(doc) == ["other.md#no-such-heading: other.md has no heading #no-such-heading", "missing.md: no such file"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_reach_a_file_and_a_heading(doc):
    broken = broken_links(doc)
    assert not broken, "\n".join(broken)


def layout_entries() -> list[str]:
    """The paths the README's Layout block names, one per line, from the indentation of each line."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```") + 3:]
    block = block[block.index("\n") + 1:block.index("```")]
    stack, paths = [], []
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        stack[depth:] = [name]
        paths.append("".join(stack))
    return paths


def test_the_layout_has_one_line_per_module():
    listed = [p for p in layout_entries() if p.startswith("llm/")]
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "llm").rglob("*.py")
                     if p.name != "__init__.py" and "harness_tasks" not in p.parts)
    files = [p for p in listed if p.endswith(".py")]
    assert sorted(set(modules) - set(files)) == [], "modules the README's Layout does not list"
    assert sorted(set(files) - set(modules)) == [], "Layout lines for modules that do not exist"
    assert len(files) == len(set(files)), "a module listed twice"
    assert all((ROOT / p).is_dir() for p in listed if p.endswith("/")), "a Layout package that does not exist"
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    assert pages == {p for p in layout_entries() if p.startswith("docs/") and p.endswith(".md")}

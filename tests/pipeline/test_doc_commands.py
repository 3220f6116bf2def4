"""Every ``python -m pipeline ...`` command written in README.md and docs/*.md still
composes: a renamed or removed setting, or a config-group option that no longer exists,
fails here and names the file and line of the command.

The commands (``python -m pipeline``, ``.venv/bin/python -m pipeline``, ``wbc-pipeline``)
come from fenced and indented code blocks (lines continued with a trailing backslash
joined, shell comments stripped, a variable set on a line of its own expanded where it
is used, ``$PWD`` read as the checkout) and from inline code spans (which may wrap over
lines of a paragraph). A command that holds a shell placeholder (``<...>``, another
``$VAR``, ``...``) is not composed; one that is illustrative on purpose and cannot
compose is named in :data:`ILLUSTRATIVE`, by its text.

For each command, ``-m``/``--multirun`` and other flags are dropped, a sweep (and the
docs' ``a|b`` shorthand) keeps its first value, an optional ``[key=value]`` loses its
brackets, ``hydra.*`` overrides are dropped; the rest goes through the entry point's own
checks before Hydra (``+key=`` of a key no setting has, bad experiment names) and
:func:`tests.helpers.run.compose_config` (which raises on an unknown key, a missing group
option or a value of the wrong type). A value written as a capitalised name
(``seed=S``) that does not compose is left out, its key checked to exist. Identical
override lists are composed once.
"""

from __future__ import annotations

import bisect
import re
import shlex
from dataclasses import dataclass, field

import pytest

from tests.helpers.run import CONF, ROOT, compose_config

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# a command runs the pipeline: python -m pipeline, .venv/bin/python -m pipeline, or the
# console script wbc-pipeline
MENTION = re.compile(r"(?:python3?\s+-m\s+pipeline|wbc-pipeline)\b")

# a shell placeholder: <...>, $VAR / ${VAR} / $(...), an ellipsis
PLACEHOLDER = re.compile(r"<placeholder>|\$|\.\.\.|\u2026")
ANGLED = re.compile(r"<[^<>`\n]*>")

# a shell variable set on a line of its own: NAME=value
ASSIGN = re.compile(r"^\s*([A-Za-z_]\w*)=(\S.*)$")

# a line of an indented code block
INDENTED = re.compile(r"^(?: {4,}|\t)\S")

# tokens that end the command: the shell goes on to something else
SHELL_STOP = re.compile(r"^(?:&&|\|\||;|\||&|[0-9]*>>?.*|<.*|\))$")

# Documented commands that cannot compose on purpose, keyed by the command's text
# (from "python -m pipeline" on, as extracted); each says why. Keep this short: a stale
# command belongs fixed in the docs, not here.
ILLUSTRATIVE: dict[str, str] = {
    # README's file tree: "Hydra entry: python -m pipeline stage=NAME", the synopsis of the
    # entry point (stage=NAME stands for a stage; without one nothing composes)
    "python -m pipeline stage=NAME": "the synopsis in README's file tree",
}

# an optional override, written in brackets: [vae.texture_weight=1] (composed with it)
OPTIONAL = re.compile(r"^\[([\w.+~@/-]+=.*)\]$")
# alternatives of a value: stage=evaluate|traverse, variant=s1|s2 (the first composed,
# as for a sweep)
ALTERNATIVES = re.compile(r"^[\w.-]+(?:\|[\w.-]+)+$")

# a value written as a name in capitals (experiment=NAME, seed=S, hardware.torch_threads=N,
# paths.root=ROOT): where the command does not compose with it, the command is composed
# without those overrides and each of their keys must still be a setting (or group)
NAMED = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass
class Command:
    file: str  # relative to the repository root
    line: int  # 1-based line where the command starts
    text: str  # from "python -m pipeline" / "wbc-pipeline" on, one line
    args: list[str] = field(default_factory=list)  # the words after the program


def _fences(lines: list[str]) -> list[tuple[int, int]]:
    """(start, end) line indices (0-based, end exclusive) of each fenced block's body."""
    blocks, open_at, fence = [], None, ""
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if not m:
            continue
        if open_at is None:
            open_at, fence = i, m.group(1)
        elif m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
            if not line.strip()[len(m.group(1)) :].strip():
                blocks.append((open_at + 1, i))
                open_at = None
    if open_at is not None:
        blocks.append((open_at + 1, len(lines)))
    return blocks


def _split_command(text: str, comments: bool) -> list[str] | None:
    """The words of the pipeline command that ``text`` starts with (up to the first
    shell operator or backtick), or None when the shell could not split it."""
    text = text.split("`")[0]
    # $PWD is the shell's own, not a placeholder: the folder the command runs in
    text = re.sub(r"\$PWD\b|\$\{PWD\}", str(ROOT), text)
    # a <placeholder> (it may hold spaces) is one word, not a redirection
    text = ANGLED.sub("<placeholder>", text)
    try:
        lex = shlex.shlex(text, posix=True)
        lex.whitespace_split = True
        lex.commenters = "#" if comments else ""
        words = list(lex)
    except ValueError:
        return None
    out = []
    for w in words:
        if "<placeholder>" not in w and SHELL_STOP.match(w):
            break
        if w.endswith(";"):
            out.append(w[:-1])
            break
        out.append(w)
    return out


def _commands_in(text: str, file: str, line: int, comments: bool) -> list[Command]:
    """The pipeline commands in one shell line / code span ``text`` (newlines removed)
    that begins on ``line``."""
    found = []
    for m in MENTION.finditer(text):
        if comments and "#" in text[: m.start()]:
            # inside a shell comment: "# python -m pipeline ..." is prose
            hashes = [i for i, c in enumerate(text[: m.start()]) if c == "#"]
            if any(i == 0 or text[i - 1].isspace() for i in hashes):
                continue
        rest = text[m.start() :]
        # a command stored in a variable (P=".venv/bin/python -m pipeline") not on a line
        # of its own: the quote closes right after the program name; no command here
        before = text[: m.start()].rstrip()
        if before.endswith(('="', "='", '=".venv/bin/', "='.venv/bin/")):
            continue
        words = _split_command(rest, comments)
        if words is None:
            continue
        program = 1 if words[0] == "wbc-pipeline" else 3
        if len(words) <= program:
            continue  # the program's name alone (`wbc-pipeline`, the package): no command
        found.append(Command(file, line, " ".join(words), words[program:]))
    return found


def _code_block(
    lines: list[str], start: int, end: int, file: str, shell_vars: dict[str, str]
) -> list[Command]:
    """The pipeline commands in the shell lines ``lines[start:end]`` of a code block
    (a line ending with a backslash continued on the next). A variable set on a line
    of its own (``P=".venv/bin/python -m pipeline"``, ``B="experiment=x ..."``) is
    noted in ``shell_vars`` (the file's, in order) and expanded where it is used."""
    commands = []
    i = start
    while i < end:
        first, joined = i, lines[i]
        while joined.rstrip().endswith("\\") and i + 1 < end:
            i += 1
            joined = joined.rstrip()[:-1] + " " + lines[i].strip()
        i += 1
        if (m := ASSIGN.match(joined)) and not m.group(2).startswith("("):
            try:
                value = shlex.split(m.group(2), comments=True)
            except ValueError:
                value = []
            if len(value) == 1:
                shell_vars[m.group(1)] = value[0]
                continue
        for name, value in shell_vars.items():
            joined = re.sub(rf"\$(?:{name}\b(?!\[)|\{{{name}\}})", lambda _, v=value: v, joined)
        if MENTION.search(joined):
            commands += _commands_in(joined, file, first + 1, comments=True)
    return commands


def extract(path) -> list[Command]:
    """Every pipeline command in the markdown file ``path``."""
    file = str(path.relative_to(ROOT))
    lines = path.read_text(encoding="utf-8").splitlines()
    commands: list[Command] = []
    shell_vars: dict[str, str] = {}
    in_fence = [False] * len(lines)
    for start, end in _fences(lines):
        for i in range(start - 1, min(end + 1, len(lines))):
            in_fence[i] = True
        commands += _code_block(lines, start, end, file, shell_vars)
    # indented code blocks: lines indented by 4 or more after a blank line
    i = 0
    while i < len(lines):
        if in_fence[i] or not INDENTED.match(lines[i]) or (i and lines[i - 1].strip()):
            i += 1
            continue
        end = i
        while end < len(lines) and not in_fence[end] and INDENTED.match(lines[end]):
            in_fence[end] = True
            end += 1
        commands += _code_block(lines, i, end, file, shell_vars)
        i = end
    # inline code spans of the prose: a run of n backticks up to the next run of exactly
    # n, within one paragraph (a blank line ends it), fenced blocks left out
    prose_lines = ["" if f else line for f, line in zip(in_fence, lines)]
    prose = "\n".join(prose_lines)
    starts = [0]
    for line in prose_lines:
        starts.append(starts[-1] + len(line) + 1)
    pos = 0
    run = re.compile(r"`+")
    while (m := run.search(prose, pos)) is not None:
        n = len(m.group())
        close = m.end()
        while (c := run.search(prose, close)) is not None and len(c.group()) != n:
            close = c.end()
        body = prose[m.end() : c.start()] if c else ""
        if c is None or re.search(r"\n\s*\n", body):
            pos = m.end()  # no closing run in this paragraph: literal backticks
            continue
        pos = c.end()
        for k in MENTION.finditer(body):
            at = m.end() + k.start()
            line = bisect.bisect_right(starts, at)
            text = body[k.start() :].replace("\n", " ")
            commands += _commands_in(text, file, line, comments=False)[:1]
    return commands


def all_commands() -> list[Command]:
    return [c for path in DOCS for c in extract(path)]


def overrides_of(args: list[str]) -> list[str]:
    """The overrides to compose for a command's words: flags dropped (``-m``,
    ``--multirun``, ``--help``, ...), each sweep and each ``a|b`` cut to its first value,
    an optional ``[key=value]`` taken without its brackets, ``hydra.*`` dropped;
    ``--help`` without a stage gets ``stage=all``, as the entry point gives it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pipeline.__main__ import HELP_FLAGS

    parser = OverridesParser.create()
    out = []
    if any(a in HELP_FLAGS for a in args) and not any(
        a.lstrip("+~").startswith("stage=") for a in args
    ):
        out.append("stage=all")  # as pipeline.__main__.main gives --help a stage
    for a in args:
        if m := OPTIONAL.match(a):
            a = m.group(1)
        if a.startswith("-") or "=" not in a:
            continue  # -m, --multirun, --help, --cfg job, ...
        key, _, value = a.partition("=")
        if ALTERNATIVES.match(value):
            a = f"{key}={value.split('|')[0]}"
        if a.lstrip("+~").startswith("hydra."):
            continue
        try:
            (o,) = parser.parse_overrides([a])
        except Exception:  # noqa: BLE001 - compose reports the bad override itself
            out.append(a)
            continue
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            a = f"{o.get_key_element()}={first}"
        out.append(a)
    return out


def is_placeholder(c: Command) -> bool:
    return any(PLACEHOLDER.search(w) for w in c.args)


COMMANDS = all_commands()
COMPOSABLE = [c for c in COMMANDS if not is_placeholder(c) and c.text not in ILLUSTRATIVE]


def _unique(commands: list[Command]) -> list[tuple[tuple[str, ...], list[Command]]]:
    """Distinct override lists, each with every command that gives it (first first)."""
    seen: dict[tuple[str, ...], list[Command]] = {}
    for c in commands:
        seen.setdefault(tuple(overrides_of(c.args)), []).append(c)
    return list(seen.items())


UNIQUE = _unique(COMPOSABLE)


def test_the_docs_hold_many_commands():
    """The extraction finds the documented commands (a broken extraction would find
    none and compose nothing); every allow-listed one is still in the docs."""
    assert len(COMMANDS) > 100, len(COMMANDS)  # 206 on 2026-12-06
    assert len(COMPOSABLE) > 80, len(COMPOSABLE)  # 186
    assert len(UNIQUE) > 80, len(UNIQUE)  # 176
    texts = {c.text for c in COMMANDS}
    assert not set(ILLUSTRATIVE) - texts, "allow-listed commands no longer in the docs"


def compose_documented(overrides: list[str]) -> None:
    """The entry point's checks of the command line before Hydra (a ``+key=`` that adds
    a key no setting has, which Hydra itself accepts; a bad experiment or variant name),
    then compose ``overrides``; where that fails and some values are capitalised names
    (:data:`NAMED`), compose without those and check that their keys exist."""
    from omegaconf import OmegaConf

    from pipeline.config import unknown_addition
    from pipeline.names import check_argv

    bad = check_argv(overrides) or unknown_addition(overrides)
    if bad:
        raise ValueError(bad)
    try:
        compose_config(overrides)
        return
    except Exception:
        named = [o for o in overrides if NAMED.match(o.partition("=")[2])]
        if not named:
            raise
    cfg = compose_config([o for o in overrides if o not in named])
    absent = object()
    for o in named:
        key = o.partition("=")[0].lstrip("+~")
        if (CONF / key).is_dir():
            continue  # a config group: stage=NAME
        if OmegaConf.select(cfg, key, default=absent, throw_on_missing=False) is absent:
            raise KeyError(f"{key} is not a setting ({o}, a placeholder value)")


@pytest.mark.parametrize(
    "overrides, where",
    [(list(o), cs) for o, cs in UNIQUE],
    ids=[f"{cs[0].file}:{cs[0].line}" for _, cs in UNIQUE],
)
def test_a_documented_command_composes(overrides: list[str], where: list[Command]):
    try:
        compose_documented(overrides)
    except Exception as e:  # noqa: BLE001 - any failure to compose is the finding
        places = ", ".join(f"{c.file}:{c.line}" for c in where)
        pytest.fail(
            f"{where[0].text}\n  (at {places}) does not compose: {type(e).__name__}: {e}",
            pytrace=False,
        )

"""``python -m pipeline stage=NAME [key=value ...]``: the Hydra entry point."""

# ruff: noqa: E402 - the SIGINT handler is set before the slow imports below

from __future__ import annotations

import os
import signal
import sys

# the words of a Ctrl-C before any stage started (the runner says the same later)
INTERRUPTED = "interrupted before any stage started: nothing was written"


def _interrupted_early(signum, frame) -> None:
    """SIGINT while this module's imports run (Hydra, OmegaConf: about a second): one
    line and exit 130 instead of a KeyboardInterrupt traceback of an import.

    Exits at once: nothing exists yet to clean up (Hydra makes its run folder later,
    in main), and a SystemExit raised here was swallowed by an import that catches
    everything (a test saw the message, then the run went on).
    """
    print(f"error: {INTERRUPTED}", file=sys.stderr, flush=True)
    os._exit(130)


# `python -m pipeline` or the `wbc-pipeline` command, not a test importing this module
# (the stem: on Windows the command is wbc-pipeline.exe)
if __name__ == "__main__" or os.path.splitext(os.path.basename(sys.argv[0]))[0] == "wbc-pipeline":
    signal.signal(signal.SIGINT, _interrupted_early)

import errno
import hashlib
import re
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline import help as pipeline_help
from pipeline.config import register_configs

register_configs()
pipeline_help.register()
if not OmegaConf.has_resolver("pid"):
    # ``${pid:}`` in pipeline/conf/config.yaml's run folders: one folder per process
    OmegaConf.register_new_resolver("pid", os.getpid)

# settings that name a sweep job's folder only when swept: where, how and on what it
# runs. A swept one names it (hardware.torch_threads=1,2: a user timing the two wants
# both results; left out, the second job overwrote the first: an audit)
_NOT_IN_VARIANT = (
    "stage",
    "experiment",
    "overwrite",
    "resume",
    "log_level",
    "variant",
    "paths",
    "hardware",
)
# settings that give a job a folder of its own without a variant: a sweep over stages
# (-m stage=train,evaluate vae.beta=1,4) keeps one variant per beta across the stages,
# so that evaluate reads the matching train folder
_OWN_FOLDER = ("stage", "experiment", "variant", "paths.root")


def _top_level_comma(value: str) -> bool:
    depth = 0
    for ch in value:
        depth += int(ch in "[{(") - int(ch in "]})")
        if ch == "," and depth == 0:
            return True
    return False


def _swept_keys(argv: list[str]) -> set[str]:
    """The keys ``argv`` sweeps (``vae.beta=1,4,16``, ``range(...)``, ``choice(...)``)."""
    swept = set()
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        if _top_level_comma(value) or re.match(r"(range|choice|glob|interval)\(", value):
            swept.add(key.lstrip("+~"))
    return swept


def sweep_variant(task_overrides: list[str], argv: list[str]) -> str:
    """Folder name of one ``-m`` sweep job: the swept settings with this job's values.

    ``argv`` tells which keys were swept (``vae.beta=1,4,16``, ``range(...)``,
    ``choice(...)``); ``task_overrides`` holds this job's value of each. Every swept
    setting names the folder (``hardware.*`` and ``paths.*`` too) except those that give
    the job a folder of their own (``stage``, ``experiment``, ``paths.root``); without
    a swept setting, every setting but those of :data:`_NOT_IN_VARIANT` names it. Long
    names are shortened with a hash.

    >>> sweep_variant(["stage=train", "vae.beta=4", "paths.root=/tmp/x"],
    ...               ["stage=train", "vae.beta=1,4", "paths.root=/tmp/x"])
    'vae.beta=4'
    >>> sweep_variant(["stage=train", "vae.beta=4", "hardware.torch_threads=2"],
    ...               ["stage=train", "vae.beta=1,4", "hardware.torch_threads=1,2"])
    'hardware.torch_threads=2,vae.beta=4'
    """
    swept = _swept_keys(argv)
    pairs = []
    for o in task_overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in _OWN_FOLDER:
            continue
        if (key not in swept) if swept else key.split(".")[0] in _NOT_IN_VARIANT:
            continue
        pairs.append(f"{key}={value}")
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", ",".join(sorted(pairs)))
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def sweep_jobs(argv: list[str]) -> list[list[str]]:
    """Each job's overrides of the ``-m`` sweep ``argv`` (as Hydra's basic sweeper
    splits them), in job order; [] when Hydra cannot parse them (it says why)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # noqa: BLE001 - not a basic sweep: Hydra reports it itself
        return []


def _preset_experiment(preset: str | None) -> str | None:
    """The ``experiment`` that ``pipeline/conf/preset/<preset>.yaml`` sets, or None
    (no preset, a preset that sets none, or one this package does not hold)."""
    if not preset:
        return None
    path = Path(__file__).parent / "conf" / "preset" / f"{preset}.yaml"
    try:
        value = OmegaConf.load(path).get("experiment")
    except Exception:  # noqa: BLE001 - not ours to read: Hydra reports a bad preset itself
        return None
    return None if value is None else str(value)


def _job_folder(job: list[str], argv: list[str]) -> str:
    """The folder (below ``paths.root``) that sweep job ``job`` writes, as a label."""
    values = {}
    for o in job:
        key, _, value = o.partition("=")
        values[key.lstrip("+~")] = value
    variant = values.get("variant") or sweep_variant(job, argv)
    # a preset names the experiment too (+preset=real,demo variant=x: real/... and
    # demo/..., two folders); an experiment= given beside it wins, as in the config
    experiment = values.get("experiment") or _preset_experiment(values.get("preset"))
    parts = [values.get("paths.root"), experiment, values.get("stage", "?"), variant]
    return "/".join(str(p) for p in parts if p)


def sweep_collision(argv: list[str]) -> str | None:
    """Why two jobs of the ``-m`` sweep ``argv`` would write one stage folder (the
    second would refuse, or with ``overwrite=true`` replace, the first's result), naming
    the jobs and the settings; None when every job has a folder of its own."""
    jobs = sweep_jobs(argv)
    seen: dict[str, int] = {}
    for k, job in enumerate(jobs):
        folder = _job_folder(job, argv)
        if folder not in seen:
            seen[folder] = k
            continue
        first = jobs[seen[folder]]
        differ = sorted(o.partition("=")[0].lstrip("+~") for o in job if o not in first)
        if any(o.partition("=")[0].lstrip("+~") == "variant" for o in job):
            why = "variant= names one folder for every job; leave it out, or sweep it"
        elif differ:
            why = (
                f"their values of {', '.join(differ)} differ only in characters a folder "
                f"name cannot hold; name each job's folder with variant=NAME, one run per job"
            )
        else:
            why = "they have the same settings: a value is given twice in the sweep"
        return (
            f"-m: jobs #{seen[folder]} ({' '.join(first)}) and #{k} ({' '.join(job)}) of "
            f"this sweep would write the same folder ({folder}): {why}. Nothing was run."
        )
    return None


# Hydra prints its own errors (several lines, "Set the environment variable
# HYDRA_FULL_ERROR=1 ...", exit 1) unless this is set; main() sets it so that a bad
# override or an uncreatable run folder reaches it, and app() puts the user's value back
_FULL_ERROR = "HYDRA_FULL_ERROR"
_USER_FULL_ERROR = os.environ.get(_FULL_ERROR)
# set once Hydra calls app(): an error before that is Hydra's (config, run folder)
_TASK_STARTED = False


def _restore_full_error() -> None:
    if _USER_FULL_ERROR is None:
        os.environ.pop(_FULL_ERROR, None)
    else:
        os.environ[_FULL_ERROR] = _USER_FULL_ERROR


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def app(cfg: DictConfig) -> int:
    from pipeline import runner

    global _TASK_STARTED
    _TASK_STARTED = True
    # from here on the stage's own errors are reported by runner.main (and, with
    # log_level=DEBUG, by Hydra as before): the processes a stage starts inherit nothing
    _restore_full_error()
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and hc.job.num == 0:
        # two jobs of one sweep never share a folder: refused before the first runs
        clash = sweep_collision(sys.argv[1:])
        if clash is not None:
            print(f"error: {clash}", file=sys.stderr)
            runner._drop_hydra_dir(cfg)
            raise SystemExit(2)
    if hc.mode == RunMode.MULTIRUN and not cfg.variant:
        # each job of a sweep (-m vae.beta=1,4,16) gets its own sub-folder; a sweep over
        # stages (or experiments) alone needs none: each job has its own folder already
        cfg.variant = sweep_variant(list(hc.overrides.task), sys.argv[1:])
    code = runner.main(cfg)
    if code and hc.mode != RunMode.MULTIRUN:
        sys.exit(code)
    if code:
        raise SystemExit(code)
    return code


HELP_FLAGS = ("--help", "-h", "--hydra-help")


def _options_line(lines: list[str]) -> list[str]:
    """Hydra's "Available options ...:" block (one option a line) as one line, the
    options apart by spaces as Hydra lists them (scripts split them on whitespace)."""
    out: list[str] = []
    listing = False
    for line in lines:
        if listing and " " not in line:
            out[-1] += f" {line}"
            continue
        listing = line.endswith(":") and "options" in line.lower()
        out.append(line)
    return out


def config_error_line(e: BaseException) -> str:
    """One line for an error Hydra or OmegaConf raised while composing the config.

    Names the override and its bad value (``vae.beta=abc: Value 'abc' of type 'str'
    could not be converted to Float``), the missing or unknown ``stage=`` with the valid
    choices, or a setting that does not exist with the nearest names.

    >>> from hydra.errors import ConfigCompositionException
    >>> config_error_line(ConfigCompositionException("You must specify 'stage', e.g, "
    ...     "stage=<OPTION>\\nAvailable options:\\n\\tall\\n\\tembed"))
    "You must specify 'stage', e.g, stage=<OPTION>; Available options: all embed"
    """
    from pipeline.config import unknown_addition

    text = str(e)
    cause = e.__cause__
    m = re.match(r"Error merging override (\S+)", text)
    if m and cause is not None:
        # OmegaConf's message: the reason first, then full_key / object_type lines
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        several = _several_values(m.group(1))
        if several is not None and "could not be converted" in reason:
            # vae.beta='1,4', quoted as Hydra's hint for the unquoted form said: a sweep
            key, _, value = m.group(1).partition("=")
            value = value.strip("'\"")
            return (
                f"{m.group(1)}: {reason}; to run one job per value, add -m (a sweep) and "
                f"leave out the quotes: python -m pipeline -m ... {key}={value}"
            )
        return f"{m.group(1)}: {reason}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    override = getattr(e, "override", None)  # OverrideParseException: the text not parsed
    if override and lines and not lines[0].startswith(str(override)):
        lines[0] = f"{override}: {lines[0]}"
    ambiguous = re.match(r"Ambiguous value for argument '(.*)'$", lines[0]) if lines else None
    several = _several_values(ambiguous.group(1)) if ambiguous else None
    if several is not None:
        return several
    if override or ambiguous:
        # a path with a space, bracket, accent, = , # & ' ~ ... is no plain override
        # value: Hydra's lexer message and its link to old docs did not say to quote it
        given = str(override) if override else ambiguous.group(1)
        lines = [
            ln
            for ln in lines
            if not ln.startswith("See https://hydra.cc")
            and not (re.match(r"\d+\. ", ln) and "multirun" not in ln)
        ]
        lines = [re.sub(r"^\d+\. ", "", ln) for ln in lines]
        if needs_quotes(given):
            lines.append(quoting_hint(given))
    # Hydra's hint "To append to your config use +k=v" comes for two different things:
    # a key no setting has (its '+' form is refused, pipeline.config.unknown_addition:
    # name the nearest settings instead), and a new key of a free mapping such as
    # pair.label_map, which the '+' form is the way to add (it said "no such setting")
    hint = next((ln for ln in lines if ln.startswith("To append to your config use +")), None)
    if hint is not None:
        added = hint.split(" use ", 1)[1]
        new_key = _new_mapping_key(cause)
        if new_key is not None:
            mapping, key, held = new_key
            # a slip of a key the mapping holds ("primry" for "primary", "Band" for "band"):
            # the '+' form would add a second key and leave the meant one at its default
            import difflib

            lower = {k.lower(): k for k in held}
            near = [lower[k] for k in difflib.get_close_matches(key.lower(), list(lower), n=2)]
            if near:
                lines = [
                    f"{added[1:]}: {key!r} is not a key of {mapping}; did you mean "
                    f"{' or '.join(f'{mapping}.{k}' for k in near)} (a key it holds)? A new "
                    f"key needs a leading '+': {_shell_word(added)}"
                ]
            else:
                lines = [
                    f"{added[1:]}: {key!r} is not yet a key of {mapping} (a mapping: a new "
                    f"key needs a leading '+'): add it with {_shell_word(added)}"
                ]
        else:
            near = _nearest_settings(cause)
            if near is None:  # no OmegaConf cause to read: the schema's nearest names
                m = re.search(r"did you mean [^?]+\?", unknown_addition([added]) or "")
                near = m.group(0) if m else None
            lines = [f"{added[1:]}: no such setting"] + ([near] if near else [])
    # preset=demo: a config group the defaults list does not hold (Hydra: "Could not
    # override 'preset'. No match in the defaults list") is added with a '+'
    group_hint = next(
        (ln for ln in lines if ln.startswith("To append to your default list use +")), None
    )
    if group_hint is not None:
        added = group_hint.split(" use ", 1)[1]
        group, _, option = added[1:].partition("=")
        # the '+' form of an option the group does not have fails next ("Could not find
        # 'preset/dmo'"): name the options first (review)
        conf = Path(__file__).parent / "conf" / group
        options = sorted(p.stem for p in conf.glob("*.yaml")) if conf.is_dir() else []
        if options and option not in options:
            import difflib

            near = difflib.get_close_matches(option, options, n=1)
            lines = [
                f"{added[1:]}: {group} has no option {option!r}"
                + (f"; did you mean +{group}={near[0]}?" if near else "")
                + f" (options: {', '.join(options)}; an optional config group: add it with "
                "a leading '+')"
            ]
        else:
            lines = [
                f"{added[1:]}: {group} is not in the default config (an optional config "
                f"group): add it with a leading '+': {_shell_word(added)}"
            ]
    # "In 'config': Could not find 'stage/nope'": an option of a config group that
    # has no file in pipeline/conf/<group>/
    missing = (
        re.match(r"In '[^']*': Could not find '([\w.]+)/([^']+)'$", lines[0]) if lines else None
    )
    if missing:
        several = _several_values(f"{missing.group(1)}={missing.group(2)}")
        if several is not None:  # stage='train,evaluate': quoted as the hint said
            return several
        lines[0] = f"{missing.group(1)}={missing.group(2)}: {lines[0].split(': ', 1)[1]}"
    # Hydra's "Config search path:" block tells where it looked, not what to change
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    lines = _options_line(lines)
    out = "; ".join(ln.rstrip(".") if k < len(lines) - 1 else ln for k, ln in enumerate(lines))
    return out or type(e).__name__


def _several_values(given: str) -> str | None:
    """The line for ``key=a,b`` given without ``-m`` where the comma means several runs,
    not one text to quote: stages (``stage=train,evaluate``), options of a config group
    (``vae=tiny,default``) and numbers (``vae.beta=1,4``), whose quoted form fails next
    ("Could not find 'stage/train,evaluate'", "could not be converted to Float"). None
    for anything else (a path with a comma: quoted, as Hydra's hint says).

    >>> print(_several_values("vae.beta=1,4"))
    vae.beta=1,4: several values in one run; to run one job per value, add -m (a sweep): python -m pipeline -m ... vae.beta=1,4
    """
    key, sep, value = given.partition("=")
    key = key.lstrip("+~")
    value = value.strip().strip("'\"")
    parts = [v.strip() for v in value.split(",")]
    if not sep or len(parts) < 2 or not all(parts):
        return None
    if key == "stage":
        return (
            f"stage={value}: one stage per run: stage=all runs the whole chain, or add -m to "
            f"run the stages one after another (python -m pipeline -m stage={value} ...)"
        )
    group = Path(__file__).parent / "conf" / key
    if "." not in key and group.is_dir():
        return (
            f"{key}={value}: one {key} option per run; to run one job per option, add -m "
            f"(a sweep): python -m pipeline -m ... {key}={value}"
        )
    from pipeline.config import is_list_setting

    if is_list_setting(key):  # one run's list, not a sweep: -m would fail on each value
        return f"{key}={value}: a list setting; give its values in brackets: {key}=[{value}]"
    if all(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", v) for v in parts):
        return (
            f"{key}={value}: several values in one run; to run one job per value, add -m (a "
            f"sweep): python -m pipeline -m ... {key}={value}"
        )
    return None


def _new_mapping_key(cause: BaseException | None) -> tuple[str, str, list[str]] | None:
    """``(mapping, key, keys it holds)`` when OmegaConf refused ``cause``'s key because a
    free mapping (a ``dict`` setting: ``pair.label_map``, ``expression.programs``) does
    not hold it yet ("Key 'x' is not in struct"), else None: a section of settings (a
    dataclass: "Key 'x' not in 'PairConfig'") that has no such setting, or no OmegaConf
    cause."""
    import dataclasses

    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(cause, OmegaConfBaseException):
        return None
    full_key, kind = getattr(cause, "full_key", None), getattr(cause, "object_type", None)
    if not full_key or kind is None or dataclasses.is_dataclass(kind):
        return None
    if "is not in struct" not in str(cause):
        return None
    full_key = re.sub(r"\[(\d+)\]", r".\1", str(full_key))
    mapping, _, key = full_key.rpartition(".")
    parent = getattr(cause, "parent_node", None)
    try:
        held = [str(k) for k in parent.keys()] if parent is not None else []
    except Exception:  # a node without keys (not a mapping after all): nothing to suggest
        held = []
    return (mapping, key, held) if mapping else None


def _nearest_settings(cause: BaseException | None) -> str | None:
    """ "did you mean pair.label_map?" for a setting a section (a dataclass) does not
    have, from OmegaConf's ``cause`` (its key and section); None if none is near."""
    import dataclasses
    import difflib

    kind = getattr(cause, "object_type", None)
    full_key, key = getattr(cause, "full_key", None), getattr(cause, "key", None)
    if not (full_key and key and kind is not None and dataclasses.is_dataclass(kind)):
        return None
    section = re.sub(r"\[(\d+)\]", r".\1", str(full_key)).rpartition(".")[0]
    names = [f.name for f in dataclasses.fields(kind)]
    near = difflib.get_close_matches(str(key), names, n=3)
    if not near:
        return None
    return f"did you mean {', '.join(f'{section}.{k}' if section else k for k in near)}?"


def _shell_word(arg: str) -> str:
    """``arg`` as one word of a POSIX shell command line (quoted only when needed).

    >>> _shell_word("+pair.label_map={band: Neutrophils}")
    "'+pair.label_map={band: Neutrophils}'"
    >>> _shell_word("+pair.label_map.band=Neutrophils")
    '+pair.label_map.band=Neutrophils'
    """
    import shlex

    if re.fullmatch(r"[\w@%+=:,./-]+", arg):
        return arg
    if "'" in arg and not re.search(r'["$`\\!]', arg):
        return f'"{arg}"'
    return shlex.quote(arg)


def needs_quotes(override: str) -> bool:
    """Whether ``override``'s value reads as a path or text that Hydra needs quoted (a
    space, an accent, brackets, ``= , # & '``, or a ``~`` not at its start), not as a
    list, a mapping or an interpolation with a typo (``[a,b``, ``${oc.env:X``), which
    quoting would turn into a string (found on review: every parse error said "quote it")."""
    _, sep, value = override.partition("=")
    value = value.strip() if sep else ""
    if not value or value[0] in "[{" or value.startswith("${"):
        return False
    if "," in value and "~" in value[1:] and " " not in value:
        return False  # a list of home paths (~/x,~/y): a sweep, not one path
    return bool(re.search(r"[\s()=,#&'\[\]{}]|[^\x00-\x7f]", value) or "~" in value[1:])


def quoting_hint(override: str) -> str:
    """How to give ``override``'s value as one string (a path with spaces, brackets or
    accents): quoted for Hydra, inside the shell's quotes.

    >>> print(quoting_hint("paths.root=/data/Patient 1 (Müller)/out"))
    a path or text with spaces, brackets, accents or = , # & ~ must be quoted: "paths.root='/data/Patient 1 (Müller)/out'"
    """
    key, sep, value = override.partition("=")
    if not sep:
        key, value = override, "..."
    # quoted already (or half), but something else was wrong with it
    value = value.strip().strip("'\"")
    if "'" in value:  # Hydra's double quotes, escaped for the shell's
        quoted = f'"{key}=\\"{value}\\""'
    else:
        quoted = f"\"{key}='{value}'\""
    return f"a path or text with spaces, brackets, accents or = , # & ~ must be quoted: {quoted}"


def _exists(p: Path) -> bool | None:
    """Whether ``p`` exists; None when that cannot be told (a folder above it that may
    not be entered, a name too long): Path.exists raises those in Python 3.11."""
    try:
        os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):
        return None
    return True


def _run_root(e: OSError) -> str:
    """``paths.root`` of the run Hydra was starting when ``e`` stopped it (else '').

    Hydra has dropped its config by the time the error arrives; the frame that made
    the folder still holds it (``run_job``'s ``config``, a launcher's ``self.config``).
    """
    from omegaconf import DictConfig, OmegaConf

    tb = e.__traceback__
    while tb is not None:
        loc = tb.tb_frame.f_locals
        for cfg in (loc.get("config"), getattr(loc.get("self"), "config", None)):
            if isinstance(cfg, DictConfig):
                root = OmegaConf.select(cfg, "paths.root", default=None)
                if root is not None:
                    return str(root)
        tb = tb.tb_next
    return ""


def run_folder_error_line(e: OSError) -> str:
    """One line for a run folder Hydra could not create (``paths.root`` is a file, a
    folder that cannot hold one, or not writable), naming ``paths.root``."""
    where = Path(e.filename) if e.filename else None
    reason = e.strerror or str(e)
    if e.errno == errno.ENAMETOOLONG and where is not None:
        longest = max(where.parts, key=len)
        reason = f"{reason}: a folder name of {len(longest)} characters, where most file systems take 255"
    if where is not None:
        # the first part of the path that exists and is not a folder is the usual cause
        for p in [where, *where.parents]:
            here = _exists(p)
            if here is None:
                continue  # cannot tell (no permission above it): look further up
            if here:
                if not p.is_dir():
                    reason = f"{p} is a file, not a folder"
                break
        reason = f"cannot create {where}: {reason}"
    root = _run_root(e)
    setting = f"paths.root={root}" if root else "paths.root"
    return f"{setting}: the run folder cannot be made there ({reason}); set paths.root to a writable folder"


def _run_app() -> None:
    """``app()`` with Hydra's own errors as one ``error:`` line and exit code 2."""
    # from here a Ctrl-C is a KeyboardInterrupt again: the runner marks a started
    # stage's folder failed and puts a previous result back, then says so in one line.
    # Set here, next to the try that reports it: set at the top of main(), a Ctrl-C
    # while main imported the runner (expand_home) ended in a traceback (CI, 0.5 s).
    # The runner's handler raises KeyboardInterrupt as the default one does and also notes
    # it, so one swallowed by a library's catch-all import still stops the run before a
    # stage starts (CI, 1.0 s: the run went on to the stage's missing-input error)
    from pipeline.runner import interrupt

    signal.signal(signal.SIGINT, interrupt)
    if _USER_FULL_ERROR == "1":  # the user asked for Hydra's full traceback
        app()
        return
    os.environ[_FULL_ERROR] = "1"
    try:
        app()
    except KeyboardInterrupt:
        # a Ctrl-C while Hydra composes the config (the runner reports the later ones)
        print(f"error: {INTERRUPTED if not _TASK_STARTED else 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # first: a Ctrl-C noted while composing, whatever error it turned into
        _exit_if_interrupted()
        line = None if _TASK_STARTED else _compose_error_line(e)
        if line is None:  # a stage's own error (runner.main reports those) or a bug
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    finally:
        _restore_full_error()


def _compose_error_line(e: Exception) -> str | None:
    """The one line for an error Hydra or OmegaConf raised while composing the config,
    or None for any other error (shown as it is)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, (HydraException, OmegaConfBaseException)):
        # before OSError: hydra.errors.MissingConfigException is an OSError too
        return config_error_line(e)
    if isinstance(e, ValueError):
        # OmegaConf's update of a list by a key that is no index
        # (vae.maturation_classes.foo=1) fails as a bare int() ValueError: a traceback
        from pipeline.config import list_index_slip

        return list_index_slip(sys.argv[1:])
    if isinstance(e, OSError):
        return run_folder_error_line(e)
    return None


def _exit_if_interrupted() -> None:
    """Exit 130 with the one interrupt line if a Ctrl-C was noted while Hydra composed the
    config, whatever error it turned into: one landing inside OmegaConf's flag_override
    left a node half-updated, and the context manager's exit raised AttributeError in
    place of the KeyboardInterrupt (a traceback and exit 1; CI, once in four runs)."""
    from pipeline.runner import interrupted

    if not _TASK_STARTED and interrupted():
        print(f"error: {INTERRUPTED}", file=sys.stderr)
        sys.exit(130)


def expand_home(args: list[str]) -> list[str]:
    """``args`` with a leading ``~`` of a path setting's value expanded (quoted or not).

    Hydra makes the run's ``.hydra`` folder under ``paths.root`` before the pipeline
    sees the config: ``"paths.root='~/outs'"`` made a folder named ``~`` in the working
    directory; unquoted, ``~`` stopped Hydra's parser. The runner expands the settings
    given otherwise (a preset, the Python API).

    >>> expand_home(["paths.root=~/outs"]) == [f"paths.root='{Path.home()}/outs'"]
    True
    """
    from pipeline.runner import _PATH_SETTINGS

    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+")
        if sep and (bare.startswith("paths.") or bare in _PATH_SETTINGS):
            plain = value
            if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
                plain = value[1:-1]
            home = os.path.expanduser(plain) if plain.startswith("~") else plain
            # a sweep (a,b or choice(...)) or a home holding a quote: left to Hydra
            if home != plain and "'" not in home and not _top_level_comma(plain):
                arg = f"{key}='{home}'"
        out.append(arg)
    return out


def main() -> None:
    from pipeline.config import unknown_addition
    from pipeline.names import check_argv

    sys.argv[1:] = expand_home(sys.argv[1:])
    bad = check_argv(sys.argv[1:]) or unknown_addition(sys.argv[1:])
    if bad:  # before Hydra creates <paths.root>/<experiment>/.hydra
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(2)
    # `stage` is mandatory for a run, but --help must work without it: Hydra composes the
    # config to print the help, so give it a stage (the help text does not depend on it)
    args = sys.argv[1:]
    if any(a in HELP_FLAGS for a in args) and not any(
        a.lstrip("+~").startswith("stage=") for a in args
    ):
        # next to the other overrides: argparse takes them as one block of positionals
        at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), None)
        sys.argv.insert(1 + (len(args) if at is None else at), "stage=all")
    # Hydra reports a bad override in several lines with exit code 1 (and lets the
    # exception through on its --help path): one line and exit code 2 instead
    _run_app()


if __name__ == "__main__":
    main()

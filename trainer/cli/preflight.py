"""Checks of the command line before Hydra acts on it: an unknown group option, a misspelt key, a value out
of range, a run dir that cannot be made or holds another config's run, each said in one line before Hydra
makes the run dir or anything runs."""

import difflib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from trainer.errors import UserError


def config_dir() -> str:
    """The configs inside an installed wheel, else the repository's top-level conf/."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "conf"
    return str(packaged if packaged.is_dir() else package.parent / "conf")


def config_roots(args: list[str]) -> list[Path] | None:
    """The folders configs compose from: the package's, and the `file://` folders of `hydra.searchpath`
    (your own tasks' configs). None when the search path has other kinds (pkg://): Hydra checks those."""
    roots = [Path(config_dir())]
    for arg in args:
        if arg.lstrip("+").startswith("hydra.searchpath="):
            for entry in arg.split("=", 1)[1].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if not entry.startswith("file://"):
                    return None
                roots.append(Path(entry.removeprefix("file://")))
    return roots


def unknown_choice(args: list[str], roots: list[Path]) -> str | None:
    """A `group=option` whose option does not exist, said in one line with the available ones."""
    from trainer.cli.help import config_groups

    groups = config_groups(roots)
    for arg in args:
        match = re.fullmatch(r"\+{0,2}(\w+)=([\w.-]+)", arg)
        if not match or match[1] not in groups:
            continue
        group, choice = match.groups()
        if choice != "null" and choice not in groups[group]:
            usage = f"+{group}=NAME" if group == "exp" else f"{group}=NAME"
            return f"{group}={choice} is not an option; choose {usage} from: {', '.join(groups[group])}"
    return None


def unwritable_run_dir(args: list[str]) -> str | None:
    """A run or sweep dir given on the command line that cannot be created, said in one line (Hydra would
    fail on it with a traceback). Read as Hydra reads it (Lightning's DDP launcher passes it to the processes
    it starts quoted: `hydra.run.dir="/runs/a"`), and checked, not made: Hydra makes it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [arg for arg in args if re.fullmatch(r"\+{0,2}hydra\.(run|sweep)\.dir=.+", arg)]
    try:
        overrides = OverridesParser.create().parse_overrides(given)
    except Exception:  # a syntax error: Hydra says it
        return None
    for override in overrides:
        value = override.value()
        if isinstance(value, str) and "${" not in value and (problem := _why_unwritable(Path(value))):
            where = f"{override.key_or_group}={value}"
            return f"{where} cannot be created ({problem}): choose a folder you can write"
    return None


def _why_unwritable(folder: Path) -> str | None:
    existing = folder.expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_before_hydra(argv: list[str]) -> None:
    """The config checked before Hydra acts on it: before it makes the run dir (and writes the config into
    it, over a previous run's), where it never calls the job that checks it (`--cfg` prints and runs nothing),
    and where it calls it once per trial (a sweep): a wrong value is refused once, before any trial starts.
    Own configs (`hydra.searchpath=[file://...]`) are checked as the package's are. The keys a sweep varies
    are left to each trial's own check, and so are configs composed from elsewhere (--config-dir,
    --config-path), which only Hydra composes as the job will see them."""
    from hydra import initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args(argv)
    if args.config_dir or args.config_path or args.info or args.shell_completion or args.experimental_rerun:
        return
    from trainer.config.check import check_config

    name = args.config_name or "config"
    with initialize_config_dir(config_dir(), version_base="1.3"):
        try:
            overrides = OverridesParser.create().parse_overrides(args.overrides)
            fixed = [o for o in overrides if not o.is_sweep_override()]
            cfg, choices, forced = compose_as_hydra(name, fixed)
        except Exception:  # a syntax or composition error: Hydra reports it itself below
            return
        check_config(cfg)  # (a misspelt key of a class's node, with the closest of its parameters)
        if problem := unknown_key(cfg, choices, fixed, forced, name):
            raise UserError(problem)
        refuse_another_config_in_run_dir(cfg, fixed)


def refuse_another_config_in_run_dir(cfg: DictConfig, overrides: list[Override]) -> None:
    """A run dir given on the command line that holds a run of another config is refused here, before Hydra
    writes its .hydra/ files there over the earlier run's (trainer/config/resume.py; train() checks again,
    for run dirs that only Hydra names)."""
    from omegaconf import open_dict

    from trainer.config.plain import plain_dict
    from trainer.config.resume import refuse_changed_config

    given = next((o.value() for o in overrides if o.key_or_group == "hydra.run.dir"), None)
    if not isinstance(given, str) or "${" in given:
        return
    with open_dict(cfg):
        cfg.run_dir = given
    try:
        config = plain_dict(cfg)
    except OmegaConfBaseException:  # a value only the running job knows: train() checks it
        return
    refuse_changed_config(Path(given), config["resume"], config.get("ckpt_path"), config)


def compose_as_hydra(
    name: str, overrides: list[Override]
) -> tuple[DictConfig, dict[str, Any], list[Override]]:
    """The job's config as Hydra composes it, the config groups' choices (`exp`: `dcgan`), and the plain
    overrides of keys that are not there. Hydra refuses those with a page of text; here they are applied as
    `++key=value` instead, so that the check says in one line what is wrong with them."""
    from hydra import compose
    from hydra.errors import ConfigCompositionException
    from omegaconf import open_dict

    lines = [str(o.input_line) for o in overrides]  # (every parsed override keeps its text)
    while True:
        try:
            cfg = compose(name, overrides=lines, return_hydra_config=True)
            break
        except ConfigCompositionException as e:
            refused = re.match(r"Could not override '(.+?)'", str(e))
            key = refused[1] if refused else None
            at = next((i for i, o in enumerate(overrides) if o.key_or_group == key), None)
            if at is None or lines[at] != overrides[at].input_line:
                raise
            lines[at] = f"++{lines[at]}"
    with open_dict(cfg):
        choices = dict(cfg.hydra.runtime.choices)
        del cfg["hydra"]
    return cfg, choices, [o for o, line in zip(overrides, lines) if line != o.input_line]


def unknown_key(
    cfg: DictConfig, choices: dict[str, Any], overrides: list[Override], forced: list[Override], name: str
) -> str | None:
    """A key that the command line sets or adds and no option has, said in one line with the closest one.
    check_config has said it for the keys of a class's node (from its signature); here the others: a plain
    override that Hydra would refuse, and a `+`/`++` one that adds a key beside fixed ones
    (`monitor.metricc`); an empty node (`divergence.spike.per_series: {}`) takes any."""
    from trainer.config.check import config_nodes

    classes = [where for where, _, _ in config_nodes(cfg)]

    def in_class(key: str) -> bool:
        return any(f"{key}.".startswith(f"{where}.") for where in classes)

    added = [
        o
        for o in overrides
        if o.type in (OverrideType.ADD, OverrideType.FORCE_ADD)
        and o.key_or_group not in choices
        and o.key_or_group.split(".")[0] != "hydra"
        and not in_class(o.key_or_group)
    ]
    if not (unchecked := [*forced, *added]):
        return None
    try:
        base = compose_as_hydra(name, [o for o in overrides if o not in unchecked])[0]
    except Exception:  # Hydra reports it itself
        return None
    for override in unchecked:
        if problem := _not_a_key(base, override, override in forced, in_class):
            return problem
    return None


def _not_a_key(
    base: DictConfig, override: Override, forced: bool, in_class: Callable[[str], bool]
) -> str | None:
    """The line that says the key `override` sets is not in `base` (the config without such overrides), with
    the closest key of the node it would go into; None where it is there, or may be added."""
    node, parents = base, []
    for part in override.key_or_group.split("."):
        if not isinstance(node, DictConfig):
            return None  # a key inside a value: Hydra's to report
        if part in node:
            node = node._get_node(part)
            parents.append(part)
            continue
        if not node and not forced:
            return None  # added to an empty node: a free-form one
        path = ".".join(parents)
        close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
        if close:
            hint = f"did you mean {'.'.join([*parents, close[0]])}?"
        elif not node or in_class(path):  # (a target that takes **kwargs: check_config let it pass)
            hint = f"to add it, write +{override.input_line}"
        else:
            hint = f"its keys are {', '.join(str(k) for k in node)}"
        return f"{'.'.join([*parents, part])} is not a key of {path or 'the config'}: {hint}"
    return None

"""`python -m trainer +exp=dcgan [key=value ...]`: compose the config with Hydra, hand it to the launcher.

Problems the user can fix (an unknown group option, a wrong key or type, missing data, a bad checkpoint) end
as one `error:` line and exit code 2; the override syntax errors that Hydra reports itself exit with 1.
"""

import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from trainer.console import SUMMARY_LOGGER, setup_logging
from trainer.errors import UserError

log = logging.getLogger("trainer")


def config_dir() -> str:
    """The configs inside an installed wheel, else the repository's top-level conf/."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if packaged.is_dir() else here.parent / "conf")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One run; in a multirun (`-m`), one trial, which returns the best value of `monitor.metric` to the
    sweeper. The run's summary (written by its rank zero) is shown last, then the error if any."""
    from trainer.config import build, check_config
    from trainer.errors import DivergenceHalt, Preempted
    from trainer.sweeps import sweep_group

    started = time.time()
    setup_logging(cfg.run_dir, verbose=bool(cfg.get("verbose")))
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    if in_sweep and not cfg.group:
        cfg.group = sweep_group(cfg.name, HydraConfig.get().sweep.dir)
    error, halted, preempted = None, False, None
    try:
        check_config(cfg)  # all of it, before anything runs, is submitted or starts a cluster
        metrics = build(cfg.launcher, "launcher").launch(cfg)
    except Preempted as e:
        preempted = e
    except DivergenceHalt as e:
        error, halted = one_line(e), True
    except UserError as e:
        error = one_line(e)
    except OmegaConfBaseException as e:  # a missing mandatory value (???), a broken interpolation
        key = getattr(e, "full_key", None)
        error = f"config key {key}: {one_line(e)}" if key else one_line(e)
    finally:
        show_summary(Path(cfg.run_dir), since=started)
    if preempted is not None:
        if preempted.requeue:
            from trainer.callbacks.preemption import requeue_slurm_job

            requeue_slurm_job()  # last: SLURM ends the job here
        return math.nan if in_sweep else None
    if halted and in_sweep:
        log.error(error)
        return math.nan  # a diverged trial is a result: Optuna records it as failed and the sweep goes on
    if error is not None:
        _fail(error, in_sweep)
    return sweep_objective(cfg, metrics) if in_sweep else None


def show_summary(run_dir: Path, since: float) -> None:
    """The summary the run wrote (trainer/summary.py), to the console and train.log; nothing when no
    training started (a config error, a submitted job)."""
    from trainer.summary import SUMMARY_FILE

    summary = run_dir / SUMMARY_FILE
    if summary.is_file() and summary.stat().st_mtime >= since:
        logging.getLogger(SUMMARY_LOGGER).info(summary.read_text().rstrip())


def sweep_objective(cfg: DictConfig, metrics: dict[str, Any]) -> float:
    """What a trial hands the sweeper: the best value of `monitor.metric`, the one the best checkpoint
    holds."""
    metric = cfg.monitor.metric
    if metric is None:
        raise UserError(
            "a sweep optimizes monitor.metric, which is not set: set monitor.metric and monitor.mode "
            "(the hparams_search configs do)"
        )
    if "job_id" in metrics:
        raise UserError(
            "launcher=slurm submits and returns at once, with nothing to hand the sweeper: "
            "sweep on SLURM with hydra/launcher=submitit_slurm"
        )
    if metric not in metrics:
        raise UserError(
            f"the trial has no value of monitor.metric={metric} to return (it logged "
            f"{', '.join(sorted(metrics)) or 'nothing'}): check that validation runs"
        )
    return float(metrics[metric]["best"])


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
    from trainer.cli_help import config_groups

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
    fail on it with a traceback). Made here, as Hydra would make it a moment later."""
    for arg in args:
        match = re.fullmatch(r"\+{0,2}hydra\.(run|sweep)\.dir=(.+)", arg)
        if match and "${" not in match[2]:
            try:
                Path(match[2]).expanduser().mkdir(parents=True, exist_ok=True)
            except OSError as e:
                reason = f"cannot be created ({e.strerror})"
                return f"hydra.{match[1]}.dir={match[2]} {reason}: choose a folder you can write"
    return None


def check_before_hydra(argv: list[str]) -> None:
    """The config checked before Hydra acts on it where Hydra never calls the job that checks it (`--cfg`
    prints and runs nothing) or calls it once per trial (a sweep): a wrong value is refused once, before
    any trial starts. The keys a sweep varies are left to each trial's own check."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args(argv)
    if not (args.cfg or args.multirun):
        return
    from trainer.config import check_config

    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
        fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose(args.config_name or "config", overrides=fixed)
    except Exception:  # a syntax or composition error: Hydra reports it itself below
        return
    check_config(cfg)


def one_line(error: BaseException) -> str:
    """The user-facing line, also when the error was re-raised from a DataLoader worker."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [
        type(error).__name__
    ]
    if len(lines) > 1 and "Traceback" in str(error):
        return lines[-1].split("UserError: ", 1)[-1]
    return lines[0].split("\n    full_key:")[0]


class TrialFailed(Exception):
    """A sweep's trial ended with a user error: Hydra records it on the trial and the sweeper decides."""


def _fail(message: str, in_sweep: bool = False) -> None:
    if logging.getLogger().handlers:  # inside the job: the console and train.log
        log.error(message)
    else:
        print(f"error: {message}", file=sys.stderr)
    if in_sweep:
        raise TrialFailed(message) from None
    sys.exit(2)


def main() -> None:
    args = sys.argv[1:]
    if args == ["--version"]:  # Hydra's own flag would print Hydra's version
        from trainer import __version__

        print(f"trainer {__version__}")
        return
    if args[:1] == ["--docs"]:
        from trainer.cli_help import docs

        print(docs(args[1] if len(args) > 1 else None))
        return
    roots = config_roots(args)
    if problem := (roots and unknown_choice(args, roots)) or unwritable_run_dir(args):
        _fail(problem)
    if "--help" in args or "-h" in args:
        print_help(args, roots or [Path(config_dir())])
        return
    sys.argv[1:] = ["verbose=true" if arg in ("-v", "--verbose") else arg for arg in args]
    try:
        check_before_hydra(sys.argv[1:])
    except UserError as e:
        _fail(one_line(e))
    try:
        _hydra_main()
    except KeyboardInterrupt:  # Ctrl-C; what was saved stays, and the same command continues from it
        print("trainer: interrupted", file=sys.stderr)
        sys.exit(130)


def print_help(args: list[str], roots: list[Path]) -> None:
    """Groups, options and examples; the composed config only when an exp is named."""
    from trainer.cli_help import help_text

    overrides = [arg for arg in args if arg not in ("--help", "-h")]
    composed = None
    if any(arg.lstrip("+").startswith("exp=") for arg in overrides):
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        composed = OmegaConf.to_yaml(cfg)
    print(help_text(roots, composed))


if __name__ == "__main__":
    main()

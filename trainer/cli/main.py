"""`python -m trainer +exp=dcgan [key=value ...]`: compose the config with Hydra, hand it to the launcher.

Problems the user can fix (an unknown group option, a wrong key or type, missing data, a bad checkpoint) end
as one `error:` line and exit code 2; the override syntax errors that Hydra reports itself exit with 1.
"""

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from trainer.cli.preflight import (
    check_before_hydra,
    config_dir,
    config_roots,
    unknown_choice,
    unwritable_run_dir,
)
from trainer.errors import UserError
from trainer.reporting.console import SUMMARY_LOGGER, setup_logging

log = logging.getLogger("trainer")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One run; in a multirun (`-m`), one trial, which returns the best value of `monitor.metric` to the
    sweeper. The run's summary (written by its rank zero) is shown last, then the error if any."""
    from trainer.config.build import build
    from trainer.config.check import check_config
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
    """The summary the run wrote (trainer/reporting/summary.py), to the console and train.log; nothing when no
    training started (a config error, a submitted job)."""
    from trainer.reporting.summary import SUMMARY_FILE

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


def importable_working_directory() -> None:
    """Own modules (`_target_: classifier.DigitClassifier`) import from the working directory, as under
    `python -m trainer`, which puts it first on sys.path; the `trainer` console script puts its own folder
    there instead. Not under `python -P` (PYTHONSAFEPATH), which asks for neither."""
    cwd = os.getcwd()
    if not getattr(sys.flags, "safe_path", False) and not {"", cwd} & set(sys.path):  # (safe_path: 3.11)
        sys.path.insert(0, cwd)


def main() -> None:
    importable_working_directory()
    args = sys.argv[1:]
    if args == ["--version"]:  # Hydra's own flag would print Hydra's version
        from trainer import __version__

        print(f"trainer {__version__}")
        return
    if args[:1] == ["--docs"]:  # the docs pages' sections about a word (exit 1: none)
        from trainer.cli.docs import search

        text, code = search(" ".join(args[1:]))
        print(text)
        if code:
            sys.exit(code)
        return
    roots = config_roots(args)
    if roots and (problem := unknown_choice(args, roots)):
        _fail(problem)
    if "--help" in args or "-h" in args:
        print_help(args, roots or [Path(config_dir())])
        return
    sys.argv[1:] = ["verbose=true" if arg in ("-v", "--verbose") else arg for arg in args]
    try:
        check_before_hydra(sys.argv[1:])
    except UserError as e:
        _fail(one_line(e))
    if problem := unwritable_run_dir(args):  # (it makes the run dir: only for a config that passed)
        _fail(problem)
    try:
        _hydra_main()
    except KeyboardInterrupt:  # Ctrl-C; what was saved stays, and the same command continues from it
        print("trainer: interrupted", file=sys.stderr)
        sys.exit(130)


def print_help(args: list[str], roots: list[Path]) -> None:
    """Groups, options and examples; the composed config only when an exp is named."""
    from trainer.cli.help import help_text

    overrides = [arg for arg in args if arg not in ("--help", "-h")]
    composed = None
    if any(arg.lstrip("+").startswith("exp=") for arg in overrides):
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        composed = OmegaConf.to_yaml(cfg)
    print(help_text(roots, composed))

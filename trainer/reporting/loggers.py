"""Loggers. W&B is the default. Its mode: `logger.wandb.mode` when set; else W&B's own settings
(`WANDB_MODE`, or what `wandb offline` / `wandb online` saved); else online with an API key and offline
without one (no account, no prompt, no hang).

The W&B run id is kept in <run dir>/wandb_run.json, so a resumed or requeued run continues the same W&B
run instead of starting a new one.
"""

import json
import netrc
import os
import secrets
import string
import sys
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from trainer.files import write_text_atomic

RUN_POINTER = "wandb_run.json"
Mode = Literal["auto", "online", "offline", "disabled"]
MODES = get_args(Mode)


def has_wandb_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return host is not None and netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return (
        os.environ.get("WANDB_MODE") or saved_wandb_mode() or ("online" if has_wandb_api_key() else "offline")
    )


def saved_wandb_mode() -> str | None:
    """The mode `wandb offline`, `wandb online` or `wandb disabled` saved (in ./wandb/settings or the
    user's W&B config), read the way W&B reads it."""
    from wandb.sdk import wandb_setup

    return wandb_setup.singleton().settings.read_system_settings().all().get("mode") or None


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The run's W&B loggers, for what only W&B shows (tables, boxes, videos, histograms)."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def new_run_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_logger(
    run_dir: str,
    project: str,
    name: str | None = None,
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    mode: Mode = "auto",
    log_checkpoints: bool = True,
    verbose: bool = False,
) -> WandbLogger:
    """`verbose` shows W&B's own console lines (its banner, artifact uploads, the end-of-run history): the
    W&B run has all of it, and the run's summary names the run. A user's own WANDB_QUIET or
    WANDB_SHOW_INFO wins."""
    if not verbose:  # read when W&B loads its settings, which resolving the mode below does
        os.environ.setdefault("WANDB_QUIET", "true")
        os.environ.setdefault("WANDB_SHOW_INFO", "false")
    if group and name:
        name = f"{name}-{Path(run_dir).name}"  # a sweep's trials: dcgan-0, dcgan-1, ...
    pointer = Path(run_dir) / RUN_POINTER
    run_id = json.loads(pointer.read_text())["id"] if pointer.is_file() else new_run_id()
    resolved_mode = resolve_wandb_mode(mode)
    logger = WandbLogger(
        project=project,
        name=name,
        entity=entity,
        group=group,
        tags=list(tags or []),
        save_dir=run_dir,
        id=run_id,
        resume="allow",
        mode=resolved_mode,
        log_model=log_checkpoints,
    )
    # Lightning passes `anonymous=None`, which W&B warns about on every run; None is W&B's default anyway.
    logger._wandb_init.pop("anonymous", None)
    _write_pointer(
        pointer,
        {
            "id": run_id,
            "project": project,
            "entity": entity,
            "mode": resolved_mode,
            "dir": str(Path(run_dir) / "wandb"),
        },
    )
    return logger


@rank_zero_only
def _write_pointer(pointer: Path, data: dict) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    # Every attempt writes it again: a job killed halfway must not leave an empty file that the next fails on.
    write_text_atomic(pointer, json.dumps(data, indent=2) + "\n")


def wandb_run_url() -> str | None:
    """The page of the active W&B run when it is online (an offline run has none until it is synced)."""
    run = sys.modules["wandb"].run if "wandb" in sys.modules else None
    return run.url if run is not None and not run.offline else None


def finish_wandb() -> None:
    """Close the active W&B run, so the next job of a multirun gets its own run."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()

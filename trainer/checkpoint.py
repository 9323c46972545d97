"""Checkpoint files: atomic writes, loads that run no pickled code, and which checkpoint a run resumes
from."""

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from trainer.config.resume import has_last_checkpoint, refuse_changed_config
from trainer.errors import UserError

log = logging.getLogger(__name__)

FIX = "pass a good checkpoint with ckpt_path=PATH, or start fresh with resume=never"


class SafeCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file, fsyncs, then renames over the target: a crash mid-save leaves the previous
    checkpoint intact. Loads with `weights_only=True` and checks the tensors against the model being
    trained."""

    def __init__(self, expected_shapes: dict[str, torch.Size] | None = None):
        super().__init__()
        self.expected_shapes = expected_shapes

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict:
        checkpoint = load_checkpoint_file(path)
        if self.expected_shapes is not None:
            check_matches_model(checkpoint, self.expected_shapes, path)
        return checkpoint


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: {FIX}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, or a pickle that wants to run code
        first_line = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        reason = f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or unsafe to load ({reason}): {FIX}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict): {FIX}")
    return checkpoint


def check_matches_model(
    checkpoint: dict[str, Any], expected: dict[str, torch.Size], path: str | Path
) -> None:
    saved = {k: v.shape for k, v in checkpoint["state_dict"].items()}
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    reshaped = [k for k in expected.keys() & saved.keys() if tuple(expected[k]) != tuple(saved[k])]
    if not (missing or unexpected or reshaped):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown tensors (e.g. {unexpected[0]})")
    if reshaped:
        k = sorted(reshaped)[0]
        problems.append(
            f"{len(reshaped)} of other shape (e.g. {k}: {tuple(saved[k])} vs {tuple(expected[k])})"
        )
    raise UserError(
        f"checkpoint {path} is of another model ({'; '.join(problems)}): use the same task and "
        f"model config as the run that wrote it, or {FIX}"
    )


RESUME_OPTIONS = ("auto", "never", "force")


def resume_checkpoint(
    run_dir: Path,
    resume: str,
    ckpt_path: str | None,
    keep_old: bool = True,
    config: Mapping[str, Any] | None = None,
) -> str | None:
    """The checkpoint to start from: an explicit ckpt_path, else (resume=auto, force) the run dir's last
    checkpoint; resume=auto refuses it when `config` (resolved) changes more of the run's saved config than
    RESUME_SAFE allows.

    With resume=never, earlier checkpoints in the run dir are moved aside (by one process: `keep_old`, which
    also removes what the writes of a killed job left)."""
    if resume not in RESUME_OPTIONS:
        raise UserError(f"resume={resume} is not an option: use resume=auto, never or force")
    if config is not None:
        refuse_changed_config(run_dir, resume, ckpt_path, config)  # before anything in the run dir changes
    if keep_old:
        remove_unfinished_writes(run_dir)
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise UserError(f"ckpt_path={ckpt_path} does not exist: check the path, or drop ckpt_path")
        return str(ckpt_path)
    checkpoints = run_dir / "checkpoints"
    if resume != "never":
        return str(checkpoints / "last.ckpt") if has_last_checkpoint(run_dir) else None
    if keep_old and checkpoints.is_dir() and any(checkpoints.iterdir()):
        # Starting fresh must not destroy what an earlier run saved: keep it beside the new one.
        kept = checkpoints.with_name(f"checkpoints.before-{time.strftime('%Y%m%d-%H%M%S')}")
        checkpoints.rename(kept)
        log.info(f"resume=never, earlier checkpoints kept in {kept}")
    return None


def remove_unfinished_writes(run_dir: Path) -> None:
    """Deletes the temporary files (`.<name>.tmp<pid>`, as big as a checkpoint) of the checkpoint and bundle
    writes that a killed job did not finish. Called as a job starts, before any process of it writes."""
    for folder in [run_dir / "checkpoints", *(run_dir / "divergence").glob("step*")]:
        for unfinished in folder.glob(".*.tmp[0-9]*"):
            unfinished.unlink(missing_ok=True)

"""Whether a run dir may be resumed with a given config: resume=auto continues <run dir>/checkpoints/last.ckpt
only when the run dir's saved config (<run dir>/config.yaml, written by trainer/run.py) differs from the new
one in resume-safe keys alone. Light to import (no torch): the SLURM launcher checks before it submits.
"""

import fnmatch
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainer.errors import UserError

CONFIG_FILE = "config.yaml"  # the resolved config of the run dir's latest run (trainer/run.py)
# The config keys a continued run may change (patterns of dotted keys, `*` any part): resume=auto resumes
# when the saved config differs in these only. Every other change (the model, the data, the task's settings,
# the seed, what is monitored) makes it another run, which must not continue this one's checkpoint unasked.
RESUME_SAFE = (
    "run_dir",  # Hydra's run dir: the same folder by construction (and hydra.* is not in the config)
    "resume",
    "ckpt_path",
    # how long it trains
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.min_epochs",
    "trainer.min_steps",
    "task.total_env_steps",  # RL's budget
    # where, on what and how fast: a SLURM job sets devices, nodes and strategy; Ray's workers their own
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.strategy.*",
    "trainer.precision",
    "trainer.benchmark",
    "trainer.deterministic",
    "launcher",
    "launcher.*",
    "slurm",
    "slurm.*",
    "distributed.*",  # a resume in another sync mode starts it from the checkpoint's weights
    "perf.*",
    "*.channels_last",
    "*.num_workers",
    "*.pin_memory",
    "*.persistent_workers",
    "*.prefetch_factor",
    "*.cache_dir",
    # the callbacks save, watch and report (Ray's workers put a subclass of their own in for last.ckpt); what
    # the run says and records: loggers, console, metrics.json's directions, labels
    "callbacks",
    "callbacks.*",
    "logger",
    "logger.*",
    "verbose",
    "name",
    "tags",
    "group",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.profiler",
    "trainer.profiler.*",
    "metrics.*",
    # the divergence guard watches and acts: after a halt, a run continues with other settings of it
    "divergence.*",
    # settings of the other modes (lr_find, a Tune sweep keeps its own settings when it resumes)
    "lr_find.*",
    "tune",
    "tune.*",
)


def has_last_checkpoint(run_dir: Path) -> bool:
    last = run_dir / "checkpoints" / "last.ckpt"
    return last.is_file() or (last / "meta.pt").is_file()  # (FSDP's sharded checkpoints are folders)


def refuse_changed_config(
    run_dir: Path, resume: str, ckpt_path: str | None, config: Mapping[str, Any]
) -> None:
    """Raises a UserError when resume=auto would continue the run dir's last checkpoint with a config that
    differs from the one saved with it (<run dir>/config.yaml) in a key RESUME_SAFE does not allow: a run dir
    reused by another experiment would otherwise silently continue the earlier one's weights."""
    saved_file = run_dir / CONFIG_FILE
    if resume != "auto" or ckpt_path or not has_last_checkpoint(run_dir) or not saved_file.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_file))
    assert isinstance(saved, dict)  # (a config file is a mapping)
    saved = _moved(saved, str(saved.get("run_dir") or run_dir), str(config.get("run_dir") or run_dir))
    changed = [key for key in differing_keys(saved, config) if not resume_safe(key)]
    if not changed:
        return
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    differ = "differs" if len(changed) == 1 else "differ"
    raise UserError(
        f"run dir {run_dir} holds a run of another config ({shown} {differ} from its {CONFIG_FILE}): "
        "continue it with its own config, start afresh there with resume=never, use another hydra.run.dir, "
        "or continue its checkpoint with this config anyway with resume=force"
    )


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two nested configs, or that only one of them has."""
    leaves_a, leaves_b = _leaves(a), _leaves(b)
    absent = object()
    return sorted(
        k for k in leaves_a.keys() | leaves_b.keys() if leaves_a.get(k, absent) != leaves_b.get(k, absent)
    )


def resume_safe(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_SAFE)


def _moved(node: Any, old: str, new: str) -> Any:
    """The saved config with the paths under its run dir moved to where the run dir is now (a run dir that
    was moved or copied keeps its checkpoints, logs and their paths' meaning)."""
    if isinstance(node, Mapping):
        return {key: _moved(child, old, new) for key, child in node.items()}
    if isinstance(node, list):
        return [_moved(child, old, new) for child in node]
    if isinstance(node, str) and (node == old or node.startswith(f"{old}/")):
        return new + node[len(old) :]
    return node


def _leaves(node: Any, path: str = "") -> dict[str, Any]:
    if not isinstance(node, Mapping) or not node:
        return {path: node}
    found: dict[str, Any] = {}
    for key, child in node.items():
        found.update(_leaves(child, f"{path}.{key}" if path else str(key)))
    return found

"""The end of a sweep: a results table (printed, results.csv, W&B), best.yaml and best_config.yaml.

Both sweep kinds end here: Hydra's multirun (Optuna, or a plain grid) through the `SweepSummary` callback,
and Ray Tune through trainer/sweeps/tune.py. Every trial has its own run dir under the sweep dir with its
resolved config.yaml, metrics.json and trial.json (status, value, steps).
"""

import csv
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainer.files import write_json_atomic
from trainer.sweeps import sweep_group

TRIAL_FILE = "trial.json"


@dataclass
class Trial:
    name: str
    run_dir: str
    status: str  # completed | diverged | failed | stopped early | running
    value: float | None = None  # the best value of the sweep's metric
    steps: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def write_trial(run_dir: Path, **fields: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / TRIAL_FILE, fields)


def read_trials(sweep_dir: Path, params: list[str]) -> list[Trial]:
    """Every trial dir under the sweep dir (those with a config.yaml), in trial order."""
    trials = []
    for config_file in sorted(sweep_dir.glob("*/config.yaml"), key=lambda p: _trial_order(p.parent.name)):
        run_dir = config_file.parent
        config = OmegaConf.load(config_file)
        record_file = run_dir / TRIAL_FILE
        record: dict[str, Any] = (
            json.loads(record_file.read_text()) if record_file.is_file() else {"status": "running"}
        )
        trials.append(
            Trial(
                name=run_dir.name,
                run_dir=str(run_dir),
                params={p: OmegaConf.select(config, p) for p in params},
                **{k: v for k, v in record.items() if k in Trial.__dataclass_fields__},
            )
        )
    return trials


def best_trial(trials: list[Trial], mode: str) -> Trial | None:
    scored = [(t.value, t) for t in trials if t.value is not None and math.isfinite(t.value)]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda scored_trial: scored_trial[0])[1]


def summarize(
    sweep_dir: Path,
    trials: list[Trial],
    metric: str | None,
    mode: str,
    wandb_settings: dict[str, Any] | None = None,
    group: str | None = None,
) -> Trial | None:
    """Prints the table and writes results.csv, best.yaml and best_config.yaml; logs the table to W&B."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    params = list(dict.fromkeys(key for t in trials for key in t.params))
    with_steps = any(t.steps is not None for t in trials)  # known where trials may stop early (Tune)
    header = ["trial", *params, metric or "value", *(["steps"] if with_steps else []), "status"]
    rows = [
        [t.name, *(t.params.get(p) for p in params), t.value, *([t.steps] if with_steps else []), t.status]
        for t in trials
    ]
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    print(format_table(header, rows))

    best = best_trial(trials, mode)
    if best is not None:
        overrides = [f"{key}={value}" for key, value in best.params.items()]
        (sweep_dir / "best.yaml").write_text(
            yaml.safe_dump(
                {
                    "metric": metric,
                    "mode": mode,
                    "value": best.value,
                    "trial": best.name,
                    "run_dir": best.run_dir,
                    "params": best.params,
                    "overrides": overrides,
                },
                sort_keys=False,
            )
        )
        shutil.copyfile(Path(best.run_dir) / "config.yaml", sweep_dir / "best_config.yaml")
        print(
            f"trainer: best {metric} = {best.value:.6g} ({mode}) in trial {best.name}: {' '.join(overrides)}"
        )
        print(f"trainer: {sweep_dir / 'best.yaml'}, full config {sweep_dir / 'best_config.yaml'}")
    elif metric:
        print(f"trainer: no trial finished with a value of {metric}; see {sweep_dir / 'results.csv'}")
    if wandb_settings is not None:
        log_table_to_wandb(sweep_dir, header, rows, best, metric, wandb_settings, group)
    return best


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def log_table_to_wandb(
    sweep_dir: Path,
    header: list[str],
    rows: list[list[Any]],
    best: Trial | None,
    metric: str | None,
    settings: dict[str, Any],
    group: str | None,
) -> None:
    """One more run in the sweep's group, holding the results table and the best trial."""
    import wandb

    from trainer.reporting.loggers import resolve_wandb_mode

    mode = resolve_wandb_mode(settings.get("mode", "auto"))
    if mode == "disabled":
        return
    run = wandb.init(
        project=settings.get("project"),
        entity=settings.get("entity"),
        group=group,
        name=f"{group or sweep_dir.name}-summary",
        job_type="sweep-summary",
        dir=str(sweep_dir),
        mode=mode,  # pyright: ignore[reportArgumentType]  # (a mode W&B's own settings gave: it checks it)
        reinit="create_new",
    )
    try:
        run.log(
            {
                "sweep/results": wandb.Table(
                    columns=list(header), data=[[_plain(v) for v in row] for row in rows]
                )
            }
        )
        if best is not None:
            run.summary.update(
                {
                    f"best/{metric}": best.value,
                    "best/trial": best.name,
                    **{f"best/{k}": _plain(v) for k, v in best.params.items()},
                }
            )
    finally:
        run.finish()


class SweepSummary(Callback):
    """Hydra callback for multirun sweeps: each job records its outcome, the sweep ends with the summary."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status != JobStatus.COMPLETED:
            try:
                _ = job_return.return_value  # Hydra hands a failed trial's exception back only by raising it
            except Exception as e:
                write_trial(run_dir, status="failed", error=str(e))
            return
        value = job_return.return_value  # NaN: the divergence guard halted the trial
        if value is not None and not math.isfinite(value):
            write_trial(run_dir, status="diverged")
        else:
            write_trial(run_dir, status="completed", value=value)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        params = list(OmegaConf.select(config, "hydra.sweeper.params") or {})
        if not params:  # a plain multirun (a=1,2 b=3,4): the keys it sweeps over
            parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
            params = [o.key_or_group for o in parsed if o.is_sweep_override()]
        summarize(
            sweep_dir,
            read_trials(sweep_dir, params),
            config.monitor.metric,
            config.monitor.mode,
            wandb_settings=wandb_settings(config),
            group=config.group or sweep_group(config.name, sweep_dir),
        )


def wandb_settings(config: DictConfig) -> dict[str, Any] | None:
    """Where the summary run goes: the project, entity and mode of the sweep's W&B logger, if it has one."""
    logger = OmegaConf.select(config, "logger.wandb")
    return {key: logger.get(key) for key in ("project", "entity", "mode")} if logger else None


def _trial_order(name: str) -> tuple[int, str]:
    digits = "".join(c for c in name if c.isdigit())
    return (int(digits) if digits else -1, name)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)

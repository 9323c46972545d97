"""`mode=tune`: a sweep with Ray Tune on the Ray cluster of `launcher=ray`.

    python -m trainer +exp=dcgan hparams_search=dcgan_asha [tune.num_samples=16] [launcher.address=auto]

Trials run `tune.max_concurrent` at a time, each a Ray Train run of `launcher.num_workers` workers (exactly
what `launcher=ray` runs); every epoch's checkpoint report carries the validation metrics to Tune, where ASHA
stops the weak trials early and Optuna (or random search) proposes the next parameters. The search space
uses Hydra's sweep syntax, as the Optuna configs do: `interval(a, b)`, `tag(log, interval(a, b))`,
`choice(a, b, c)`, `range(start, stop, step)`.

The run dir is the sweep dir: <run dir>/trial-00000, ... are the trials' run dirs (config.yaml,
metrics.json, checkpoints, W&B run, trial.json) and <run dir>/tune Tune's own state. Running the same
command again with the same run dir resumes an interrupted sweep: finished trials are kept, unfinished
ones continue from their last checkpoint.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from trainer.config.build import check_arguments
from trainer.config.plain import plain_dict
from trainer.config.ranges import Interval, Positive
from trainer.errors import UserError
from trainer.sweeps import sweep_group
from trainer.sweeps.summary import Trial, summarize, wandb_settings, write_trial

log = logging.getLogger(__name__)


class RayTrainLauncher(Protocol):
    """What a sweep needs of `launcher=ray` (trainer/launchers/ray.py, which imports this module): a Ray Train
    run of one config; each trial builds one of the launcher's type from its settings (`vars`)."""

    def fit(self, cfg: DictConfig, callbacks: list[Any] | None = None) -> dict[str, Any]: ...


_MISSING = object()


@dataclass
class TuneSettings:
    num_samples: Positive = 8  # trials
    workers_per_trial: Positive = 1  # Ray Train workers of each trial (launcher.num_workers: single runs)
    max_concurrent: Positive = 2  # trials at once, each holding workers_per_trial x resources_per_worker
    search: Literal["optuna", "random"] = "optuna"  # optuna (TPE) | random
    scheduler: Literal["asha", "fifo"] = "asha"  # asha: stop weak trials at each rung | fifo: all to the end
    grace_period: Positive = 1  # reports (epochs) every trial gets before ASHA may stop it
    reduction_factor: Annotated[int, Interval(low=2)] = 2  # ASHA keeps the best 1/reduction_factor per rung
    params: dict[str, str] = field(default_factory=dict)  # config key -> Hydra sweep syntax


def tune_settings(cfg: DictConfig) -> TuneSettings:
    node = cfg.get("tune") or OmegaConf.create({})
    check_arguments(TuneSettings, node, "tune")
    settings = TuneSettings(**plain_dict(node))  # (in range: checked above)
    if not settings.params:
        raise UserError(
            "tune.params is empty: name the keys to search, e.g. tune.params={task.lr: "
            "'tag(log, interval(1e-4, 1e-2))'}"
        )
    if not cfg.monitor.metric:
        raise UserError(
            "mode=tune optimizes monitor.metric, which is not set: set monitor.metric and monitor.mode"
        )
    return settings


def search_space(params: dict[str, str], cfg: DictConfig) -> dict[str, Any]:
    """Tune's search space from Hydra's sweep syntax, one entry per config key."""
    from ray import tune

    parser = OverridesParser.create()
    space = {}
    for key, text in params.items():
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise UserError(f"tune.params: {key} is not a key of the config; check its spelling")
        try:
            override = parser.parse_override(f"{key}={text}")
        except HydraException as e:
            raise UserError(
                f"tune.params.{key}={text} is not Hydra sweep syntax ({e}); use interval(a, b), "
                "tag(log, interval(a, b)), choice(a, b) or range(a, b)"
            ) from None
        value = override.value()
        if not override.is_sweep_override():
            space[key] = value  # a fixed value
        elif isinstance(value, IntervalSweep):  # interval(a, b), possibly int(...) and tag(log, ...)
            log, start, end = "log" in value.tags, value.start, value.end
            assert start is not None and end is not None  # (the grammar's interval has both ends)
            if isinstance(start, int) and isinstance(end, int):
                space[key] = (tune.lograndint if log else tune.randint)(start, end + 1)
            else:
                space[key] = (tune.loguniform if log else tune.uniform)(float(start), float(end))
        else:  # choice(...) or range(...)
            space[key] = tune.choice(list(override.sweep_iterator()))
    return space


def tune_sweep(launcher: RayTrainLauncher, cfg: DictConfig) -> dict[str, Any]:
    """Runs (or resumes) the sweep; returns the best trial's metrics.json content."""
    from ray import tune

    from trainer.sweeps.release import ReleaseStoppedTrials

    settings = tune_settings(cfg)
    space = search_space(settings.params, cfg)
    sweep_dir = Path(cfg.run_dir).resolve()
    group = cfg.group or sweep_group(cfg.name, sweep_dir)
    trainable = tune.with_parameters(
        _run_trial,
        base=_trial_base(cfg, group),
        sweep_dir=str(sweep_dir),
        launcher_type=type(launcher),
        launcher_settings={**vars(launcher), "num_workers": settings.workers_per_trial},
    )
    # A trial only waits for its Ray Train run, whose workers hold the CPUs and GPUs. Tune refuses an empty
    # request, and any CPU fraction would keep a worker's whole CPU from the next trial: one byte of memory.
    trainable = tune.with_resources(trainable, {"memory": 1})
    state = sweep_dir / "tune"
    names = trial_names(state)
    if tune.Tuner.can_restore(state):
        log.info(f"resuming the sweep in {state}")
        tuner = tune.Tuner.restore(str(state), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=cfg.monitor.metric,
                mode=cfg.monitor.mode,
                search_alg=_search(settings, cfg.seed),
                scheduler=_scheduler(settings, cfg),
                num_samples=settings.num_samples,
                max_concurrent_trials=settings.max_concurrent,
                trial_name_creator=names,
                trial_dirname_creator=names,
                reuse_actors=False,  # a stopped trial's actor goes, and with it its Ray Train run and workers
            ),
            run_config=tune.RunConfig(
                name=state.name, storage_path=str(sweep_dir), verbose=1, callbacks=[ReleaseStoppedTrials()]
            ),
        )
    grid = tuner.fit()
    # Ctrl-C ends fit() early; the state Tune saved then still shows the unfinished trials.
    saved = tune.ExperimentAnalysis(str(state)).trials
    # (Ray declares a trial's path Optional; a saved trial has one)
    unfinished = {Path(t.path).name for t in saved if t.status not in ("TERMINATED", "ERROR")}  # pyright: ignore[reportArgumentType]
    finished = not unfinished and len(saved) >= settings.num_samples
    trials = [
        _record(result, cfg.monitor.metric, list(settings.params), cfg.trainer, unfinished) for result in grid
    ]
    best = summarize(sweep_dir, trials, cfg.monitor.metric, cfg.monitor.mode, wandb_settings(cfg), group)
    if not finished:
        log.warning("the sweep was interrupted; run the same command again to resume it")
        raise KeyboardInterrupt
    return {} if best is None else _read_metrics(Path(best.run_dir))


def trial_names(state: Path) -> Callable[[Any], str]:
    """trial-00000, trial-00001, ... in the order Tune creates the trials, continued when a sweep resumes."""
    names: dict[str, str] = {}
    first = len(list(state.glob("trial-*")))

    def name(trial: Any) -> str:
        return names.setdefault(trial.trial_id, f"trial-{first + len(names):05d}")

    return name


def _run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    sweep_dir: str,
    launcher_type: type[RayTrainLauncher],
    launcher_settings: dict[str, Any],
) -> None:
    """One trial, inside Tune: the base config with this trial's parameters, trained with Ray Train."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = OmegaConf.create(base)
    for key, value in params.items():
        OmegaConf.update(cfg, key, value)
    cfg.run_dir = str(Path(sweep_dir) / tune.get_context().get_trial_name())
    launcher_type(**launcher_settings).fit(cfg, callbacks=[TuneReportCallback()])


def _trial_base(cfg: DictConfig, group: str) -> dict[str, Any]:
    """The sweep's config as each trial starts from it: unresolved, so that paths follow the trial's run
    dir."""
    base = plain_dict(cfg, resolve=False)
    base.pop("tune", None)
    base.update(mode="train", group=group, run_dir="???")
    return base


def _search(settings: TuneSettings, seed: int) -> Any:
    if settings.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed)
    try:
        import optuna
    except ImportError:
        raise UserError(
            "tune.search=optuna needs Optuna: pip install 'guarded-trainer[sweeps]', or tune.search=random"
        ) from None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))


def _scheduler(settings: TuneSettings, cfg: DictConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler == "fifo":
        return FIFOScheduler()
    max_epochs = cfg.trainer.get("max_epochs") or 0
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(max_epochs, settings.grace_period),
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )


def _record(result: Any, metric: str, params: list[str], limits: DictConfig, unfinished: set[str]) -> Trial:
    """A trial's row of the results table, also written to its trial.json."""
    name = Path(result.path).name
    run_dir = Path(result.path).parent.parent / name
    last = result.metrics or {}
    value = _read_metrics(run_dir).get(metric, {}).get("best")
    error = str(result.error).strip().splitlines()[-1] if result.error is not None else None
    if error:
        status = "failed"  # a divergence halt too: its error names the bundle
    elif name in unfinished:
        status = "running"
    elif _ran_to_the_end(last, limits):
        status = "completed"
    else:
        status = "stopped early"
    config = result.config or {}
    trial = Trial(
        name=name,
        run_dir=str(run_dir),
        status=status,
        value=value,
        steps=last.get("global_step"),
        params={p: config.get(p) for p in params},
        error=error,
    )
    write_trial(run_dir, status=status, value=value, steps=trial.steps, error=error)
    return trial


def _ran_to_the_end(last: dict[str, Any], limits: DictConfig) -> bool:
    """Whether the trial's last report came from its last epoch or step (`trainer.max_epochs`/`max_steps`)."""
    max_epochs, max_steps = limits.get("max_epochs") or 0, limits.get("max_steps") or -1
    return last.get("epoch", -1) + 1 >= max_epochs or (
        max_steps > 0 and last.get("global_step", 0) >= max_steps
    )


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}

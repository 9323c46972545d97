"""Optuna through Hydra's multirun, on current Optuna: `hydra/sweeper=trainer_optuna`.

Each round asks Optuna for `n_jobs` trials, launches them as one batch with the configured Hydra launcher
(one after another by default, a SLURM job array with `hydra/launcher=submitit_slurm`), and tells Optuna what
each returned: the best value of `monitor.metric`. A trial that failed or returned NaN (it diverged) is
recorded as failed and the sweep goes on. At the end the sweep dir holds `optimization_results.yaml`.

Why not hydra-optuna-sweeper: its last release (1.3) pins optuna<3, which cannot be installed next to the
Optuna 4 that Ray Tune's search uses, so no pip install of both resolves. This is the part of it trainer
uses: the search space in Hydra's sweep syntax, TPE or random sampling, batches, a resumable storage.
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random
    seed: int | None = None
    n_startup_trials: int = 10  # tpe: random trials before TPE models the results


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.trainer_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    sampler: SamplerConf = field(default_factory=SamplerConf)
    direction: str = "minimize"  # or maximize
    study_name: str | None = None
    storage: str | None = None  # e.g. sqlite:///optuna.db: a study that outlives the command, resumable
    n_trials: int = 20
    n_jobs: int = 1  # trials launched at once
    params: dict[str, str] = field(default_factory=dict)  # key: Hydra sweep syntax, e.g. interval(0.1, 0.9)


ConfigStore.instance().store(
    group="hydra/sweeper", name="trainer_optuna", node=OptunaSweeperConf, provider="trainer"
)


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ImportError(
            "hydra/sweeper=trainer_optuna needs Optuna: pip install 'guarded-trainer[sweeps]'"
        ) from None
    return optuna


def make_sampler(name: str, seed: int | None, n_startup_trials: int) -> Any:
    optuna = import_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"hydra.sweeper.sampler.name={name} is not tpe or random")


def distribution(override: Override) -> Any:
    """Optuna's distribution for a sweep override: choice(...) and range(...) are categorical; interval(a, b)
    is uniform, int(interval(a, b)) integer, and tag(log, ...) makes either log-uniform."""
    distributions = import_optuna().distributions
    if override.is_discrete_sweep():
        return distributions.CategoricalDistribution(list(override.sweep_iterator()))
    value = override.value()
    log_scale = "log" in value.tags
    if isinstance(value.start, int) and isinstance(value.end, int):
        return distributions.IntDistribution(value.start, value.end, log=log_scale)
    return distributions.FloatDistribution(float(value.start), float(value.end), log=log_scale)


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: DictConfig,
        direction: str,
        study_name: str | None,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        params: dict[str, str],
    ) -> None:
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction={direction} is not minimize or maximize")
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials}, n_jobs={n_jobs}: each must be at least 1")
        self.sampler = make_sampler(sampler.name, sampler.seed, sampler.n_startup_trials)
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials, self.n_jobs, self.params = n_trials, n_jobs, dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context  # (validate_batch_is_legal reads both)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def sweep(self, arguments: list[str]) -> None:
        # The config's params, then the command line's overrides (a sweep there joins the search space).
        parser = OverridesParser.create()
        overrides = parser.parse_overrides([f"{key}={value}" for key, value in self.params.items()])
        overrides += parser.parse_overrides(arguments)
        by_key = {o.get_key_element(): o for o in overrides}  # a key on the command line wins
        space = {key: distribution(o) for key, o in by_key.items() if o.is_sweep_override()}
        fixed = [o.input_line for o in by_key.values() if not o.is_sweep_override()]
        optuna = import_optuna()
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            direction=self.direction,
            load_if_exists=True,
        )
        done = len(study.trials)  # a resumed study continues its numbering
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [tuple([*fixed, *(f"{k}={v}" for k, v in t.params.items())]) for t in trials]
            self.validate_batch_is_legal(batch)
            for trial, result in zip(trials, self.launcher.launch(batch, initial_job_idx=done)):
                study.tell(trial, *self._outcome(trial.number, result))
            done += len(trials)
        self._write_results(study)

    @staticmethod
    def _outcome(number: int, result: Any) -> tuple[float | None, Any]:
        optuna = import_optuna()
        try:
            value = float(result.return_value)  # raises the trial's own error if it failed
        except Exception as e:  # a failed trial is a result of the sweep, not its end
            log.warning(f"trial {number} failed: {e}")
            return None, optuna.trial.TrialState.FAIL
        if not math.isfinite(value):
            return None, optuna.trial.TrialState.FAIL
        return value, optuna.trial.TrialState.COMPLETE

    def _write_results(self, study: Any) -> None:
        optuna = import_optuna()
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not completed:
            raise RuntimeError(f"every trial of the sweep in {self.sweep_dir} failed: see their train.log")
        results = {"name": "optuna", "best_params": study.best_params, "best_value": study.best_value}
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")

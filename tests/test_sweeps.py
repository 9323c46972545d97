"""Sweeps: Optuna through Hydra multirun, and Ray Tune with ASHA on a real local Ray cluster."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import PAPER_DCGAN, REPO, TINY_DCGAN, cli_env, compose_config, last_step, run_cli
from omegaconf import OmegaConf
from ray import tune
from wandb_offline import find_runs, read_run

from trainer.errors import UserError
from trainer.sweeps.summary import Trial, best_trial
from trainer.sweeps.tune import search_space, tune_settings


def wandb_run(run_dir: Path):
    (path,) = find_runs(run_dir / "wandb")
    return read_run(path, strict=False)


@pytest.mark.slow
def test_an_optuna_sweep_gives_each_trial_its_run_dir_and_wandb_run_and_ends_with_the_best(
    tmp_path: Path, home: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "+exp=dcgan",
        "hparams_search=dcgan_optuna",
        "hydra.sweeper.n_trials=2",
        "++trainer.max_epochs=1",
        "++trainer.limit_train_batches=3",
        f"hydra.sweep.dir={sweep_dir}",
        home=home,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    trials = {}
    for n in ("0", "1"):
        metrics = json.loads((sweep_dir / n / "metrics.json").read_text())
        record = json.loads((sweep_dir / n / "trial.json").read_text())
        # What the trial returned to Optuna is the best value of the monitored metric.
        assert record == {"status": "completed", "value": metrics["val/fid"]["best"]}
        run = wandb_run(sweep_dir / n)
        assert run.exit_code == 0 and run.group == "dcgan-sweep" and run.name == f"dcgan-{n}"
        trials[n] = (record["value"], yaml.safe_load((sweep_dir / n / "config.yaml").read_text()), run.run_id)
    assert trials["0"][2] != trials["1"][2]  # a W&B run each, never merged
    assert trials["0"][1]["task"]["lr"] != trials["1"][1]["task"]["lr"]  # Optuna proposed different values

    best_name = min(trials, key=lambda n: trials[n][0])
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["trial"] == best_name and best["value"] == trials[best_name][0] and best["mode"] == "min"
    assert best["params"]["task.lr"] == trials[best_name][1]["task"]["lr"]
    assert yaml.safe_load((sweep_dir / "best_config.yaml").read_text()) == trials[best_name][1]
    assert (
        yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["best_value"] == best["value"]
    )

    rows = (sweep_dir / "results.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["trial", "task.lr"] and len(rows) == 3
    summary = wandb_run(sweep_dir)  # the table goes to W&B, in the sweep's group
    assert summary.group == "dcgan-sweep" and summary.summary["best/trial"] == best_name
    assert any(f.startswith("media/table/sweep/results") for f in summary.files)


@pytest.mark.slow
def test_a_diverged_trial_is_recorded_and_the_sweep_goes_on(tmp_path: Path, home: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m",
        *TINY_DCGAN,
        "++trainer.max_epochs=1",
        "logger=none",
        "divergence.action=halt",
        "divergence.inject.step=null,2",
        f"hydra.sweep.dir={sweep_dir}",
        home=home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((sweep_dir / "0" / "trial.json").read_text())["status"] == "completed"
    assert json.loads((sweep_dir / "1" / "trial.json").read_text()) == {"status": "diverged"}
    assert "error: divergence at step 2: non-finite gradients" in result.stderr
    table = result.stdout[result.stdout.index("trial  divergence.inject.step") :]
    assert "completed" in table and "diverged" in table


@pytest.mark.slow
def test_a_trial_without_its_metric_fails_with_the_reason(tmp_path: Path, home: Path) -> None:
    result = run_cli(
        "-m",
        *TINY_DCGAN,
        "++trainer.max_epochs=1",
        "logger=none",
        "monitor.metric=train/nope",  # (a val/ metric the task does not declare is refused before any trial)
        "seed=1,2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        home=home,
    )
    assert result.returncode != 0
    assert "error: monitor.metric=train/nope is never logged by the task (it logs [" in result.stderr
    record = json.loads((tmp_path / "sweep" / "0" / "trial.json").read_text())
    assert record["status"] == "failed" and "train/nope" in record["error"]


def test_hydra_sweep_syntax_becomes_a_tune_search_space() -> None:
    cfg = compose_config("+exp=dcgan")
    space = search_space(
        {
            "task.lr": "tag(log, interval(1e-4, 1e-2))",
            "task.beta1": "interval(0.1, 0.9)",
            "model.latent_dim": "int(interval(8, 64))",
            "model.generator.width": "choice(16, 32)",
            "data.batch_size": "range(16, 64, 16)",
            "seed": "7",
        },
        cfg,
    )
    assert isinstance(space["task.lr"], tune.search.sample.Float)
    assert isinstance(space["task.lr"].get_sampler(), tune.search.sample.LogUniform)
    assert (space["task.lr"].lower, space["task.lr"].upper) == (1e-4, 1e-2)
    assert not isinstance(space["task.beta1"].get_sampler(), tune.search.sample.LogUniform)
    assert isinstance(space["model.latent_dim"], tune.search.sample.Integer)
    # interval is inclusive: Tune's upper bound of an integer is exclusive
    assert (space["model.latent_dim"].lower, space["model.latent_dim"].upper) == (8, 65)
    assert space["model.generator.width"].categories == [16, 32]
    assert space["data.batch_size"].categories == [16, 32, 48]
    assert space["seed"] == 7


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+tune.params={task.lrr: 'interval(1, 2)'}"], "tune.params: task.lrr is not a key of the config"),
        (
            ["+tune.params={task.lr: 'interval(1,'}"],
            "tune.params.task.lr=interval(1, is not Hydra sweep syntax",
        ),
        (
            ["+tune.params={task.lr: 'interval(1, 2)'}", "+tune.search=grid"],
            "tune.search='grid' has the wrong type: expected one of 'optuna', 'random'",
        ),
        (["+tune.params={task.lr: 'interval(1, 2)'}", "+tune.num_samples=0"], "tune.num_samples=0"),
        (["+tune.params={task.lr: 'interval(1, 2)'}", "+tune.sampels=3"], "tune.sampels"),
        (["+tune.params={}"], "tune.params is empty"),
    ],
)
def test_bad_tune_settings_are_refused_before_anything_starts(overrides: list[str], message: str) -> None:
    cfg = compose_config("+exp=dcgan", *overrides)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        search_space(tune_settings(cfg).params, cfg)


def test_the_best_trial_skips_unfinished_and_diverged_ones() -> None:
    trials = [
        Trial("a", "a", "completed", 3.0),
        Trial("b", "b", "diverged", float("nan")),
        Trial("c", "c", "running"),
        Trial("d", "d", "stopped early", 2.0),
    ]
    assert best_trial(trials, "min").name == "d" and best_trial(trials, "max").name == "a"
    assert best_trial(trials[1:3], "min") is None


# The paper's DCGAN: the ASHA test pins the order of its trials at the first rung.
TINY_TUNE = [
    *TINY_DCGAN,
    *PAPER_DCGAN,
    "hparams_search=dcgan_asha",
    "++trainer.max_epochs=3",
    "tune.grace_period=1",
]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 230 s alone; over 600 s beside the 2-process FSDP tests on 2 cores
def test_asha_stops_weak_trials_early_and_they_really_run_fewer_steps(tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "sweep"
    # One trial at a time, so that the order in which trials reach ASHA's rungs (and so its decisions) is
    # fixed: with these seeds trial-00002 is behind at the first rung. Epochs long enough that a stop lands
    # mid-run (Tune decides after the report, while training goes on).
    # Each trial's worker takes both CPUs, so that a stopped trial whose workers' resources stay reserved
    # blocks the next one; and RAY_ADDRESS names another cluster (as on a login node set up for job
    # submission), which is where Ray Train's own cleaner looks: the sweep must free them itself.
    result = run_cli(
        *TINY_TUNE,
        "++trainer.max_epochs=6",
        "++trainer.limit_train_batches=12",
        "launcher.resources_per_worker={CPU: 2}",
        "tune.num_samples=3",
        "tune.max_concurrent=1",
        "tune.reduction_factor=3",
        # The pixel Fréchet distance: on runs this short the classifier's FID is about equally bad for every
        # trial (630 to 700), and the order of the trials at the first rung is what this test pins.
        "monitor.metric=val/pixel_fd",
        f"hydra.run.dir={run_dir}",
        home=home,
        env={"RAY_ADDRESS": "127.0.0.1:9"},
        timeout=1100,  # a hang guard, within the test's own
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "released the resources of trial-" in result.stdout + result.stderr
    names = sorted(p.name for p in run_dir.glob("trial-*"))
    assert names == ["trial-00000", "trial-00001", "trial-00002"]  # deterministic names
    full = 6 * 12 * 2  # epochs x batches x two optimizer steps (D and G)
    records = {name: json.loads((run_dir / name / "trial.json").read_text()) for name in names}
    steps = {name: last_step(run_dir / name) for name in names}
    stopped = [n for n, r in records.items() if r["status"] == "stopped early"]
    completed = [n for n, r in records.items() if r["status"] == "completed"]
    assert stopped and completed and len(stopped) + len(completed) == 3, records
    assert all(steps[n] == full == records[n]["steps"] for n in completed)
    # What ran (the trial's own last checkpoint), not only what was reported before the stop.
    assert all(records[n]["steps"] <= steps[n] < full for n in stopped), (records, steps)

    best = yaml.safe_load((run_dir / "best.yaml").read_text())
    values = {n: r["value"] for n, r in records.items()}
    assert best["trial"] == min(values, key=values.get)
    assert OmegaConf.load(run_dir / "best_config.yaml").task.lr == best["params"]["task.lr"]
    assert "stopped early" in result.stdout and "trial-00002" in (run_dir / "results.csv").read_text()
    for name in names:  # each trial its own W&B run, in the sweep's group, and the table in one more
        assert wandb_run(run_dir / name).group == "dcgan-sweep"
    summary = wandb_run(run_dir)
    assert summary.group == "dcgan-sweep" and summary.summary["best/trial"] == best["trial"]


@pytest.mark.slow
def test_tune_runs_trials_at_once(tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "sweep"
    result = run_cli(
        *TINY_TUNE,
        "++trainer.max_epochs=1",
        "logger=none",
        "tune.scheduler=fifo",
        "tune.num_samples=2",
        "tune.max_concurrent=2",
        f"hydra.run.dir={run_dir}",
        home=home,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = re.findall(r"Trial (trial-\d+) (started|completed)", result.stdout)
    first_done = next(i for i, (_, what) in enumerate(events) if what == "completed")
    assert {name for name, what in events[:first_done] if what == "started"} == {"trial-00000", "trial-00001"}
    for name in ("trial-00000", "trial-00001"):
        assert last_step(run_dir / name) == 4 * 2


@pytest.mark.slow
def test_an_interrupted_tune_sweep_resumes_where_it_stopped(tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "sweep"
    args = [
        sys.executable,
        "-m",
        "trainer",
        *TINY_TUNE,
        "++trainer.limit_train_batches=8",
        "tune.scheduler=fifo",
        "tune.num_samples=3",
        "tune.max_concurrent=1",
        f"hydra.run.dir={run_dir}",
    ]
    first = subprocess.Popen(
        args, cwd=REPO, env=cli_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    # trial 0 done, trial 1 under way
    while not (run_dir / "trial-00001" / "checkpoints" / "last.ckpt").exists():
        assert time.monotonic() < deadline and first.poll() is None, (
            "the sweep did not reach its second trial"
        )
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # Ctrl-C
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 130, output[-3000:]
    assert "the sweep was interrupted; run the same command again to resume it" in output
    done_before = (run_dir / "trial-00000" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    assert json.loads((run_dir / "trial-00000" / "trial.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "trial-00001" / "trial.json").read_text())["status"] == "running"
    assert not (run_dir / "trial-00002").exists()

    second = subprocess.run(args, cwd=REPO, env=cli_env(home), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the sweep" in second.stdout + second.stderr
    assert "trainer: resuming from" in second.stdout + second.stderr  # trial 1 from its last checkpoint
    assert sorted(p.name for p in run_dir.glob("trial-*")) == ["trial-00000", "trial-00001", "trial-00002"]
    assert (run_dir / "trial-00000" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == done_before  # kept
    for name in ("trial-00000", "trial-00001", "trial-00002"):
        assert json.loads((run_dir / name / "trial.json").read_text())["status"] == "completed"
        assert last_step(run_dir / name) == 3 * 8 * 2
    runs = [read_run(p, strict=False) for p in find_runs(run_dir / "trial-00001" / "wandb")]
    assert len(runs) == 2 and len({r.run_id for r in runs}) == 1  # the resumed trial continued its W&B run


@pytest.mark.slow
def test_a_tune_sweep_outside_ray_is_refused_with_the_fix(tmp_path: Path, home: Path) -> None:
    result = run_cli(
        "+exp=dcgan", "hparams_search=dcgan_asha", "launcher=local", f"hydra.run.dir={tmp_path}", home=home
    )
    assert result.returncode == 2
    assert (
        "error: mode=tune is a Ray Tune sweep and runs on Ray: use launcher=ray or launcher=slurm"
        in result.stderr
    )


def test_hydra_sweep_syntax_becomes_optuna_distributions() -> None:
    import optuna.distributions as d
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.trainer_optuna_sweeper.optuna_sweeper import distribution

    def parsed(text: str) -> d.BaseDistribution:
        return distribution(OverridesParser.create().parse_override(f"key={text}"))

    assert parsed("tag(log, interval(1e-4, 1e-2))") == d.FloatDistribution(1e-4, 1e-2, log=True)
    assert parsed("interval(0.2, 0.9)") == d.FloatDistribution(0.2, 0.9)
    assert parsed("int(interval(2, 8))") == d.IntDistribution(2, 8)
    assert parsed("choice(16, 32, 64)") == d.CategoricalDistribution([16, 32, 64])
    assert parsed("range(1, 4)") == d.CategoricalDistribution([1, 2, 3])

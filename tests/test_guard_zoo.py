"""The divergence guard judged on real runs, not on injected faults.

- Recorded runs (tests/data/guard, written by `scripts/bench_guard.py --fixtures`): every exp's healthy
  runs at three seeds, where the guard must stay silent with that exp's settings, and the zoo of runs that
  diverged by themselves, each of which it must catch before the run fails.
- Small models that really diverge within seconds here: the guard reports them as they train.
"""

import json
import math
from contextlib import nullcontext, suppress
from pathlib import Path

import pytest
import torch
from helpers import PAPER_DCGAN, TINY_DCGAN, compose_config, divergence_events, divergence_settings

from trainer.divergence.series import detect, read_record
from trainer.errors import DivergedRun
from trainer.run import train

FIXTURES = Path(__file__).parent / "data" / "guard"
HEALTHY = sorted(FIXTURES.glob("healthy-*.jsonl.gz"))
ZOO = sorted(FIXTURES.glob("zoo-*.jsonl.gz"))
QUIET = ["logger=none", "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]


def about(fixture: Path) -> dict:
    """What the bench measured of the recorded run: its exp, and where it failed."""
    return json.loads(fixture.with_name(fixture.name.replace(".jsonl.gz", ".json")).read_text())


def test_the_recordings_are_there() -> None:
    exps = {about(path)["exp"] for path in HEALTHY}
    assert exps == {"dcgan", "detector", "ppo", "dqn", "qa"} and len(HEALTHY) == 15
    assert len(ZOO) >= 6


@pytest.mark.parametrize("fixture", HEALTHY, ids=lambda p: p.name.removesuffix(".jsonl.gz"))
def test_the_guard_is_silent_on_healthy_runs(fixture: Path) -> None:
    record = read_record(fixture)
    assert len(record.steps) > 100  # a whole run
    assert detect(record, divergence_settings(about(fixture)["exp"])) == []


@pytest.mark.parametrize("fixture", ZOO, ids=lambda p: p.name.removesuffix(".jsonl.gz"))
def test_the_guard_catches_every_real_divergence_before_the_run_fails(fixture: Path) -> None:
    facts = about(fixture)
    alarms = detect(read_record(fixture), divergence_settings(facts["exp"]))
    assert alarms, f"{fixture.name}: no alarm, the run failed at step {facts['failure_step']}"
    assert alarms[0][0] <= facts["failure_step"], (alarms[0], facts)


@pytest.mark.parametrize("lr, collapses", [(0.04, True), (2e-4, False)])
def test_a_gan_at_a_learning_rate_far_too_high_collapses_and_is_reported(
    tmp_path: Path, lr: float, collapses: bool
) -> None:
    """A small DCGAN at 200x its learning rate with beta1 0.9 collapses (its samples lose their diversity):
    the guard reports it. At its own learning rate, the same run is not reported."""
    run_dir = tmp_path / "run"
    cfg = compose_config(
        *TINY_DCGAN,
        *PAPER_DCGAN,
        *QUIET,
        f"task.lr={lr}",
        "task.beta1=0.9",
        "++trainer.limit_train_batches=20",
        "++trainer.max_epochs=4",
        "divergence.action=warn",
        run_dir=run_dir,
    )
    with suppress(DivergedRun) if collapses else nullcontext():  # (still collapsed at the end: failed)
        train(cfg)
    detectors = {e["detector"] for e in divergence_events(run_dir)}
    assert ("collapse" in detectors) == collapses and detectors <= {"collapse", "metric"}
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # written before the verdict


@pytest.mark.slow
@pytest.mark.parametrize(
    "algo, overrides, series",
    [
        # updates out of the trust region, then a deterministic policy
        (
            "ppo",
            ["task.lr=0.05", "task.max_grad_norm=1e9", "task.anneal_lr=false", "task.total_env_steps=20480"],
            {"approx_kl", "entropy"},
        ),
        ("dqn", ["task.lr=0.5", "task.learning_starts=1000", "task.total_env_steps=8000"], {"q_values"}),
    ],
)
def test_an_rl_agent_at_a_learning_rate_far_too_high_is_reported(
    tmp_path: Path, algo: str, overrides: list[str], series: set[str]
) -> None:
    run_dir = tmp_path / "run"
    train(
        compose_config(
            f"+exp={algo}",
            *QUIET,
            *overrides,
            "task.env_steps_per_epoch=4096",
            "task.eval_episodes=2",
            "task.video_frames=0",
            "divergence.action=warn",
            run_dir=run_dir,
        )
    )
    assert series & {e["series"] for e in divergence_events(run_dir) if e["detector"] == "collapse"}


@pytest.mark.slow
def test_the_default_runs_of_these_agents_are_not_reported(tmp_path: Path) -> None:
    for algo, budget in (("ppo", 20480), ("dqn", 20000)):
        run_dir = tmp_path / algo
        train(
            compose_config(
                f"+exp={algo}",
                *QUIET,
                f"task.total_env_steps={budget}",
                "task.eval_episodes=2",
                "task.video_frames=0",
                "divergence.action=warn",
                "divergence.record=true",
                run_dir=run_dir,
            )
        )
        assert divergence_events(run_dir) == []
    # The guard sees PPO's gradient norms before PPO clips them to task.max_grad_norm (0.5): an explosion
    # would not show in clipped ones.
    norms = read_record(tmp_path / "ppo" / "divergence" / "series.jsonl").grad_norms("agent")
    assert max(norm for _, norm in norms) > 2.0


@pytest.mark.slow
def test_one_step_at_a_huge_learning_rate_blows_up_a_dqn_and_is_rolled_back_by_default(
    tmp_path: Path,
) -> None:
    """The issue's DQN: one step at a million times its learning rate sends the gradient norm some 1e16 times
    past its median. With the guard's defaults that is certain, not a spike to warn about: the update is
    dropped, the run goes back to its last snapshot at half the learning rate and trains on."""
    run_dir = tmp_path / "run"
    metrics = train(
        compose_config(
            "+exp=dqn",
            *QUIET,
            "task.learning_starts=1000",
            "task.total_env_steps=12000",
            "task.env_steps_per_epoch=4000",
            "task.eval_episodes=2",
            "task.video_frames=0",
            "divergence.inject.step=6",
            "divergence.inject.kind=huge_lr",
            run_dir=run_dir,
        )
    )
    (event,) = [e for e in divergence_events(run_dir) if e["reported"]]
    assert (event["detector"], event["action"], event["step"]) == ("blowup", "rollback", 6)
    assert event["value"] > 100 * event["limit"]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["callbacks"]["DivergenceGuard"]["lr_factor"] == 0.5
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert math.isfinite(metrics["val/return"]["final"])

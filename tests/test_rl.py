"""RL tasks: PPO and DQN on gymnasium's CartPole (and Pendulum for continuous PPO), the sensor-noise wrapper,
GAE, resume with and without the replay buffer, reproducibility, and the bad-input errors."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import QUIET, SHORT_PPO, assert_clean_failure, compose_config, run_cli
from wandb_offline import find_runs, read_run

from trainer.errors import UserError
from trainer.models.rl import QNetwork
from trainer.run import build_task, train
from trainer.tasks.rl.envs import EnvSpec, SensorNoise, env_seeds
from trainer.tasks.rl.ppo import gae

# A few thousand env steps: seconds on 2 cores.
SHORT_DQN = [
    "+exp=dqn",
    "task.total_env_steps=1500",
    "task.learning_starts=500",
    "task.env_steps_per_epoch=500",
    "task.eval_episodes=3",
    *QUIET,
]


class Constant(gym.Env):
    """Always observes ones, never ends: the wrapper's noise is all that moves."""

    observation_space = gym.spaces.Box(-10, 10, (4,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.ones(4, np.float32), {}

    def step(self, action):
        return np.ones(4, np.float32), 0.0, False, False, {}


def observe(env: gym.Env, steps: int, seed: int = 0) -> np.ndarray:
    first, _ = env.reset(seed=seed)
    return np.stack([first] + [env.step(0)[0] for _ in range(steps - 1)])


def test_sensor_noise_has_the_configured_statistics():
    obs = observe(SensorNoise(Constant(), std=0.5), 20_000)
    assert abs((obs - 1).mean()) < 0.01 and abs((obs - 1).std() - 0.5) < 0.01

    p, k = 0.02, 10
    obs = observe(SensorNoise(Constant(), fault_prob=p, fault_steps=k), 50_000)
    assert set(np.unique(obs)) == {0.0, 1.0}
    # Faults start with probability p on a working signal and last k steps: p k / (1 - p + p k) of the time.
    assert abs((obs == 0).mean() - p * k / (1 - p + p * k)) < 0.01
    # Every fault lasts exactly k steps; a new one may start right after (the last may be cut off at the end).
    for signal in (obs == 0).T.astype(int):
        edges = np.flatnonzero(np.diff(np.r_[0, signal, 0]))
        runs = (edges[1::2] - edges[::2])[:-1]
        assert np.all(runs % k == 0) and np.mean(runs == k) > 0.7


def test_sensor_noise_is_seeded_and_leaves_the_dynamics_alone():
    noisy = SensorNoise(gym.make("CartPole-v1"), std=0.1, fault_prob=0.05, fault_steps=3)
    assert np.array_equal(observe(noisy, 8, seed=7), observe(noisy, 8, seed=7))
    clean = gym.make("CartPole-v1")
    observe(noisy, 8, seed=3), observe(clean, 8, seed=3)
    assert np.array_equal(noisy.unwrapped.state, clean.unwrapped.state)  # the noise draws from its own RNG


def test_bad_noise_settings_are_refused():
    with pytest.raises(UserError, match="fault_prob"):
        SensorNoise(Constant(), fault_prob=1.5)


def test_gae_by_hand():
    # One env, 3 steps; obs[2] starts a new episode (dones[2] = 1), and the env is mid-episode at the end.
    rollout = {
        "rewards": torch.tensor([[1.0], [2.0], [3.0]]),
        "values": torch.tensor([[0.5], [1.0], [2.0]]),
        "dones": torch.tensor([[0.0], [0.0], [1.0]]),
        "next_value": torch.tensor([4.0]),
        "next_done": torch.tensor([0.0]),
    }
    g, lam = 0.9, 0.5
    d2 = 3 + g * 4.0 - 2.0  # bootstraps from next_value
    d1 = 2 + 0.0 - 1.0  # the episode ends after step 1: no bootstrap
    d0 = 1 + g * 1.0 - 0.5
    expected = torch.tensor([[d0 + g * lam * d1], [d1], [d2]])
    assert torch.allclose(gae(rollout, g, lam), expected)


def test_env_seeds_differ_per_rank_and_after_a_resume():
    seeds = [tuple(env_seeds(42, rank, steps, 4)) for rank in (0, 1) for steps in (0, 5000)]
    assert len(set(seeds)) == 4 and all(len(set(s)) == 4 for s in seeds)
    assert env_seeds(42, 1, 0, 4) == env_seeds(42, 1, 0, 4)


# -- runs --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_done_when_command_writes_an_episodic_return(tmp_path, home, algo):
    run_dir = tmp_path / algo
    done = run_cli(
        f"+exp={algo}",
        "++trainer.max_steps=20",
        "++trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        home=home,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = {key: metrics[key]["final"] for key in metrics}
    assert metrics["val/return"]["mode"] == "max"
    # CartPole pays 1 per step: a return is its episode's length, in training and in evaluation.
    assert final["val/return"] == final["val/episode_length"]
    assert final["train/episodic_return"] == final["train/episodic_length"]
    run = read_run(find_runs(run_dir / "wandb")[0])
    video = run.summary["val/episode"]
    assert video["_type"] == "video-file" and run.file_path(video["path"]).stat().st_size > 1000
    signals = {
        "ppo": ["approx_kl", "clip_frac", "entropy", "explained_variance", "value_loss"],
        "dqn": ["td_loss", "q_values", "epsilon"],
    }[algo]
    assert all(f"train/{name}" in run.history_keys() for name in signals)


def test_a_seeded_run_is_reproducible(tmp_path):
    runs = [train(compose_config(*SHORT_PPO, run_dir=tmp_path / str(i))) for i in range(2)]
    for metrics in runs:
        del metrics["train/env_steps_per_sec"]  # wall clock
    assert runs[0] == runs[1]
    weights = [
        torch.load(tmp_path / str(i) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for i in range(2)
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    other = train(compose_config(*SHORT_PPO, "seed=7", run_dir=tmp_path / "other"))
    assert other["train/episodic_return"] != runs[0]["train/episodic_return"]


def test_continuous_actions_train_with_ppo(tmp_path):
    metrics = train(compose_config(*SHORT_PPO, "env.id=Pendulum-v1", run_dir=tmp_path))
    assert -2000 < metrics["val/return"]["final"] < 0  # Pendulum's returns are costs


@pytest.mark.parametrize("save_buffer", [True, False])
def test_dqn_resumes_with_or_without_its_replay_buffer(tmp_path, save_buffer):
    first = [*SHORT_DQN, f"task.save_replay_buffer={save_buffer}"]
    train(compose_config(*first, run_dir=tmp_path))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["env_steps"] == 1500
    assert ("replay_buffer" in checkpoint) == save_buffer
    if save_buffer:
        assert checkpoint["replay_buffer"]["size"] == 1500

    train(compose_config(*first, "task.total_env_steps=3000", run_dir=tmp_path))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["env_steps"] == 3000  # counted on from 1500, not from 0
    # With the buffer, every resumed step learns; without it, learning waits for learning_starts transitions.
    updates = (3000 - 1500) // 10 - (0 if save_buffer else 500 // 10 - 1)
    assert checkpoint["global_step"] == (1500 - 500) // 10 + 1 + updates


def test_q_network_acts_in_numpy_as_it_does_in_torch():
    torch.manual_seed(0)
    spec = EnvSpec("CartPole-v1")
    q = QNetwork(spec.observation_space, spec.action_space)
    obs = np.random.default_rng(0).standard_normal((256, 4)).astype(np.float32)

    def by_torch() -> np.ndarray:
        with torch.no_grad():
            return q.greedy(torch.from_numpy(obs)).numpy()

    before = q.act(obs)
    assert (before == by_torch()).all()
    # An optimizer step writes the weights in place; the NumPy views see it.
    optimizer = torch.optim.SGD(q.parameters(), lr=1.0)
    greedy = int(np.bincount(before).argmax())
    q(torch.from_numpy(obs))[
        :, greedy
    ].sum().backward()  # descending the favourite's Q: the other action wins
    optimizer.step()
    after = q.act(obs)
    assert (after == 1 - greedy).all() and (after == by_torch()).all()
    # New storage (a dtype or device move) gets new views.
    q.double()
    with torch.no_grad():
        q.net[-1].bias.copy_(torch.tensor([0.0, 0.0]).index_fill_(0, torch.tensor(greedy), 1e6))
    assert (q.act(obs) == greedy).all()


def test_the_gpu_preset_leaves_rl_without_a_data_module(tmp_path):
    # trainer=gpu sets data loader options; RL has no data module, so they must not become one.
    datamodule, module = build_task(
        compose_config("+exp=ppo", "trainer=gpu", "perf.compile=false", run_dir=tmp_path)
    )
    assert datamodule is None and module.agent is not None


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["+exp=ppo", "env.id=CartPole-v9"],
            "env.id=CartPole-v9 is not a registered gymnasium environment: did you mean",
        ),
        (["+exp=dqn", "env.id=Pendulum-v1"], "DQN needs discrete actions"),
    ],
)
def test_bad_rl_input_is_one_clear_line(tmp_path, home, overrides, message):
    assert_clean_failure(run_cli(*overrides, *QUIET, f"hydra.run.dir={tmp_path}", home=home), message)

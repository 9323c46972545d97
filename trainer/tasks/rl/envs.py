"""Gymnasium environments for the RL tasks: the configured env by id, vectorized, seeded per rank, with an
optional sensor-noise wrapper, and a greedy episode rendered to a GIF for W&B.

Vector envs reset a finished sub-environment in the same step (gymnasium's SAME_STEP autoreset): the step
returns the next episode's first observation and `infos["final_obs"]` holds the last one. That keeps a
rollout free of the dummy "reset" transitions that gymnasium 1.x's default (NEXT_STEP) inserts.
"""

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from PIL import Image

from trainer.config.ranges import Positive
from trainer.errors import UserError


class SensorNoise(gym.ObservationWrapper):
    """Noisy sensors: Gaussian noise of `std` on every signal, and faults: each step a working signal drops
    to zero with probability `fault_prob` and reads zero for `fault_steps` steps. Faults clear on reset.

    The wrapper has its own generator (seeded from the reset seed), so the environment's dynamics draw the
    same numbers with and without it.
    """

    def __init__(self, env: gym.Env, std: float = 0.0, fault_prob: float = 0.0, fault_steps: int = 1):
        super().__init__(env)
        if std < 0 or not 0 <= fault_prob <= 1 or fault_steps < 1:
            raise UserError(
                f"env.sensor_noise: std={std}, fault_prob={fault_prob}, fault_steps={fault_steps} "
                "is not valid: use std >= 0, 0 <= fault_prob <= 1, fault_steps >= 1"
            )
        self.std, self.fault_prob, self.fault_steps = std, fault_prob, fault_steps
        self.rng = np.random.default_rng()
        if env.observation_space.shape is None:
            raise UserError(f"env.sensor_noise: the observations {env.observation_space} are not numbers")
        self.fault_left = np.zeros(env.observation_space.shape, dtype=np.int64)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        if seed is not None:
            self.rng = np.random.default_rng([seed, 0x5E45])
        self.fault_left[:] = 0
        return super().reset(seed=seed, options=options)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        noisy = (
            observation + self.std * self.rng.standard_normal(observation.shape) if self.std else observation
        )
        if self.fault_prob:
            healthy = self.fault_left == 0
            self.fault_left[healthy & (self.rng.random(observation.shape) < self.fault_prob)] = (
                self.fault_steps
            )
            noisy = np.where(self.fault_left > 0, 0.0, noisy)
            self.fault_left = np.maximum(self.fault_left - 1, 0)
        return noisy.astype(observation.dtype, copy=False)


class EnvSpec:
    """What to make: a gymnasium id with its keyword arguments, and the noise on its sensors (for training,
    and separately for evaluation, so a policy trained clean can be evaluated noisy and the reverse)."""

    def __init__(
        self,
        id: str,
        kwargs: dict[str, Any] | None = None,
        max_episode_steps: Positive | None = None,
        sensor_noise: dict[str, Any] | None = None,
        eval_sensor_noise: dict[str, Any] | None = None,
    ):
        self.id, self.kwargs, self.max_episode_steps = id, dict(kwargs or {}), max_episode_steps
        self.sensor_noise, self.eval_sensor_noise = dict(sensor_noise or {}), dict(eval_sensor_noise or {})
        env = self.make()  # fails here, before any training, on an unknown id or bad noise settings
        observation_space, self.action_space = env.observation_space, env.action_space
        env.close()
        if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
            raise UserError(
                f"env.id={id} has observations {observation_space}: the RL tasks take a flat "
                "Box (a vector of numbers); flatten it with a gymnasium wrapper in env.kwargs' env"
            )
        self.observation_space = observation_space

    def make(self, noise: dict[str, Any] | None = None, render_mode: str | None = None) -> gym.Env:
        try:
            env = gym.make(
                self.id, max_episode_steps=self.max_episode_steps, render_mode=render_mode, **self.kwargs
            )
        except gym.error.Error as e:
            if self.id in gym.registry:
                raise UserError(f"env.id={self.id}: {e}") from None
            close = difflib.get_close_matches(self.id, list(gym.registry), n=3)
            hint = (
                f"did you mean {' or '.join(close)}?"
                if close
                else "e.g. CartPole-v1, Acrobot-v1, Pendulum-v1"
            )
            raise UserError(f"env.id={self.id} is not a registered gymnasium environment: {hint}") from None
        except TypeError as e:
            raise UserError(f"env.kwargs do not fit {self.id}: {e}") from None
        noise = self.sensor_noise if noise is None else noise
        return SensorNoise(env, **noise) if noise_enabled(noise) else env

    def make_vector(self, num_envs: int, evaluation: bool = False) -> gym.vector.VectorEnv:
        noise = self.eval_sensor_noise if evaluation else self.sensor_noise
        envs = gym.vector.SyncVectorEnv(
            [lambda: self.make(noise) for _ in range(num_envs)], autoreset_mode=AutoresetMode.SAME_STEP
        )
        return gym.wrappers.vector.RecordEpisodeStatistics(envs)

    @property
    def discrete(self) -> bool:
        return isinstance(self.action_space, gym.spaces.Discrete)


class TrainingEnvs:
    """One rank's training environments: the current observations and done flags (NumPy, as the environments
    give them; each task converts what its model needs), the env steps of all ranks together, and (return,
    length) of the episodes that ended since the last read.

    A plain object, not part of the LightningModule: its fields change every env step, and setting an
    attribute of an nn.Module costs microseconds that add up at thousands of steps per second."""

    def __init__(self, spec: EnvSpec, num_envs: int, world_size: int):
        self.spec, self.num_envs, self.world_size = spec, num_envs, world_size
        self.vector = spec.make_vector(num_envs)
        self.env_steps = 0
        self.episodes: list[tuple[float, int]] = []
        self.obs = np.zeros((num_envs, *spec.observation_space.shape), np.float32)
        self.done = np.zeros(num_envs, bool)

    def reset(self, seeds: list[int]) -> None:
        # (one seed per environment, which SyncVectorEnv takes; VectorEnv declares one int)
        self.obs, _ = self.vector.reset(seed=seeds)  # pyright: ignore[reportArgumentType]
        self.done = np.zeros(self.num_envs, bool)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """(next observations, rewards, terminated, truncated, infos); `obs` and `done` move on."""
        obs, rewards, terminated, truncated, infos = self.vector.step(actions)
        if "episode" in infos:
            ended = infos["_episode"]
            self.episodes += zip(infos["episode"]["r"][ended].tolist(), infos["episode"]["l"][ended].tolist())
        self.env_steps += self.num_envs * self.world_size
        self.obs, self.done = obs, terminated | truncated
        return obs, rewards, terminated, truncated, infos

    def take_episodes(self) -> list[tuple[float, int]]:
        episodes, self.episodes = self.episodes, []
        return episodes

    def close(self) -> None:
        self.vector.close()


def as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device)


def to_env(spec: EnvSpec, actions: torch.Tensor) -> np.ndarray:
    """Actions as the environments take them: numpy, and within the bounds of a continuous action space."""
    array = actions.cpu().numpy()
    space = spec.action_space
    return np.clip(array, space.low, space.high) if isinstance(space, gym.spaces.Box) else array


def noise_enabled(noise: dict[str, Any]) -> bool:
    return bool(noise.get("std") or noise.get("fault_prob"))


def env_seeds(seed: int, rank: int, env_steps: int, count: int) -> list[int]:
    """Reset seeds for `count` training environments: distinct per rank, and fresh after a resume (the
    environments' own state is not in a checkpoint, so a resumed run starts new episodes)."""
    return np.random.SeedSequence([seed, rank, env_steps]).generate_state(count).tolist()


def render_episode(
    spec: EnvSpec,
    policy: Callable[[np.ndarray], np.ndarray],
    seed: int,
    path: Path,
    max_frames: int = 300,
    fps: int = 30,
) -> Path | None:
    """Plays one greedy episode with rendering off screen and writes it as a GIF; None where the env cannot
    render to an array (no pygame, or an env without rgb_array)."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame draws off screen, no display needed
    try:
        env = spec.make(spec.eval_sensor_noise, render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        frames = [env.render()]
    except (gym.error.Error, ImportError):  # DependencyNotInstalled is a gym.error.Error
        return None
    done = False
    while not done and len(frames) < max_frames:
        obs, _, terminated, truncated, _ = env.step(policy(obs[None])[0])
        frames.append(env.render())
        done = terminated or truncated
    env.close()
    images = [Image.fromarray(frame).reduce(2) for frame in frames if isinstance(frame, np.ndarray)]
    if not images:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    return path

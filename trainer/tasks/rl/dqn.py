"""DQN (Mnih et al., 2015) with the details of CleanRL's dqn.py: a replay buffer, a target network copied
every `target_network_frequency` env steps, an epsilon-greedy policy whose epsilon falls linearly, and
optionally Double DQN (van Hasselt et al., 2016): the online network picks the next action, the target
network values it.

The algorithm alternates: play `train_frequency` steps in the environments, storing every transition, then
one gradient step on a minibatch drawn from the buffer (once it holds `learning_starts` transitions). A
training step runs `updates_per_step` of these rounds, so that Lightning's per-step work (about a
millisecond with the default callbacks) is shared by many env steps; the algorithm is the same.
Read `training_step`, then `update`.

The replay buffer is saved in checkpoints (`save_replay_buffer`), so a resumed run goes on with the same
transitions; without it, a resumed run refills `learning_starts` transitions before it learns again.
"""

import copy
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from trainer.config.ranges import (
    Fraction,
    FractionAboveZero,
    NonNegative,
    Positive,
    PositiveFloat,
    Seed,
)
from trainer.errors import UserError
from trainer.models.rl import QNetwork
from trainer.tasks.base import ValueReport
from trainer.tasks.rl.base import RLTask
from trainer.tasks.rl.envs import EnvSpec

Batch = dict[str, torch.Tensor]


class DQN(RLTask):
    def __init__(
        self,
        q_network: Callable[..., QNetwork],
        env: EnvSpec,
        seed: Seed,
        total_env_steps: Positive = 300_000,
        num_envs: Positive = 1,
        lr: PositiveFloat = 2.5e-4,
        buffer_size: Positive = 10_000,
        gamma: Fraction = 0.99,
        target_network_frequency: Positive = 500,
        tau: FractionAboveZero = 1.0,
        batch_size: Positive = 128,
        start_e: Fraction = 1.0,
        end_e: Fraction = 0.05,
        exploration_fraction: FractionAboveZero = 0.5,  # (the schedule divides by it)
        learning_starts: NonNegative = 10_000,
        train_frequency: Positive = 10,
        updates_per_step: Positive = 50,
        double_dqn: bool = False,
        save_replay_buffer: bool = True,
        env_steps_per_epoch: Positive = 10_000,
        eval_episodes: Positive = 10,
        eval_seed: Seed = 1_000_000,
        video_frames: NonNegative = 200,
    ):
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise UserError(
                f"DQN needs discrete actions, and env.id={env.id} has {env.action_space}: "
                "train it with +exp=ppo, or pick an environment with discrete actions"
            )
        super().__init__(
            env=env,
            num_envs=num_envs,
            env_steps_per_batch=updates_per_step * train_frequency * num_envs,
            total_env_steps=total_env_steps,
            env_steps_per_epoch=env_steps_per_epoch,
            eval_episodes=eval_episodes,
            eval_seed=eval_seed,
            video_frames=video_frames,
            seed=seed,
        )
        self.save_hyperparameters(ignore=["q_network", "env"])
        self.automatic_optimization = False  # some steps only play; Lightning must not call backward
        self.q_network = q_network(env.observation_space, env.action_space)
        self.target_network = copy.deepcopy(self.q_network).requires_grad_(False)
        self.buffer = ReplayBuffer(buffer_size, env.observation_space.shape)
        # Read at every env step: plain numbers, not hparams lookups.
        self.num_actions = int(env.action_space.n)
        self.exploration = (start_e, end_e, exploration_fraction * total_env_steps)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.q_network.parameters(), lr=self.hparams.lr, fused=self.fused_optimizer)

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        hp = self.hparams
        if batch:  # a replayed divergence bundle: one update on its minibatch
            updates = [self.update(batch)]
        else:
            updates = []
            for _ in range(hp.updates_per_step):
                # 1. Play train_frequency epsilon-greedy steps in the environments, storing every transition.
                for _ in range(hp.train_frequency):
                    self.play_step()
                # 2. Once the buffer holds learning_starts transitions: one update on a minibatch drawn
                # from it.
                if len(self.buffer) >= hp.learning_starts:
                    updates.append(self.update(self.buffer.sample(hp.batch_size, self.device)))
        if updates:  # for the divergence guard (trainer/tasks/base.py): the means over this step's updates
            td_loss, q_values = torch.stack(updates).mean(0)
            reward = self.buffer.max_abs_reward()  # (none in a replay: its buffer is empty)
            max_return = reward / (1 - hp.gamma) if reward and hp.gamma < 1 else None
            self.report(ValueReport(losses={"td_loss": td_loss}, q_values=q_values, max_return=max_return))

    def update(self, batch: Batch) -> torch.Tensor:
        """One gradient step on a minibatch of transitions; returns its TD loss and mean Q-value."""
        hp = self.hparams
        self.train_on(batch)
        # TD target: r + gamma * Q_target(s', a'), a' greedy under Q_target (DQN) or under Q (Double DQN).
        with torch.no_grad():
            next_q = self.target_network(batch["next_obs"])
            if hp.double_dqn:
                next_q = next_q.gather(1, self.q_network(batch["next_obs"]).argmax(1, keepdim=True)).squeeze(
                    1
                )
            else:
                next_q = next_q.max(1).values
            td_target = batch["rewards"] + hp.gamma * next_q * (1 - batch["terminated"])

        # Regress Q(s, a) on it.
        q = self.q_network(batch["obs"]).gather(1, batch["actions"][:, None]).squeeze(1)
        loss = F.mse_loss(q, td_target)
        optimizer = self.optimizer()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()

        # Every target_network_frequency env steps: move the target network towards Q (tau=1: copy it).
        if self.env_steps // hp.target_network_frequency > self.target_updates:
            self.target_updates = self.env_steps // hp.target_network_frequency
            for target, online in zip(self.target_network.parameters(), self.q_network.parameters()):
                target.lerp_(online.detach(), hp.tau)
        return torch.stack([loss, q.mean()]).detach()

    def play_step(self) -> None:
        """One epsilon-greedy step of every environment; stores its transitions."""
        envs = self.envs
        assert envs is not None  # (setup)
        obs = envs.obs
        if np.random.random() < self.epsilon():
            actions = np.random.randint(self.num_actions, size=self.num_envs)
        else:
            actions = self.q_network.act(obs)
        next_obs, rewards, terminated, _, infos = envs.step(actions)
        # An episode that ended here: next_obs already starts the next one; its true last observation is
        # final_obs.
        if envs.done.any():
            next_obs = next_obs.copy()
            next_obs[envs.done] = np.stack(infos["final_obs"][envs.done])
        self.buffer.add(obs, actions, rewards, next_obs, terminated)

    def epsilon(self) -> float:
        start, end, duration = self.exploration
        return start + min(1.0, self.env_steps / duration) * (end - start)

    def schedules(self) -> dict[str, float]:
        return {"epsilon": self.epsilon()}

    def on_train_start(self) -> None:
        super().on_train_start()
        self.target_updates = self.env_steps // self.hparams.target_network_frequency

    def greedy_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q_network.greedy(obs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.hparams.save_replay_buffer:
            checkpoint["replay_buffer"] = self.buffer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "replay_buffer" in checkpoint:
            self.buffer.load_state_dict(checkpoint["replay_buffer"])
        # (a guard rollback too)
        self.target_updates = self.env_steps // self.hparams.target_network_frequency


class ReplayBuffer:
    """The last `capacity` transitions in preallocated NumPy arrays (cheap to write one row at a time; on a
    GPU only sampled minibatches move); rows drawn uniformly with the global torch RNG, which checkpoints
    keep."""

    FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated")

    def __init__(self, capacity: int, obs_shape: tuple[int, ...]):
        self.capacity, self.position, self.size = capacity, 0, 0
        self.data = {
            "obs": np.zeros((capacity, *obs_shape), np.float32),
            "actions": np.zeros(capacity, np.int64),
            "rewards": np.zeros(capacity, np.float32),
            "next_obs": np.zeros((capacity, *obs_shape), np.float32),
            "terminated": np.zeros(capacity, np.float32),
        }

    def __len__(self) -> int:
        return self.size

    def add(self, *transitions: np.ndarray) -> None:
        """Rows of (obs, actions, rewards, next_obs, terminated), one per environment."""
        n, start = len(transitions[0]), self.position
        # A slice where the rows fit before the end (a few times faster than an index array), else wrap
        # around.
        rows = (
            slice(start, start + n) if start + n <= self.capacity else (start + np.arange(n)) % self.capacity
        )
        for key, values in zip(self.FIELDS, transitions):
            self.data[key][rows] = values
        self.position = (start + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def max_abs_reward(self) -> float | None:
        """The largest reward magnitude held, which bounds the returns (a few microseconds per call)."""
        return float(np.abs(self.data["rewards"][: self.size]).max()) if self.size else None

    def sample(self, batch_size: int, device: torch.device) -> Batch:
        rows = torch.randint(self.size, (batch_size,)).numpy()
        return {key: torch.from_numpy(values[rows]).to(device) for key, values in self.data.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "size": self.size,
            **{k: torch.from_numpy(v) for k, v in self.data.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["obs"].shape != self.data["obs"].shape:
            raise UserError(
                f"the checkpoint's replay buffer holds {tuple(state['obs'].shape)} observations, "
                f"this run's {self.data['obs'].shape}: resume with the same task.buffer_size "
                "and env, or start fresh (resume=never)"
            )
        self.position, self.size = state["position"], state["size"]
        self.data = {key: state[key].numpy().copy() for key in self.data}

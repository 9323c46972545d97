"""What DQN and PPO share: the environments in place of a data set, the env-step budget, greedy evaluation
over a fixed set of seeds, episode statistics, throughput, and an episode GIF for W&B.

An RL training step makes its own data (it plays in the environments), so the train loader yields empty
batches, `batches_per_epoch` of them; an epoch ends with an evaluation. A step names the data it trains on
(`train_on`, trainer/tasks/base.py): a divergence bundle saves that, and `python -m trainer.replay` feeds it
back to `training_step`, which then trains on it instead of playing.
"""

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.callbacks.metrics import log_now
from trainer.data.evaluation import gather_by_key, rank_share
from trainer.lightning_internals import is_logging_step, log_step
from trainer.reporting.loggers import wandb_loggers
from trainer.tasks.base import StepReport, Task
from trainer.tasks.rl.envs import EnvSpec, TrainingEnvs, as_tensor, env_seeds, render_episode, to_env


class EmptyBatches:
    """`length` empty batches per epoch; resumes mid-epoch from a checkpoint like the data loaders do."""

    def __init__(self, length: int):
        self.length, self.yielded, self._resume_at = length, 0, 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        start, self._resume_at = self._resume_at, 0
        for position in range(start, self.length):
            self.yielded = position + 1
            yield {}

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = state["yielded"] % self.length


class RLTask(Task):
    validation_metrics: ClassVar[Mapping[str, str | None]] = {
        "val/return": "max",
        "val/return_std": None,
        "val/episode_length": None,  # (longer is better in CartPole, worse in MountainCar)
    }

    def __init__(
        self,
        *,
        env: EnvSpec,
        num_envs: int,
        env_steps_per_batch: int,
        total_env_steps: int,
        env_steps_per_epoch: int,
        eval_episodes: int,
        eval_seed: int,
        video_frames: int,
        seed: int,
    ):
        super().__init__()
        if env_steps_per_epoch < env_steps_per_batch:
            raise ValueError(
                f"env_steps_per_epoch={env_steps_per_epoch} is less than one training step's "
                f"{env_steps_per_batch} environment steps: raise it"
            )
        self.env = env
        self.num_envs, self.env_steps_per_batch = num_envs, env_steps_per_batch
        self.total_env_steps, self.env_steps_per_epoch = total_env_steps, env_steps_per_epoch
        self.eval_seeds = list(range(eval_seed, eval_seed + eval_episodes))
        self.video_frames, self.seed = video_frames, seed
        self.envs: TrainingEnvs | None = None  # made in setup, when the world size is known
        self._steps_at_log, self._train_time = 0, 0.0  # env steps at the last log, training seconds since
        self._val_returns: dict[int, tuple[float, float]] = {}  # seed -> (return, episode length)

    # -- environments -------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.envs = TrainingEnvs(self.env, self.num_envs, self.trainer.world_size)

    @property
    def env_steps(self) -> int:
        """Environment steps taken so far by all ranks together."""
        return self.envs.env_steps if self.envs is not None else 0

    def progress(self) -> tuple[int, int, str]:
        return self.env_steps, self.total_env_steps, "env steps"

    def on_train_start(self) -> None:
        # After a resume too: the environments' state is not in a checkpoint, so every run starts new
        # episodes.
        assert self.envs is not None  # (setup)
        self.envs.reset(env_seeds(self.seed, self.global_rank, self.env_steps, self.num_envs))
        self._steps_at_log, self._train_time = self.env_steps, 0.0

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.envs is not None:
            self.envs.close()

    # -- the loop: empty batches, an epoch of env steps, a budget -----------------------------------------

    def train_dataloader(self) -> EmptyBatches:
        env_steps_per_batch = self.env_steps_per_batch * self.trainer.world_size
        return EmptyBatches(max(1, self.env_steps_per_epoch // env_steps_per_batch))

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self._train_time += time.perf_counter() - self._batch_start  # evaluation time stays out of steps/s
        if self.env_steps >= self.total_env_steps:
            self.trainer.should_stop = True  # Lightning then validates once more and ends the run
        if is_logging_step(self.trainer):
            self.log_progress()

    def log_report(self, report: StepReport) -> None:
        """Written by `log_progress`, with the episodes and schedules, past Lightning's slow `self.log`."""

    def log_progress(self) -> None:
        """The step's report, the episodes that ended since the last log, and environment steps per second of
        training (playing and learning) since the last log."""
        reported = self.step_report.scalars() if self.step_report is not None else {}
        metrics = {f"train/{k}": v for k, v in {**reported, **self.schedules()}.items()}
        metrics["train/env_steps"] = float(self.env_steps)
        metrics["train/env_steps_per_sec"] = (self.env_steps - self._steps_at_log) / max(
            self._train_time, 1e-9
        )
        self._steps_at_log, self._train_time = self.env_steps, 0.0
        episodes = self.envs.take_episodes() if self.envs is not None else []
        if episodes:
            returns, lengths = zip(*episodes)
            metrics["train/episodic_return"], metrics["train/episodic_length"] = (
                np.mean(returns),
                np.mean(lengths),
            )
        log_now(self.trainer, metrics)

    def schedules(self) -> dict[str, float]:
        """Values that follow a schedule (learning rate, exploration), logged with the step signals."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["env_steps"] = self.env_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.envs is not None:  # (none yet in `load_from_checkpoint`: setup makes them, from 0)
            self.envs.env_steps = checkpoint["env_steps"]

    # -- evaluation: one greedy episode per seed of a fixed set, the seeds shared out among ranks --------

    def greedy_action(self, obs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def val_dataloader(self) -> DataLoader:
        seeds = [torch.tensor(rank_share(self.eval_seeds))]
        # (not the global RNG's draw; a list serves as a data set, though torch declares a Dataset)
        return DataLoader(seeds, batch_size=None, generator=torch.Generator())  # pyright: ignore[reportArgumentType]

    def validation_step(self, seeds: torch.Tensor, batch_idx: int) -> None:
        envs = self.env.make_vector(len(seeds), evaluation=True)
        obs, _ = envs.reset(seed=seeds.tolist())  # pyright: ignore[reportArgumentType]  # (see TrainingEnvs.reset)
        returns = torch.full((len(seeds),), float("nan"))
        lengths = torch.zeros(len(seeds))
        while returns.isnan().any():
            obs, _, _, _, infos = envs.step(to_env(self.env, self.greedy_action(as_tensor(obs, self.device))))
            if "episode" in infos:
                first = infos["_episode"] & returns.isnan().numpy()  # each seed's first episode only
                returns[first] = torch.from_numpy(infos["episode"]["r"][first]).float()
                lengths[first] = torch.from_numpy(infos["episode"]["l"][first]).float()
        envs.close()
        self._val_returns.update(zip(seeds.tolist(), zip(returns.tolist(), lengths.tolist())))

    def on_validation_epoch_end(self) -> None:
        if not self._val_returns:
            return
        returns, lengths = torch.tensor(list(gather_by_key(self._val_returns).values())).T  # each seed once
        self._val_returns = {}
        self.log_dict(
            {
                "val/return": returns.mean(),
                "val/return_std": returns.std(correction=0),
                "val/episode_length": lengths.mean(),
            },
            sync_dist=False,
        )
        self.log_episode_video()

    def log_episode_video(self) -> None:
        loggers = wandb_loggers(self.trainer)
        if (
            not loggers
            or not self.trainer.is_global_zero
            or self.video_frames <= 0
            or self.trainer.sanity_checking
        ):
            return
        import wandb

        path = Path(self.trainer.default_root_dir) / "videos" / f"episode_step{self.global_step:06d}.gif"

        def policy(obs: np.ndarray) -> np.ndarray:
            return to_env(self.env, self.greedy_action(as_tensor(obs, self.device)))

        if render_episode(self.env, policy, self.eval_seeds[0], path, max_frames=self.video_frames):
            for logger in loggers:  # (W&B's takes media; Lightning declares numbers)
                logger.log_metrics(
                    {"val/episode": wandb.Video(str(path), format="gif")},  # pyright: ignore[reportArgumentType]
                    step=log_step(self.trainer),
                )

"""PPO (Schulman et al., 2017) with the details of CleanRL's ppo.py: vectorized environments, GAE, the clipped
objective with clipped values and an entropy bonus, advantage normalization, learning rate annealed to 0.

One training step is one iteration: play `num_steps` steps in each of `num_envs` environments, then
`update_epochs` passes of minibatch updates over that rollout. Read `training_step` top to bottom.
"""

import math
from collections.abc import Callable

import gymnasium as gym
import torch

from trainer.config.ranges import Fraction, NonNegative, NonNegativeFloat, Positive, PositiveFloat, Seed
from trainer.models.rl import ActorCritic
from trainer.tasks.base import PolicyReport
from trainer.tasks.rl.base import RLTask
from trainer.tasks.rl.envs import EnvSpec, as_tensor, to_env

Rollout = dict[str, torch.Tensor]


class PPO(RLTask):
    def __init__(
        self,
        agent: Callable[..., ActorCritic],
        env: EnvSpec,
        seed: Seed,
        total_env_steps: Positive = 150_000,
        num_envs: Positive = 4,
        num_steps: Positive = 128,
        lr: PositiveFloat = 2.5e-4,
        anneal_lr: bool = True,
        gamma: Fraction = 0.99,
        gae_lambda: Fraction = 0.95,
        update_epochs: Positive = 4,
        num_minibatches: Positive = 4,
        norm_adv: bool = True,
        clip_coef: PositiveFloat = 0.2,
        clip_vloss: bool = True,
        ent_coef: NonNegativeFloat = 0.01,
        vf_coef: NonNegativeFloat = 0.5,
        max_grad_norm: PositiveFloat = 0.5,
        target_kl: PositiveFloat | None = None,
        env_steps_per_epoch: Positive = 10_240,
        eval_episodes: Positive = 10,
        eval_seed: Seed = 1_000_000,
        video_frames: NonNegative = 200,
    ):
        super().__init__(
            env=env,
            num_envs=num_envs,
            env_steps_per_batch=num_steps * num_envs,
            total_env_steps=total_env_steps,
            env_steps_per_epoch=env_steps_per_epoch,
            eval_episodes=eval_episodes,
            eval_seed=eval_seed,
            video_frames=video_frames,
            seed=seed,
        )
        self.save_hyperparameters(ignore=["agent", "env"])
        self.automatic_optimization = False  # several updates per rollout
        self.agent = agent(env.observation_space, env.action_space)
        space = env.action_space
        self.max_entropy = math.log(space.n) if isinstance(space, gym.spaces.Discrete) else None  # uniform's

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.agent.parameters(), lr=self.hparams.lr, eps=1e-5, fused=self.fused_optimizer
        )

    def training_step(self, batch: Rollout, batch_idx: int) -> None:
        hp = self.hparams
        optimizer = self.optimizer()
        if hp.anneal_lr:
            optimizer.param_groups[0]["lr"] = hp.lr * max(0.0, 1.0 - self.env_steps / hp.total_env_steps)

        # 1. Rollout with the current policy (a replayed divergence bundle brings its own).
        rollout = batch or self.collect_rollout()
        self.train_on(rollout)

        # 2. Advantages by GAE; the value targets are advantages + values.
        advantages = gae(rollout, hp.gamma, hp.gae_lambda)
        returns = advantages + rollout["values"]
        obs, actions, logprobs, values = (
            rollout[k].flatten(0, 1) for k in ("obs", "actions", "logprobs", "values")
        )
        advantages, returns = advantages.flatten(), returns.flatten()

        # 3. update_epochs passes over the rollout in shuffled minibatches.
        size = len(obs)
        stats = []
        for _ in range(hp.update_epochs):
            for idx in torch.randperm(size, device=self.device).split(size // hp.num_minibatches):
                policy = self.agent.policy(obs[idx])
                logratio = policy.log_prob(actions[idx]) - logprobs[idx]
                ratio = logratio.exp()

                adv = advantages[idx]
                if hp.norm_adv:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                policy_loss = torch.max(
                    -adv * ratio, -adv * ratio.clamp(1 - hp.clip_coef, 1 + hp.clip_coef)
                ).mean()

                new_values = self.agent.value(obs[idx])
                value_loss = (new_values - returns[idx]).square()
                if hp.clip_vloss:  # the value may move at most clip_coef from the rollout's estimate
                    clipped = values[idx] + (new_values - values[idx]).clamp(-hp.clip_coef, hp.clip_coef)
                    value_loss = torch.max(value_loss, (clipped - returns[idx]).square())
                value_loss = 0.5 * value_loss.mean()

                entropy = policy.entropy().mean()
                loss = policy_loss - hp.ent_coef * entropy + hp.vf_coef * value_loss

                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                optimizer.step()  # clips first: on_before_optimizer_step

                with torch.no_grad():  # http://joschu.net/blog/kl-approx.html
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clip_frac = ((ratio - 1).abs() > hp.clip_coef).float().mean()
                stats.append(
                    torch.stack([loss, policy_loss, value_loss, entropy, approx_kl, clip_frac]).detach()
                )
            if hp.target_kl is not None and approx_kl > hp.target_kl:
                break

        # For the divergence guard (tasks/base.py); logged on logging steps (tasks/rl/base.py).
        loss, policy_loss, value_loss, entropy, approx_kl, clip_frac = torch.stack(stats).mean(0)
        # The clipped surrogate is signed, so only the value loss is a loss the guard can compare levels of.
        self.report(
            PolicyReport(
                losses={"value_loss": value_loss},
                signals={
                    "loss": loss,
                    "policy_loss": policy_loss,
                    "clip_frac": clip_frac,
                    "explained_variance": explained_variance(values, returns),
                },
                entropy=entropy,
                max_entropy=self.max_entropy,
                approx_kl=approx_kl,
            )
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Here rather than before optimizer.step(): callbacks (the divergence guard) run first and see the
        # gradient norm before clipping, which is the one that shows an explosion.
        self.clip_gradients(
            optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm"
        )

    def collect_rollout(self) -> Rollout:
        """`num_steps` steps of every environment; `dones[t]` marks obs[t] as the first of a new episode."""
        steps, n, envs = self.hparams.num_steps, self.num_envs, self.envs
        action_shape = self.env.action_space.shape
        assert envs is not None and action_shape is not None  # (setup; ActorCritic takes no other spaces)
        rollout = {
            "obs": torch.empty(steps, *envs.obs.shape, device=self.device),
            "actions": torch.empty(
                steps,
                n,
                *action_shape,
                device=self.device,
                dtype=torch.long if self.env.discrete else torch.float,
            ),
            **{
                k: torch.empty(steps, n, device=self.device)
                for k in ("logprobs", "values", "rewards", "dones")
            },
            "next_value": torch.empty(n, device=self.device),
            "next_done": torch.empty(n, device=self.device),
        }
        with torch.inference_mode():  # filled in place: the tensors themselves stay usable for autograd
            for t in range(steps):
                obs = rollout["obs"][t].copy_(torch.from_numpy(envs.obs))  # to the device, once
                rollout["dones"][t] = torch.from_numpy(envs.done)
                policy = self.agent.policy(obs)
                action = policy.sample()
                rollout["actions"][t], rollout["logprobs"][t] = action, policy.log_prob(action)
                rollout["values"][t] = self.agent.value(obs)
                rollout["rewards"][t] = torch.from_numpy(envs.step(to_env(self.env, action))[1])
            last_obs = as_tensor(envs.obs, self.device)
            rollout["next_value"][:], rollout["next_done"][:] = (
                self.agent.value(last_obs),
                torch.from_numpy(envs.done),
            )
        return rollout

    def greedy_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.agent.greedy(obs)

    def schedules(self) -> dict[str, float]:
        return {"lr": self.optimizer().param_groups[0]["lr"]}


def gae(rollout: Rollout, gamma: float, lam: float) -> torch.Tensor:
    """Generalized advantage estimates (Schulman et al., 2016) of a rollout, shape (steps, envs)."""
    rewards, values = rollout["rewards"], rollout["values"]
    next_values = torch.cat([values[1:], rollout["next_value"][None]])
    next_nonterminal = 1.0 - torch.cat([rollout["dones"][1:], rollout["next_done"][None]])
    deltas = rewards + gamma * next_values * next_nonterminal - values
    advantages = torch.empty_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        last = advantages[t] = deltas[t] + gamma * lam * next_nonterminal[t] * last
    return advantages


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - predicted) / Var(target): 1 for a perfect value function, <= 0 for a useless one."""
    return 1 - (target - predicted).var() / target.var()

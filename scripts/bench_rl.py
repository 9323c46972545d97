"""RL: PPO and DQN on CartPole-v1, `trainer` against plain single-file loops of the same algorithms.

For each algorithm and seed, both sides train to the task's env-step budget (PPO 150k, DQN 300k) in this
process, one after the other, with the same hyperparameters (CleanRL's), the same gymnasium vector envs
(SyncVectorEnv, SAME_STEP autoreset), and the same greedy evaluation (10 fixed seeds) after every
`env_steps_per_epoch` env steps. The plain loops are written the way CleanRL writes them: one function, a
loop over iterations, tensors made from numpy each step. The trainer side runs `+exp=ppo` / `+exp=dqn` with
its full default stack (W&B offline, divergence guard, per-layer gradient norms, checkpoints, metrics.json).

Reported: the first evaluation at which the mean greedy return reached 475 (env steps), the best return,
and environment steps per second of training (evaluation time excluded on both sides).

    python scripts/bench_rl.py [--algos ppo dqn] [--seeds 1 2 3]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import heading, table
from bench_overhead import compose_config

from trainer.run import train

SOLVED = 475.0


def make_envs(env_id: str, n: int) -> gym.vector.VectorEnv:
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_id) for _ in range(n)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


def evaluate(env_id: str, act, seeds: list[int]) -> float:
    """Mean return of one greedy episode per seed."""
    envs = make_envs(env_id, len(seeds))
    obs, _ = envs.reset(seed=seeds)
    returns = np.full(len(seeds), np.nan)
    while np.isnan(returns).any():
        with torch.no_grad():
            obs, _, _, _, infos = envs.step(act(torch.Tensor(obs)).numpy())
        if "episode" in infos:
            first = infos["_episode"] & np.isnan(returns)
            returns[first] = infos["episode"]["r"][first]
    return float(returns.mean())


def layer_init(layer: nn.Linear, std: float = np.sqrt(2)) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, 0.0)
    return layer


def plain_ppo(t: dict, seed: int, log: list) -> float:
    """CleanRL's ppo.py loop; returns training seconds (evaluation excluded)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    envs = make_envs(t["env_id"], t["num_envs"])
    n_obs, n_act = envs.single_observation_space.shape[0], envs.single_action_space.n
    critic = nn.Sequential(
        layer_init(nn.Linear(n_obs, 64)),
        nn.Tanh(),
        layer_init(nn.Linear(64, 64)),
        nn.Tanh(),
        layer_init(nn.Linear(64, 1), std=1.0),
    )
    actor = nn.Sequential(
        layer_init(nn.Linear(n_obs, 64)),
        nn.Tanh(),
        layer_init(nn.Linear(64, 64)),
        nn.Tanh(),
        layer_init(nn.Linear(64, n_act), std=0.01),
    )
    params = [*critic.parameters(), *actor.parameters()]
    optimizer = torch.optim.Adam(params, lr=t["lr"], eps=1e-5)
    steps, n = t["num_steps"], t["num_envs"]
    batch, minibatch = steps * n, steps * n // t["num_minibatches"]
    iterations = t["total_env_steps"] // batch
    obs_buf, actions_buf = torch.zeros(steps, n, n_obs), torch.zeros(steps, n)
    logprobs_buf, rewards_buf, dones_buf, values_buf = (torch.zeros(steps, n) for _ in range(4))
    next_obs, _ = envs.reset(seed=[seed * 100 + i for i in range(n)])
    next_obs, next_done = torch.Tensor(next_obs), torch.zeros(n)
    env_steps, train_time, next_eval = 0, 0.0, t["env_steps_per_epoch"]
    for iteration in range(1, iterations + 1):
        started = time.perf_counter()
        optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / iterations) * t["lr"]
        for step in range(steps):
            env_steps += n
            obs_buf[step], dones_buf[step] = next_obs, next_done
            with torch.no_grad():
                dist = torch.distributions.Categorical(logits=actor(next_obs))
                action = dist.sample()
                values_buf[step] = critic(next_obs).flatten()
            actions_buf[step], logprobs_buf[step] = action, dist.log_prob(action)
            next_obs, reward, terminations, truncations, _ = envs.step(action.numpy())
            rewards_buf[step] = torch.tensor(reward).view(-1)
            next_obs, next_done = (
                torch.Tensor(next_obs),
                torch.Tensor(np.logical_or(terminations, truncations)),
            )
        with torch.no_grad():
            next_value = critic(next_obs).reshape(1, -1)
            advantages, lastgaelam = torch.zeros_like(rewards_buf), 0
            for s in reversed(range(steps)):
                nextnonterminal = 1.0 - (next_done if s == steps - 1 else dones_buf[s + 1])
                nextvalues = next_value if s == steps - 1 else values_buf[s + 1]
                delta = rewards_buf[s] + t["gamma"] * nextvalues * nextnonterminal - values_buf[s]
                advantages[s] = lastgaelam = (
                    delta + t["gamma"] * t["gae_lambda"] * nextnonterminal * lastgaelam
                )
            returns = advantages + values_buf
        b_obs, b_logprobs, b_actions = (
            obs_buf.reshape(-1, n_obs),
            logprobs_buf.reshape(-1),
            actions_buf.reshape(-1),
        )
        b_advantages, b_returns, b_values = (
            advantages.reshape(-1),
            returns.reshape(-1),
            values_buf.reshape(-1),
        )
        b_inds = np.arange(batch)
        for _ in range(t["update_epochs"]):
            rng.shuffle(b_inds)
            for start in range(0, batch, minibatch):
                mb = b_inds[start : start + minibatch]
                dist = torch.distributions.Categorical(logits=actor(b_obs[mb]))
                newlogprob, entropy = dist.log_prob(b_actions.long()[mb]), dist.entropy()
                newvalue = critic(b_obs[mb]).view(-1)
                ratio = (newlogprob - b_logprobs[mb]).exp()
                mb_adv = b_advantages[mb]
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(
                    -mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - t["clip_coef"], 1 + t["clip_coef"])
                ).mean()
                v_unclipped = (newvalue - b_returns[mb]) ** 2
                v_clipped = b_values[mb] + torch.clamp(
                    newvalue - b_values[mb], -t["clip_coef"], t["clip_coef"]
                )
                v_loss = 0.5 * torch.max(v_unclipped, (v_clipped - b_returns[mb]) ** 2).mean()
                loss = pg_loss - t["ent_coef"] * entropy.mean() + v_loss * t["vf_coef"]
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, t["max_grad_norm"])
                optimizer.step()
        train_time += time.perf_counter() - started
        if env_steps >= next_eval or iteration == iterations:
            next_eval += t["env_steps_per_epoch"]
            log.append((env_steps, evaluate(t["env_id"], lambda o: actor(o).argmax(-1), t["seeds"])))
    return train_time


def plain_dqn(t: dict, seed: int, log: list) -> float:
    """CleanRL's dqn.py loop (a numpy replay buffer in place of SB3's); returns training seconds."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    envs = make_envs(t["env_id"], 1)
    n_obs, n_act = envs.single_observation_space.shape[0], envs.single_action_space.n
    envs.single_action_space.seed(seed)

    def q_net() -> nn.Module:
        return nn.Sequential(
            nn.Linear(n_obs, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, n_act)
        )

    q_network, target_network = q_net(), q_net()
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=t["lr"])
    size = t["buffer_size"]
    rb_obs, rb_next = np.zeros((size, n_obs), np.float32), np.zeros((size, n_obs), np.float32)
    rb_act, rb_rew, rb_done = np.zeros(size, np.int64), np.zeros(size, np.float32), np.zeros(size, np.float32)
    pos, full = 0, False
    obs, _ = envs.reset(seed=seed)
    train_time, next_eval, started = 0.0, t["env_steps_per_epoch"], time.perf_counter()
    for global_step in range(1, t["total_env_steps"] + 1):
        duration = t["exploration_fraction"] * t["total_env_steps"]
        epsilon = max(t["end_e"], t["start_e"] + (t["end_e"] - t["start_e"]) * global_step / duration)
        if rng.random() < epsilon:
            actions = np.array([envs.single_action_space.sample()])
        else:
            with torch.no_grad():
                actions = torch.argmax(q_network(torch.Tensor(obs)), dim=1).numpy()
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        real_next_obs = next_obs.copy()
        if terminations[0] or truncations[0]:
            real_next_obs[0] = infos["final_obs"][0]
        rb_obs[pos], rb_next[pos], rb_act[pos], rb_rew[pos], rb_done[pos] = (
            obs[0],
            real_next_obs[0],
            actions[0],
            rewards[0],
            terminations[0],
        )
        pos, full = (pos + 1) % size, full or pos + 1 == size
        obs = next_obs
        if global_step > t["learning_starts"] and global_step % t["train_frequency"] == 0:
            idx = rng.integers(0, size if full else pos, t["batch_size"])
            b_obs, b_next = torch.from_numpy(rb_obs[idx]), torch.from_numpy(rb_next[idx])
            b_act, b_rew, b_done = (
                torch.from_numpy(rb_act[idx]),
                torch.from_numpy(rb_rew[idx]),
                torch.from_numpy(rb_done[idx]),
            )
            with torch.no_grad():
                td_target = b_rew + t["gamma"] * target_network(b_next).max(dim=1).values * (1 - b_done)
            old_val = q_network(b_obs).gather(1, b_act[:, None]).squeeze()
            loss = F.mse_loss(td_target, old_val)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if global_step % t["target_network_frequency"] == 0:
            target_network.load_state_dict(q_network.state_dict())
        if global_step >= next_eval or global_step == t["total_env_steps"]:
            train_time += time.perf_counter() - started
            next_eval += t["env_steps_per_epoch"]
            log.append((global_step, evaluate(t["env_id"], lambda o: q_network(o).argmax(-1), t["seeds"])))
            started = time.perf_counter()
    return train_time


class EvalClock(L.Callback):
    """Fit time minus validation time, and each evaluation's (env steps, mean return)."""

    last: "EvalClock"

    def __init__(self) -> None:
        self.evals: list[tuple[int, float]] = []
        self.train_time = 0.0
        EvalClock.last = self

    def on_train_start(self, *args: object) -> None:
        self.started = time.perf_counter()

    def on_validation_start(self, *args: object) -> None:
        self.train_time += time.perf_counter() - self.started

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evals.append((pl_module.env_steps, float(trainer.callback_metrics["val/return"])))
        self.started = time.perf_counter()


def trainer_run(algo: str, seed: int) -> tuple[float, list]:
    cfg = compose_config(
        f"+exp={algo}",
        f"seed={seed}",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        f"+callbacks.clock._target_={__name__}.EvalClock",
        run_dir=Path(tempfile.mkdtemp()),
    )
    train(cfg)
    return EvalClock.last.train_time, EvalClock.last.evals


def summarize(log: list[tuple[int, float]]) -> tuple[int | None, float]:
    solved = next((steps for steps, ret in log if ret >= SOLVED), None)
    return solved, max(ret for _, ret in log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", nargs="+", default=["ppo", "dqn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    rows = []
    for algo in args.algos:
        cfg = compose_config(f"+exp={algo}")
        t = {
            **cfg.task,
            "env_id": cfg.env.id,
            "seeds": list(range(cfg.task.eval_seed, cfg.task.eval_seed + cfg.task.eval_episodes)),
        }
        for seed in args.seeds:
            plain_log: list = []
            plain_time = (plain_ppo if algo == "ppo" else plain_dqn)(t, seed, plain_log)
            ours_time, ours_log = trainer_run(algo, seed)
            for side, seconds, log in (("plain", plain_time, plain_log), ("trainer", ours_time, ours_log)):
                solved, best = summarize(log)
                env_steps, final = log[-1]
                rows.append((algo, seed, side, solved, best, final, env_steps / seconds))
                print(
                    f"{algo} seed {seed} {side:8}: >= {SOLVED:.0f} at {solved} env steps, best {best:.1f}, "
                    f"final {final:.1f}, {env_steps / seconds:.0f} env steps/s",
                    flush=True,
                )
    seeds = " / ".join(str(seed) for seed in args.seeds)
    print(heading(f"RL against plain single-file loops, seeds {seeds}, {torch.get_num_threads()} threads"))
    lines = []
    for algo in args.algos:
        for side in ("plain", "trainer"):
            mine = [r for r in rows if r[0] == algo and r[2] == side]
            first = " / ".join("-" if r[3] is None else f"{r[3]:,}" for r in mine)
            sps = statistics.median(r[6] for r in mine)
            lines.append([f"{algo.upper()}, {side}", first, f"{max(r[4] for r in mine):.0f}", f"{sps:,.0f}"])
        plain = statistics.median(r[6] for r in rows if r[0] == algo and r[2] == "plain")
        ours = statistics.median(r[6] for r in rows if r[0] == algo and r[2] == "trainer")
        ratio = f"**{ours / plain:.2f}** (target 1.0)"
        lines.append([f"**{algo.upper()} ratio trainer / plain**", "", "", ratio])
    header = [
        "",
        f"first evaluation >= {SOLVED:.0f} (seeds {seeds})",
        "best",
        "env steps/s (median)",
    ]
    print(table(header, lines))


if __name__ == "__main__":
    main()

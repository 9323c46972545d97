"""Networks for the RL tasks, sized from the environment's spaces (the task passes them in).

ActorCritic is PPO's (separate policy and value MLPs, tanh, orthogonal init with a small policy head, as in
"The 37 Implementation Details of PPO"); QNetwork is DQN's (ReLU MLP, one Q-value per action; `act` picks
the environments' actions). A network of your own for DQN provides `forward` and `act` the same way.
"""

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

from trainer.config.ranges import Positive
from trainer.errors import UserError


def mlp(
    inputs: int,
    hidden: Sequence[int],
    outputs: int,
    activation: type[nn.Module],
    out_std: float | None = None,
) -> nn.Sequential:
    """Linear layers with `activation` between them; with `out_std`, orthogonal weights (gain sqrt(2), the
    last layer `out_std`) and zero biases."""
    sizes = [inputs, *hidden, outputs]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layer = nn.Linear(n_in, n_out)
        if out_std is not None:
            nn.init.orthogonal_(layer.weight, out_std if i == len(sizes) - 2 else math.sqrt(2))
            nn.init.zeros_(layer.bias)
        layers += [layer, activation()]
    return nn.Sequential(*layers[:-1])


def flat_size(space: gym.spaces.Space) -> int:
    if space.shape is None:
        raise UserError(f"the RL networks take spaces of numbers (Box, Discrete), not {space}")
    return math.prod(space.shape)


class ActorCritic(nn.Module):
    """A policy over discrete actions (categorical) or continuous ones (diagonal Gaussian with a learned,
    state-independent log std), and a state-value function."""

    def __init__(
        self,
        observation_space: gym.spaces.Box,
        action_space: gym.spaces.Space,
        hidden: Sequence[Positive] = (64, 64),
    ):
        super().__init__()
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        actions = (
            int(action_space.n) if isinstance(action_space, gym.spaces.Discrete) else flat_size(action_space)
        )
        self.critic = mlp(flat_size(observation_space), hidden, 1, nn.Tanh, out_std=1.0)
        self.actor = mlp(flat_size(observation_space), hidden, actions, nn.Tanh, out_std=0.01)
        self.log_std = None if self.discrete else nn.Parameter(torch.zeros(actions))

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """torch.compile the two networks in place: PPO calls them (`policy`, `value`, `greedy`), never
        `forward`. Their `forward`, not their `compile()`: dynamo does not trace a torch.nn container that is
        called on its own (Sequential.compile() compiles nothing)."""
        for network in (self.actor, self.critic):
            network.forward = torch.compile(network.forward, *args, **kwargs)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def policy(self, obs: torch.Tensor) -> Distribution:
        out = self.actor(obs)
        if self.discrete:
            return Categorical(logits=out, validate_args=False)
        assert self.log_std is not None  # (continuous actions)
        return Independent(Normal(out, self.log_std.exp(), validate_args=False), 1, validate_args=False)

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.actor(obs)
        return out.argmax(-1) if self.discrete else out


class QNetwork(nn.Module):
    def __init__(
        self,
        observation_space: gym.spaces.Box,
        action_space: gym.spaces.Discrete,
        hidden: Sequence[Positive] = (120, 84),
    ):
        super().__init__()
        self.net = mlp(flat_size(observation_space), hidden, int(action_space.n), nn.ReLU)
        self._numpy_layers: list[tuple[np.ndarray, np.ndarray]] | None = (
            None  # act()'s views, made on first use
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).argmax(-1)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Greedy actions for the environments' observations, NumPy in and out. On the CPU the forward pass
        runs in NumPy on views of the weights: for the few rows of an env step, PyTorch's per-operation
        overhead is most of the cost (this network, one row: 27 us through torch, 6 through NumPy)."""
        if self._numpy_layers is None:
            first = self.net[0]
            assert isinstance(first, nn.Linear)
            weight = first.weight
            if weight.device.type != "cpu" or weight.dtype == torch.bfloat16:  # (NumPy has no bfloat16)
                with torch.no_grad():
                    return self.greedy(torch.from_numpy(obs).to(weight.device, weight.dtype)).cpu().numpy()
            # Views, not copies: optimizer steps and loaded checkpoints write the parameters in place.
            self._numpy_layers = [
                (layer.weight.detach().numpy().T, layer.bias.detach().numpy())
                for layer in self.net
                if isinstance(layer, nn.Linear)
            ]
        *hidden, (weight, bias) = self._numpy_layers
        for w, b in hidden:
            obs = np.maximum(obs @ w + b, 0)
        return (obs @ weight + bias).argmax(-1)

    def _apply(self, fn: Callable, recurse: bool = True) -> "QNetwork":
        self._numpy_layers = None  # .to(), .double(), ...: the parameters may get new storage
        return super()._apply(fn, recurse)

"""Fully sharded data parallel (FSDP): each rank keeps 1/N of the parameters, gradients and optimizer state
and gathers a unit's parameters only while that unit computes.

Built on Lightning's `FSDPStrategy`, which wraps torch's `FullyShardedDataParallel`. Lightning 2.6 also has
`ModelParallelStrategy` for torch's newer `fully_shard`, but that one asks every task to shard its own model
in `configure_model`, and Lightning's full and sharded checkpoints, its mixed-precision plugin and Ray Train's
`RayFSDPStrategy` are all built on `FSDPStrategy`: it serves every task here unchanged.

What this adds:
- CPU processes (gloo): torch's FSDP must be told the CPU device explicitly, which Lightning does not do, and
  full state dicts are gathered without `offload_to_cpu`, which crashes torch 2.13 on CPU tensors.
- `use_orig_params=True`, always: the model keeps its own parameters (as views into each rank's shard), so
  per-layer names, several optimizers over parts of one model (a GAN's) and the divergence guard work.
- `wrap`: module class names (e.g. BertLayer) that become their own FSDP unit, gathered one at a time, and
  `activation_checkpointing` for the same modules.
- The numbers the guard and the gradient monitor read are of the whole model: `sum_over_shards` adds up
  each rank's part of a sum of squares; `full_state` gathers the whole state on rank 0 for a bundle.
"""

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from lightning.pytorch.strategies import Strategy
from torch import nn

from trainer.errors import UserError

Sharding = Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"]
StateDictType = Literal["full", "sharded"]


class FSDPStrategy(LightningFSDPStrategy):
    def __init__(
        self,
        sharding_strategy: Sharding = "FULL_SHARD",
        wrap: list[str] | None = None,
        activation_checkpointing: bool = False,
        state_dict_type: StateDictType = "full",
        **kwargs: Any,
    ):
        for key, value, choices in (
            ("sharding_strategy", sharding_strategy, get_args(Sharding)),
            ("state_dict_type", state_dict_type, get_args(StateDictType)),
        ):
            if value not in choices:
                raise UserError(f"distributed.fsdp.{key}={value} is not one of {', '.join(choices)}")
        if activation_checkpointing and not wrap:
            raise UserError(
                "distributed.fsdp.activation_checkpointing=true needs the modules to checkpoint: "
                "set distributed.fsdp.wrap, e.g. [BertLayer]"
            )
        kwargs.update(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type)
        super().__init__(use_orig_params=True, **kwargs)
        self.wrap, self.activation_checkpointing = list(wrap or []), activation_checkpointing

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if self.wrap:
            policy = ModuleWrapPolicy(module_classes(model, self.wrap))
            self.kwargs["auto_wrap_policy"] = policy
            if self.activation_checkpointing:
                self._activation_checkpointing_kwargs = {"auto_wrap_policy": policy}
        if isinstance(model, L.LightningModule) and not model.automatic_optimization:
            # A manual step (a GAN's, RL's) runs forward and backward passes through its networks, never
            # through the model's own forward, where FSDP's root would see the backward begin: each
            # network with parameters is its own root.
            for name, network in model.named_children():
                if any(p.requires_grad for p in network.parameters()):
                    setattr(model, name, self._shard(network))
        else:
            model = self._shard(model)  # as Lightning would, but naming the device on CPU too
        self.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning would warn that it is ignored
        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise UserError("FSDP: the model has no parameters to shard")
        return super()._setup_model(model)

    def _shard(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device if self.root_device.type == "cpu" else self.root_device.index,
            **self.kwargs,
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type == "sharded" or self.root_device.type != "cpu":
            return super().lightning_module_state_dict()
        assert self.model is not None
        with _full_state_dict_in_place(self.model):
            return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        if self._state_dict_type == "sharded" or self.root_device.type != "cpu":
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's own
        assert self.model is not None
        with _full_state_dict_in_place(self.model):
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
        if self.global_rank == 0:  # keyed by parameter index, as a plain optimizer's state dict is
            state = FullyShardedDataParallel.rekey_optim_state_dict(
                state, OptimStateKeyType.PARAM_ID, self.model
            )
        return state

    @contextmanager
    def full_state(self) -> Iterator[None]:
        """State dicts gathered whole on rank 0 (others get empty ones), whatever `state_dict_type` is."""
        saved, self._state_dict_type = self._state_dict_type, "full"
        try:
            yield
        finally:
            self._state_dict_type = saved


def _full_state_dict_in_place(model: nn.Module) -> Any:
    """Whole state dicts on rank 0, left where the parameters are (CPU)."""
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        FullyShardedDataParallel,
        StateDictType,
    )

    return FullyShardedDataParallel.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
    )


def module_classes(model: nn.Module, names: list[str]) -> set[type[nn.Module]]:
    """The classes of `model`'s submodules named in `names`; an unknown name is a one-line error."""
    found = {type(m).__name__: type(m) for m in model.modules()}
    missing = [name for name in names if name not in found]
    if missing:
        raise UserError(
            f"distributed.fsdp.wrap: the model has no module of class {', '.join(missing)}; "
            f"its classes are {', '.join(sorted(found))}"
        )
    return {found[name] for name in names}


def clean_name(name: str) -> str:
    """A parameter's or buffer's name as the model gives it, without the wrappers' parts."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def is_sharded(strategy: Strategy) -> bool:
    return isinstance(strategy, LightningFSDPStrategy)


def whole_parameters(trainer: L.Trainer, module: nn.Module) -> AbstractContextManager:
    """`module`'s parameters whole for a moment: under FSDP gathered from the shards (changes to them are not
    written back); elsewhere they already are."""
    if not is_sharded(trainer.strategy):
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(module, writeback=False)


def sum_over_shards(trainer: L.Trainer, partial_sums: torch.Tensor) -> torch.Tensor:
    """Under FSDP each rank holds a part of every parameter: its sums of squares add up to the whole
    model's. Elsewhere every rank already holds the whole (DDP's gradients are all-reduced)."""
    if not (is_sharded(trainer.strategy) and trainer.world_size > 1):
        return partial_sums
    torch.distributed.all_reduce(partial_sums)
    return partial_sums / _copies(trainer)


def _copies(trainer: L.Trainer) -> int:
    """How many ranks hold each shard: hybrid sharding shards within a node and replicates across nodes,
    NO_SHARD replicates everywhere."""
    from torch.distributed.fsdp import ShardingStrategy

    strategy = trainer.strategy
    assert isinstance(strategy, LightningFSDPStrategy)  # (is_sharded)
    sharding = strategy.sharding_strategy
    if sharding == ShardingStrategy.NO_SHARD:
        return trainer.world_size
    if sharding in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
        return trainer.num_nodes
    return 1


def full_state(strategy: Strategy) -> Any:
    """A context in which the strategy's `lightning_module_state_dict` and `optimizer_state` return the whole
    model's state (on rank 0; a collective call under FSDP)."""
    return strategy.full_state() if isinstance(strategy, FSDPStrategy) else nullcontext()


def clip_grad_norm_over_shards(trainer: L.Trainer, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_` of the optimizer's parameters, with the norm of the whole model."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    squares = torch.stack(torch._foreach_norm(grads)).float().square().sum()  # pyright: ignore[reportPrivateImportUsage]
    total = sum_over_shards(trainer, squares).sqrt()
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0).to(grads[0].dtype))  # pyright: ignore[reportPrivateImportUsage]
